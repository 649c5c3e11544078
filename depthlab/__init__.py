"""depthlab: plain vs residual CIFAR-10 nets of growing depth, trained for real (He et al. 2015, Fig. 6)."""

__version__ = "0.1.0"


def install_command(extra: str) -> str:
    """How to install an optional extra: depthlab is installed from its source tree (it is on no package index)."""
    return f"pip install -e '.[{extra}]'"
