"""depthlab: plain vs residual CIFAR-10 nets of growing depth, trained for real (He et al. 2015, Fig. 6)."""

__version__ = "0.1.0"
