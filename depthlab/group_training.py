"""Training cells that differ only in seed as one grouped model (grouped.py), each cell ending as its own.

Every net of the group starts from exactly the weights its solo run would (built from its seed
alone, then packed), sees exactly its solo run's batches (its own (seed, epoch) generator for the
shuffle and the augmentation), and gets its solo gradient (the step's loss is the sum of the nets'
mean losses). The loop is train.py's: `train_epoch` runs the grouped step, `evaluate` scores every
net at once, and after each epoch the group is unpacked into each net's own model and optimizer,
which train.py's functions then save (metrics, dynamics, a checkpoint in the solo format),
so every cell keeps its own folder, and a cell can resume alone or in another group.

What is not equal bit for bit: a grouped convolution may add in another order than a solo one
(another kernel), so weights and metrics drift apart by rounding, within the tolerance
tests/test_grouped.py states.

A group trains only nets at the same iteration; cells whose checkpoints stopped at different
epochs (a group killed while writing them) train in one group per iteration, a lone one as a
solo cell. A net that diverges is recorded as diverged after its epoch and the others continue,
regrouped without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .config import Cell, RunLength, RuntimeSpec
from .data import Images, Normalizer, epoch_batches, training_batch
from .dynamics import training_dynamics
from .events import CellEvents
from .grouped import pack, pack_optimizer, unpack, unpack_optimizer
from .results_folder import CellFolder
from .train import (DYNAMICS_BATCH, PROGRESS_SECONDS, Schedule, Throttled, TrainingSetup, TrainState, book_training_time, epoch_record,
                    resume_state, save_epoch, build_training_setup, end_cell, epoch_generator, evaluate, train_cell, train_epoch,
                    write_cell_config)


def group_key(cell: Cell) -> str:
    """What cells must share to train as one group: everything that defines the result except the seed."""
    science = {key: value for key, value in cell.to_dict().items() if key not in ("id", "seed", "tags")}
    return json.dumps(science, sort_keys=True, default=str)


def group_refusal(cells: list[Cell]) -> Optional[str]:
    """Why `cells` cannot train as one grouped model (they then train alone), or None."""
    if len(cells) < 2:
        return "a group needs two cells or more"
    if len({group_key(cell) for cell in cells}) > 1:
        return "the cells differ in more than their seed"
    if len({cell.seed for cell in cells}) < len(cells):
        return "two cells have the same seed"
    if cells[0].train.warmup_lr is not None:
        return ("train.warmup_lr: each net ends its warm-up on its own training error, so the nets' learning rates would "
                "differ, and one grouped optimizer steps all nets at one learning rate")
    return None


def plan_groups(cells: list[Cell], largest: int) -> list[list[int]]:
    """`cells` (by index, in their order) as groups of at most `largest` that differ only in seed; cells that cannot
    group are groups of one. The order of first appearance is kept, so the longest cells still start first."""
    units: list[list[int]] = []
    open_groups: dict[str, list[int]] = {}
    for index, cell in enumerate(cells):
        key = group_key(cell)
        group = open_groups.get(key)
        if largest > 1 and group is not None and len(group) < largest and group_refusal([cells[i] for i in group] + [cell]) is None:
            group.append(index)
            continue
        units.append([index])
        open_groups[key] = units[-1]
    return units


@dataclasses.dataclass
class _Net:
    """One cell of a group: its folder, its own model and optimizer (as its solo run has them) and its progress."""

    cell: Cell
    folder: CellFolder
    own: TrainingSetup
    state: TrainState


def train_group(cells: list[Cell], images: Images, device: torch.device, runtime: RuntimeSpec, cell_dirs: list[Path],
                events: CellEvents | None = None, stop_after_epochs: int | None = None,
                compile_backend: str | Callable = "inductor") -> list[dict]:
    """Train `cells` (that differ only in seed) as grouped models; each cell's summary (or interruption), in their order.

    The arguments are `train_cell`'s, one folder per cell. Cells that cannot group train one after another alone.
    """
    if group_refusal(cells) is not None:
        return [train_cell(cell, images, device, runtime, path, events, stop_after_epochs, compile_backend)
                for cell, path in zip(cells, cell_dirs)]
    try:
        length = cells[0].train.run_length(len(images.train_y))
    except ValueError as err:
        raise ValueError(f"{cells[0].id}: {err}") from None
    own_runtime = dataclasses.replace(runtime, compile="none")  # each net's own model only holds and saves its weights
    nets = []
    for cell, path in zip(cells, cell_dirs):
        own = build_training_setup(cell, device, own_runtime)
        folder = CellFolder(path)
        nets.append(_Net(cell, folder, own, resume_state(folder, cell, own, device)))
    by_iteration: dict[int, list[_Net]] = {}
    for net in nets:
        by_iteration.setdefault(net.state.iteration, []).append(net)
    ended: dict[str, dict] = {}
    for same in by_iteration.values():
        if len(same) == 1:
            net = same[0]
            ended[net.cell.id] = train_cell(net.cell, images, device, runtime, net.folder.path, events, stop_after_epochs,
                                            compile_backend)
        else:
            ended.update(_train_together(same, images, device, runtime, length, events, stop_after_epochs, compile_backend))
    return [ended[cell.id] for cell in cells]


def _grouped(nets: list[_Net], device: torch.device, runtime: RuntimeSpec, compile_backend: str | Callable) -> TrainingSetup:
    """The grouped model and optimizer of `nets`, holding each net's current weights and momentum."""
    setup = build_training_setup(nets[0].cell, device, runtime, compile_backend, members=len(nets))
    first = nets[0].own
    setup.model.load_state_dict(pack([net.own.model.state_dict() for net in nets], setup.model.state_dict()))
    setup.optimizer.load_state_dict(pack_optimizer([net.own.optimizer.state_dict() for net in nets], first.model, setup.model,
                                                   setup.optimizer.state_dict()))
    return setup


def _ungroup(setup: TrainingSetup, nets: list[_Net]) -> None:
    """Copy each net's weights and momentum from the grouped model back into its own model and optimizer."""
    first = nets[0].own
    weights = unpack(setup.model.state_dict(), first.model.state_dict(), len(nets))
    momenta = unpack_optimizer(setup.optimizer.state_dict(), setup.model, first.model, first.optimizer.state_dict(), len(nets))
    for net, state, momentum in zip(nets, weights, momenta):
        net.own.model.load_state_dict(state)
        net.own.optimizer.load_state_dict(momentum)


def stacked_batches(images: Images, normalize: Normalizer, generators: list[torch.Generator], batch_size: int,
                     device: torch.device, memory_format: torch.memory_format) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each net's own batch (its shuffle and augmentation, as in its solo run) stacked along the channels; labels (batch, K)."""
    orders = [epoch_batches(len(images.train_y), batch_size, generator, device) for generator in generators]
    for indices in zip(*orders):
        x = torch.cat([training_batch(images.train_x, index, normalize, generator, memory_format)
                       for index, generator in zip(indices, generators)], dim=1)
        yield x.contiguous(memory_format=memory_format), torch.stack([images.train_y[index] for index in indices], dim=1)


def _as_own(net: _Net, setup: TrainingSetup) -> TrainingSetup:
    """The group's step and settings with this net's own model: what train.py's writers read for one cell."""
    return dataclasses.replace(setup, model=net.own.model, optimizer=net.own.optimizer)


def _train_together(nets: list[_Net], images: Images, device: torch.device, runtime: RuntimeSpec, length: RunLength,
                    events: CellEvents | None, stop_after_epochs: int | None, compile_backend: str | Callable) -> dict[str, dict]:
    """Train `nets` (all at the same iteration) as one grouped model until each ends; their summaries by cell id."""
    cell = nets[0].cell
    schedule = Schedule.for_cell(cell.train, length)
    setup = _grouped(nets, device, runtime, compile_backend)
    clock = TrainState(epoch=nets[0].state.epoch, iteration=nets[0].state.iteration)  # the group's shared progress
    normalize = Normalizer(images.train_x, cell.data.normalize)
    fixed = slice(0, min(DYNAMICS_BATCH, len(images.train_y)))
    dynamics_batch = normalize(images.train_x[fixed]).contiguous(memory_format=setup.memory_format), images.train_y[fixed]
    for net in nets:
        write_cell_config(net.folder, net.cell, length)
        if events:
            events.cell_started(net.cell.id, length.epochs, net.state.epoch)

    def report_progress(done: int) -> None:
        for net in nets:
            events.epoch_progress(net.cell.id, clock.epoch + 1, done, length.iterations_per_epoch)

    progress = Throttled(report_progress, PROGRESS_SECONDS) if events else None
    ended: dict[str, dict] = {}
    epochs_this_call = 0
    while nets and clock.iteration < schedule.total:
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            return {**ended, **{net.cell.id: {"id": net.cell.id, "status": "interrupted", "epochs": net.state.epoch} for net in nets}}
        k = len(nets)
        started, compiled_before, failed_before = time.perf_counter(), setup.step.compile_seconds, setup.step.failed_compile_seconds
        record_before = setup.step.record()
        setup.model.train()
        generators = [epoch_generator(net.cell.seed, clock.epoch, device) for net in nets]
        batches = stacked_batches(images, normalize, generators, cell.train.batch_size, device, setup.memory_format)
        losses, errors, lr = train_epoch(setup.step, batches, schedule, clock, device, progress, members=k)
        elapsed = time.perf_counter() - started
        compiling, failed = setup.step.compile_seconds - compiled_before, setup.step.failed_compile_seconds - failed_before
        record = epoch_record(record_before, setup.step.record())
        scored = {"test": evaluate(setup.model, images.test_x, images.test_y, normalize, runtime.eval_batch_size, setup.bf16,
                                   setup.memory_format, members=k)}
        if images.val_y is not None:
            scored["val"] = evaluate(setup.model, images.val_x, images.val_y, normalize, runtime.eval_batch_size, setup.bf16,
                                     setup.memory_format, members=k)
        _ungroup(setup, nets)
        for i, net in enumerate(nets):
            diverged = not math.isfinite(losses[i])
            book_training_time(net.state, setup.step, elapsed, compiling, failed, record)
            row = {"epoch": net.state.epoch + 1, "iteration": clock.iteration, "lr": lr, "train_loss": losses[i],
                   "train_err": errors[i]}
            if not diverged:
                net.state.dynamics.append({"epoch": net.state.epoch + 1,
                                           **training_dynamics(net.own.model, *dynamics_batch, setup.bf16)})
            for name, (loss, err) in scored.items():
                row[f"{name}_loss"], row[f"{name}_err"] = loss[i], err[i]
            row["seconds"] = time.perf_counter() - started
            net.state.epoch, net.state.iteration = net.state.epoch + 1, clock.iteration
            net.state.rows.append(row)
            save_epoch(net.folder, net.cell, net.own, net.state)
            if events:
                events.epoch_done(net.cell.id, row)
            if diverged:
                ended[net.cell.id] = end_cell(net.folder, net.cell, net.state, None, device, runtime, _as_own(net, setup), group_size=k)
        clock.epoch += 1
        epochs_this_call += 1
        survivors = [net for net in nets if net.cell.id not in ended]
        if survivors and len(survivors) < len(nets):  # regroup without the diverged nets, whose NaNs then touch nothing
            setup = _grouped(survivors, device, runtime, compile_backend)
        nets = survivors
    if nets:
        losses, errors = evaluate(setup.model, images.train_x, images.train_y, normalize, runtime.eval_batch_size, setup.bf16,
                                  setup.memory_format, members=len(nets))
        for i, net in enumerate(nets):
            ended[net.cell.id] = end_cell(net.folder, net.cell, net.state, (losses[i], errors[i]), device, runtime,
                                          _as_own(net, setup), group_size=len(nets))
    return ended


# Evidence: docs/performance.md, "Seeds as a batch dimension" (bench --group, idle 2-core AMD EPYC, fp32, torch 2.14.1).
CPU_GROUP_SEEDS = 1  # off: K = 2/4/8 grouped ran at 0.57-0.97x one cell's aggregate rate for ResNet-20 and -56
GPU_GROUP_SEEDS = 8  # a guess, not measured: a CIFAR net at batch 128 leaves most of a GPU idle


def resolve_group_seeds(value: int | str, device: torch.device) -> int:
    """runtime.group_seeds as a number: `auto` is the device's default (1 trains each cell alone)."""
    if value == "auto":
        return GPU_GROUP_SEEDS if device.type == "cuda" else CPU_GROUP_SEEDS
    return int(value)
