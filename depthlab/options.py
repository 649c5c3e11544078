"""The vocabulary of a net, without torch: architecture names, shortcut options and valid depths.

config (validation) and report (tables) need these names but not the networks; keeping them
here lets both import them without loading torch. `models` builds the networks they name.
"""

from __future__ import annotations

import reprlib
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
