"""The vocabulary of a net, without torch: architecture names, shortcut options, valid depths and the ablation options.

config (validation) and report (tables) need these names but not the networks; keeping them
here lets both import them without loading torch. `models` builds the networks they name;
`NetSpec` is the whole description of one net.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, fields, replace
from typing import Literal

Arch = Literal["plain", "residual"]
Shortcut = Literal["A", "B"]
ARCHS: tuple[str, ...] = ("plain", "residual")
SHORTCUTS: tuple[str, ...] = ("A", "B")
# A sanity bound, not a fact: the paper's deepest net is ResNet-1202. Measured on a 2-core CPU:
# depth 1202 builds in 0.5 s and its MAC count (plan) takes 5 s; depth 1994, the deepest allowed,
# 0.8 s and 11 s. Far deeper nets would make `plan` and model building crawl for no science.
MAX_DEPTH = 2000


def valid_depths(limit: int = 8) -> list[int]:
    """The first `limit` depths of the form 6n+2."""
    return [6 * n + 2 for n in range(1, limit + 1)]


def depth_error(depth: object) -> str | None:
    """Why `depth` is not a CIFAR-net depth, or None when it is one."""
    if isinstance(depth, bool) or not isinstance(depth, int) or not 8 <= depth <= MAX_DEPTH or (depth - 2) % 6:
        listed = ", ".join(map(str, valid_depths(9)))
        deepest = MAX_DEPTH - (MAX_DEPTH - 2) % 6
        return f"depth must be 6n+2 from 8 to {deepest} ({listed}, …, 110, …, 1202, …, {deepest}); got {reprlib.repr(depth)}"
    return None


def blocks_per_stage(depth: int) -> int:
    """n for a depth of 6n+2; a clear ValueError for any other depth."""
    problem = depth_error(depth)
    if problem:
        raise ValueError(problem)
    return (depth - 2) // 6


Family = Literal["conv", "mlp"]
Init = Literal["he", "zero_gamma", "delta_orthogonal", "skipinit"]
Norm = Literal["bn", "none"]
BlockOrder = Literal["post", "pre"]
FAMILIES: tuple[str, ...] = ("conv", "mlp")
INITS: tuple[str, ...] = ("he", "zero_gamma", "delta_orthogonal", "skipinit")
NORMS: tuple[str, ...] = ("bn", "none")
BLOCK_ORDERS: tuple[str, ...] = ("post", "pre")


@dataclass(frozen=True)
class NetSpec:
    """Everything that decides a net's layers and starting weights; the defaults are the 2015 CIFAR net.

    family: conv (the paper's CIFAR net) or mlp (the same depth grid with fully-connected layers).
    shortcut, shortcut_scale: option A/B where the shape changes, and λ in a[l+2] = g(z[l+2] + λ·shortcut(a[l])).
    init: he (Kaiming normal), zero_gamma (every residual block starts as its shortcut: the last γ of a `post`
    branch, the last conv of a `pre` branch is zero), delta_orthogonal, or skipinit (He init and a learned
    scalar α = 0 on every residual branch, De & Smith 2020: keeps a net without BatchNorm finite at any depth).
    norm: bn (BatchNorm after every weighted layer) or none. block: post (2015: add, then ReLU) or pre (2016).
    """

    arch: Arch
    depth: int
    family: Family = "conv"
    shortcut: Shortcut = "A"
    shortcut_scale: float = 1.0
    init: Init = "he"
    norm: Norm = "bn"
    block: BlockOrder = "post"

    def canonical(self) -> NetSpec:
        """The same net with the options it ignores reset, so that equal nets have equal specs.

        A plain net ignores the shortcut options (as config already does for `shortcut`); λ becomes a
        float so that 1 and 1.0 name the same net. Call it on a valid spec.
        """
        if self.arch == "plain":
            return replace(self, shortcut="A", shortcut_scale=1.0)
        return replace(self, shortcut_scale=float(self.shortcut_scale))

    def non_default(self) -> tuple[tuple[str, object], ...]:
        """The options, other than arch and depth, in which this net differs from the 2015 net, in field order.

        Empty for the default nets, so names and fingerprints built from it stay as they were.
        """
        spec, default = self.canonical(), NetSpec(self.arch, self.depth)
        names = [f.name for f in fields(self) if f.name not in ("arch", "depth")]
        return tuple((name, getattr(spec, name)) for name in names if getattr(spec, name) != getattr(default, name))


def _choice_error(key: str, value: object, allowed: tuple[str, ...]) -> str | None:
    if value not in allowed:
        return f"{key} must be one of {', '.join(allowed)}; got {value!r}"
    return None


def net_spec_error(spec: NetSpec) -> str | None:
    """Why `spec` names no net that can be built and trained, or None when it is fine.

    Refused combinations: zero_gamma or skipinit on a plain net (its first block would output zeros, so
    the net's output would not depend on the input) and zero_gamma without BatchNorm (there is no γ to
    zero; skipinit is the init for residual nets without BatchNorm). zero_gamma with `pre` blocks is
    allowed: it zeroes the branch's last conv, which keeps every branch parameter trainable.
    Allowed on purpose: a `pre` plain net (the pre-activation layers without the additions, the fair
    partner of a `pre` ResNet) and delta_orthogonal with fewer outputs than inputs (the centre tap is
    then a matrix with orthonormal rows; the CIFAR nets never need it).
    """
    problem = (
        _choice_error("arch", spec.arch, ARCHS)
        or depth_error(spec.depth)
        or _choice_error("family", spec.family, FAMILIES)
        or _choice_error("shortcut", spec.shortcut, SHORTCUTS)
        or _choice_error("init", spec.init, INITS)
        or _choice_error("norm", spec.norm, NORMS)
        or _choice_error("block", spec.block, BLOCK_ORDERS)
    )
    if problem:
        return problem
    scale = spec.shortcut_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        return f"shortcut_scale must be a finite number (1 = the ResNet, 0 = the plain net); got {scale!r}"
    if spec.init in ("zero_gamma", "skipinit") and spec.arch == "plain":
        return f"init {spec.init} needs arch residual: a plain net whose blocks output zeros ignores its input"
    if spec.init == "zero_gamma" and spec.norm == "none":
        return "init zero_gamma needs norm bn: without BatchNorm there is no γ to set to zero (use init skipinit)"
    return None
