"""The vocabulary of a net, without torch: architecture names, shortcut options and valid depths.

config (validation) and report (tables) need these names but not the networks; keeping them
here lets both import them without loading torch. `models` builds the networks they name.
"""

from __future__ import annotations

from typing import Literal

Arch = Literal["plain", "residual"]
Shortcut = Literal["A", "B"]
ARCHS: tuple[str, ...] = ("plain", "residual")
SHORTCUTS: tuple[str, ...] = ("A", "B")


def valid_depths(limit: int = 8) -> list[int]:
    """The first `limit` depths of the form 6n+2."""
    return [6 * n + 2 for n in range(1, limit + 1)]


def depth_error(depth: object) -> str | None:
    """Why `depth` is not a CIFAR-net depth, or None when it is one."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        listed = ", ".join(map(str, valid_depths(9)))
        return f"depth must be 6n+2 with n >= 1 ({listed}, …, 110, …); got {depth!r}"
    return None


def blocks_per_stage(depth: int) -> int:
    """n for a depth of 6n+2; a clear ValueError for any other depth."""
    problem = depth_error(depth)
    if problem:
        raise ValueError(problem)
    return (depth - 2) // 6
