"""The per-epoch dynamics a training cell records: per-section weight-gradient norms and per-stage branch sizes.

Measured through hooks on any net with `stem`, `stages` (a Sequential of Sequentials of blocks) and `classifier`,
where a block has `residual_branch(x)`; the probe (probe.py) builds its measurements at initialisation on the same
parts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ----------------------------------------------------------------------------- the net's parts


@dataclass(frozen=True)
class BlockRef:
    """Where a block sits: its module name, stage and position (both from 1)."""

    name: str
    stage: int
    index: int
    module: nn.Module


def blocks(model: nn.Module) -> list[BlockRef]:
    """Every block of the net, in forward order."""
    return [BlockRef(f"stages.{s}.{b}", s + 1, b + 1, block)
            for s, stage in enumerate(model.stages) for b, block in enumerate(stage)]


def _parts(model: nn.Module) -> dict[str, nn.Module]:
    """The net's sections by name: stem, stage1 … stageK, classifier."""
    stages = {f"stage{s + 1}": stage for s, stage in enumerate(model.stages)}
    return {"stem": model.stem, **stages, "classifier": model.classifier}


# ----------------------------------------------------------------------------- hooks


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().pow(2).mean().sqrt()


@contextlib.contextmanager
def on_branches(model: nn.Module, record) -> Iterator[None]:
    """Call `record(ref, x, F(x))` whenever the real forward evaluates a block's residual branch.

    The branch is a method, not a module, so a hook cannot see it; an instance attribute that
    wraps the class's method sees every call and is deleted afterwards.
    """
    refs = blocks(model)

    def wrap(ref: BlockRef):
        branch = ref.module.residual_branch

        def recorded(x: torch.Tensor) -> torch.Tensor:
            fx = branch(x)
            record(ref, x, fx)
            return fx
        return recorded

    try:
        for ref in refs:
            ref.module.residual_branch = wrap(ref)
        yield
    finally:
        for ref in refs:
            ref.module.__dict__.pop("residual_branch", None)


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Leave the model's mode and buffers (BN running statistics) as they were."""
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)


class BranchRatios:
    """RMS(F(x)) / RMS(x) per block, accumulated as 0-d tensors (no device sync while recording).

    RMS rather than the plain norm so that a stage's first block, whose F(x) has half as many
    elements as x (stride 2, twice the channels), compares like the others; where the shapes
    agree the two are the same number. Near 0: the block is close to the identity (or to its shortcut).
    """

    def __init__(self) -> None:
        self.sums: dict[BlockRef, torch.Tensor] = {}
        self.counts: dict[BlockRef, int] = {}

    def __call__(self, ref: BlockRef, x: torch.Tensor, fx: torch.Tensor) -> None:
        ratio = _rms(fx) / _rms(x).clamp_min(1e-12)
        self.sums[ref] = self.sums.get(ref, 0) + ratio
        self.counts[ref] = self.counts.get(ref, 0) + 1

    def per_block(self) -> dict[BlockRef, torch.Tensor]:
        return {ref: total / self.counts[ref] for ref, total in self.sums.items()}

    def per_stage(self) -> dict[str, torch.Tensor]:
        """Mean ratio over each stage's blocks, keyed `branch_ratio/stageK`."""
        by_stage: dict[int, list[torch.Tensor]] = {}
        for ref, ratio in self.per_block().items():
            by_stage.setdefault(ref.stage, []).append(ratio)
        return {f"branch_ratio/stage{s}": torch.stack(r).mean() for s, r in sorted(by_stage.items())}


@contextlib.contextmanager
def record_branch_ratios(model: nn.Module) -> Iterator[BranchRatios]:
    """Switch on for one training batch: `with record_branch_ratios(net) as r: net(x)`, then `r.per_stage()`."""
    ratios = BranchRatios()
    with on_branches(model, ratios):
        yield ratios


def _section_grad_norms(model: nn.Module, grad_of: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-section norm of the conv/linear weight gradients, `grad_of(weight)` each (None: left out), as 0-d tensors."""
    stats = {}
    for part, module in _parts(model).items():
        grads = [g for m in module.modules() if isinstance(m, WEIGHTED) and (g := grad_of(m.weight)) is not None]
        if grads:
            stats[f"grad_norm/{part}"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return stats


def training_dynamics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> dict[str, float]:
    """Per-section weight-gradient norms and per-stage mean branch ratios of the current weights on one batch.

    Recorded once per epoch on a fixed batch, so the report can show gradients and blocks drifting
    (toward the identity: branch ratio → 0) beside the error curves. One extra forward and backward
    in train mode, as a training step would see it; the gradients go to no `.grad`, and BN's running
    statistics and the mode are restored, so training continues exactly as it would without it.
    Keys: `grad_norm/stem` … `grad_norm/classifier`, `branch_ratio/stage1` ….
    """
    weights = [m.weight for m in model.modules() if isinstance(m, WEIGHTED)]
    with restored(model):
        model.train()
        with record_branch_ratios(model) as ratios:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        grads = dict(zip(weights, torch.autograd.grad(loss, weights)))
        stats = {**_section_grad_norms(model, grads.get), **ratios.per_stage()}
    values = torch.stack(list(stats.values())).tolist()  # the one device sync
    return dict(zip(stats, values))
