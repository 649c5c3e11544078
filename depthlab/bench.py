"""Throughput: depthlab's training step against the common way of training, on the current device.

The common way is what most tutorials do: a map-style dataset that hands PIL images to
torchvision transforms (RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize),
a DataLoader with worker processes, an eager fp32 model and `loss.item()` every step.
depthlab's way keeps the uint8 images on the device and augments whole batches there.
All figures are measured in this process (or, for K cells at once, in K processes started
together), on the same model and batch size and under the same cuDNN settings, so their
ratios are fair.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .config import Cell, RuntimeSpec, parse_config
from .data import Images, Normalizer, epoch_batches, synthetic_images, training_batch
from .models import build_net
from .options import NetSpec
from .fastpath import resolve_channels_last, resolve_precision
from .group_training import stacked_batches  # the group's own batches: each net's shuffle and augmentation
from .train import (CompileRecord, TrainingSetup, build_training_setup, configure_device, device_name, epoch_generator, one_line,
                    prepare_worker_process, resolve_compile, resolve_device, synchronize, usable_cores)

WORKER_POLL_SECONDS = 1.0  # how often the parent looks whether a silent worker is still alive
WORKER_TIMEOUT_SECONDS = 1800.0  # a guess: K workers' start, data upload, compile and steps; a worker silent longer is stuck
BARRIER_SECONDS = 600.0  # a guess: how long a worker waits for the others to finish compiling before it gives up


class BenchWorkerError(RuntimeError):
    """A concurrent-measurement worker died, failed or fell silent: the measurement has no result."""


@dataclass(frozen=True)
class BenchOptions:
    """What to measure: one net and recipe, how many steps, and how many cells at once."""

    arch: str = "residual"
    depth: int = 56
    shortcut: str = "A"
    batch_size: int = 128
    precision: str = "fp32"
    steps: int = 100
    warmup: int = 20  # untimed steps first: compilation, cuDNN autotuning
    jobs: int = 4  # cells at once for the concurrent measurement (1 skips it)
    device: str = "auto"
    compile: str = "auto"
    loader_workers: int = field(default_factory=lambda: min(4, usable_cores()))  # the common way's DataLoader workers
    baseline: bool = True

    def cell(self) -> Cell:
        """The benchmarked net as a sweep cell, validated like a config (ConfigError names the bad option)."""
        document = {"name": "bench", "data": {"source": "synthetic"},
                    "train": {"batch_size": self.batch_size, "precision": self.precision},
                    "runtime": {"compile": self.compile, "device": self.device},
                    "cells": [{"arch": self.arch, "depth": self.depth, "shortcut": self.shortcut, "seed": 0}]}
        return parse_config(document, source="bench options").cells[0]

    def runtime(self) -> RuntimeSpec:
        return RuntimeSpec(device=self.device, compile=self.compile)


def bench_images(size: int = 10_000) -> Images:
    """Pixels do not change the speed: synthetic images of CIFAR's shape serve every benchmark."""
    return synthetic_images(size, 10)


class _PilDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: an HWC uint8 array → PIL image → transforms."""

    def __init__(self, images: Images):
        from torchvision import transforms

        self.x = images.train_x.permute(0, 2, 3, 1).numpy()
        self.y = images.train_y.numpy()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def common_way_rate(arch: str, depth: int, batch_size: int, steps: int, warmup: int, device: torch.device,
                    images: Images, loader_workers: int) -> float:
    """Images/s of the usual DataLoader + eager fp32 loop (the baseline), under the cuDNN settings already in force.

    Not tuned: NCHW, no compilation, no autocast, PyTorch's default SGD kernels.
    """
    model = build_net(NetSpec(arch, depth)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(_PilDataset(images), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=loader_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=loader_workers > 0)
    done, started, running_loss = 0, None, 0.0
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                synchronize(device)
                started = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            done += 1
            if done == warmup + steps:
                break
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


@dataclass(frozen=True)
class Span:
    """Wall-clock start and end of the timed steps, and how those steps ran."""

    start: float
    end: float
    execution: dict


def step_execution(step: Any) -> dict[str, Any]:
    """A TrainStep's execution and its counts, for bench's JSON (the keys a summary records)."""
    record: CompileRecord = step.record()
    return {"execution": step.execution, "compile_mode": step.compile_mode, "fallback_reason": step.fallback_reason,
            "cudagraphs_fallback_reason": step.cudagraphs_fallback_reason, "compile_seconds": step.compile_seconds,
            **{key: value for key, value in dataclasses.asdict(record).items() if key != "steps"}}


def _depthlab_span(cell: Cell, steps: int, warmup: int, device: torch.device, runtime: RuntimeSpec, images: Images,
                   ready: Callable[[], None] = lambda: None) -> Span:
    """`steps` timed steps of train_cell's own step, after `warmup` untimed ones.

    `ready` runs between the two (K processes meet there, so that they time the same interval).
    """
    setup = build_training_setup(cell, device, runtime)
    normalize = Normalizer(images.train_x, cell.data.normalize)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = epoch_generator(cell.seed, epoch, device)
        for index in epoch_batches(len(images.train_y), cell.train.batch_size, generator, device):
            yield training_batch(images.train_x, index, normalize, generator, setup.memory_format), images.train_y[index]

    return _timed_steps(setup, batches, steps, warmup, device, ready)


def _timed_steps(setup: TrainingSetup, batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]], steps: int,
                 warmup: int, device: torch.device, ready: Callable[[], None] = lambda: None) -> Span:
    """`steps` timed steps of `setup`'s step over `batches(epoch)`, epoch after epoch, after `warmup` untimed ones."""
    done, started, epoch = 0, 0.0, 0
    while done < warmup + steps:
        for x, y in batches(epoch):
            if done == warmup:
                synchronize(device)
                ready()
                started = time.time()
            setup.step(x, y)
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    synchronize(device)
    return Span(started, time.time(), step_execution(setup.step))


def depthlab_rate(cell: Cell, steps: int, **args: Any) -> float:
    """Images/s of train_cell's own step: device-resident data, batched augmentation, no host syncs."""
    return measure_depthlab(cell, steps, **args)[0]


def measure_depthlab(cell: Cell, steps: int, **args: Any) -> tuple[float, dict]:
    """Images/s of train_cell's own step, and how the step ran (step_execution)."""
    span = _depthlab_span(cell, steps, **args)
    return steps * cell.train.batch_size / (span.end - span.start), span.execution


def indexed_device(device: torch.device) -> torch.device:
    """A GPU with its index (`cuda` → `cuda:N`, the current one): what torch.cuda.set_device needs in a worker."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _concurrent_worker(cell: Cell, args: dict, device_name_: str, jobs: int, barrier: Any, results: Any, rank: int) -> None:
    """One of K measuring processes: reports ("span", rank, Span) or ("error", rank, message), never silence."""
    try:
        device = torch.device(device_name_)
        prepare_worker_process(device, jobs, resolve_compile(args["runtime"].compile, device))
        images = bench_images().to(device)
        span = _depthlab_span(cell, device=device, images=images, ready=lambda: barrier.wait(BARRIER_SECONDS), **args)
        results.put(("span", rank, span))
    except BaseException as err:
        results.put(("error", rank, one_line(err)))
        raise SystemExit(1) from None


def _wait_for_workers(procs: list, results: Any, timeout: float) -> list[Span]:
    """Each worker's Span; a worker that fails, dies (checked each WORKER_POLL_SECONDS) or outlasts `timeout` raises BenchWorkerError."""
    deadline = time.monotonic() + timeout
    spans: dict[int, Span] = {}
    silent_dead: set[int] = set()
    while len(spans) < len(procs):
        try:
            kind, rank, payload = results.get(timeout=WORKER_POLL_SECONDS)
        except queue.Empty:
            for rank, process in enumerate(procs):
                if rank in spans or process.is_alive():
                    continue
                if process.exitcode != 0 or rank in silent_dead:  # a clean exit's result may still be in the queue: one more look
                    raise BenchWorkerError(f"bench worker {rank} died (exit code {process.exitcode}) before it reported a measurement")
                silent_dead.add(rank)
            if time.monotonic() > deadline:
                raise BenchWorkerError(f"bench workers did not report within {timeout:.0f} s (reported: {len(spans)} of {len(procs)})")
            continue
        if kind == "error":
            raise BenchWorkerError(f"bench worker {rank} failed: {payload}")
        spans[rank] = payload
    return [spans[rank] for rank in range(len(procs))]


def concurrent_rate(cell: Cell, jobs: int, device: torch.device, steps: int, target: Callable[..., None] | None = None,
                    timeout: float = WORKER_TIMEOUT_SECONDS, **args: Any) -> tuple[float, list[dict]]:
    """Aggregate images/s of `jobs` cells trained at once, each in its own process (`target`), over the same interval,
    and how each one's step ran. A worker that dies or fails ends the measurement with BenchWorkerError, never a hang."""
    context = torch.multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(jobs), context.Queue()
    payload = dict(args, steps=steps)
    worker = target or _concurrent_worker
    name = str(indexed_device(device))
    procs = [context.Process(target=worker, args=(cell, payload, name, jobs, barrier, results, rank), daemon=True)
             for rank in range(jobs)]
    try:
        for p in procs:
            p.start()
        spans = _wait_for_workers(procs, results, timeout)
        for p in procs:
            p.join(BARRIER_SECONDS)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    wall = max(span.end for span in spans) - min(span.start for span in spans)
    return jobs * steps * cell.train.batch_size / wall, [span.execution for span in spans]


def run_bench(options: BenchOptions) -> dict:
    """All three measurements and their ratios to the baseline."""
    cell, runtime = options.cell(), options.runtime()
    device = resolve_device(options.device)
    configure_device(device, runtime.deterministic)  # before the baseline: both sides autotune cuDNN alike
    images = bench_images()
    result: dict[str, Any] = {"model": f"{options.arch}-{options.depth}", "batch_size": options.batch_size,
                              "precision": options.precision, "steps": options.steps, "device": str(device),
                              "device_name": device_name(device), "torch": torch.__version__,
                              "compile": resolve_compile(runtime.compile, device)}
    if options.baseline:
        result["common_way"] = common_way_rate(options.arch, options.depth, options.batch_size, options.steps, options.warmup,
                                               device, images, options.loader_workers)
    timing = dict(steps=options.steps, warmup=options.warmup, runtime=runtime)
    result["single_cell"], result["single_cell_execution"] = measure_depthlab(cell, device=device, images=images.to(device), **timing)
    if options.jobs > 1:
        result["concurrent"], result["concurrent_execution"] = concurrent_rate(cell, options.jobs, device, **timing)
        result["jobs"] = options.jobs
    if options.baseline:
        for key in ("single_cell", "concurrent"):
            if key in result:
                result[f"{key}_speedup"] = result[key] / result["common_way"]
    return result


def _grouped_span(cells: list[Cell], steps: int, warmup: int, device: torch.device, runtime: RuntimeSpec, images: Images) -> Span:
    """`steps` timed steps of `cells` (seeds of one net) as one grouped model, each net on its own seed's batches."""
    setup = build_training_setup(cells[0], device, runtime, members=len(cells))
    normalize = Normalizer(images.train_x, cells[0].data.normalize)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generators = [epoch_generator(cell.seed, epoch, device) for cell in cells]
        return stacked_batches(images, normalize, generators, cells[0].train.batch_size, device, setup.memory_format)

    return _timed_steps(setup, batches, steps, warmup, device)


def group_bench(options: BenchOptions, sizes: list[int]) -> dict[str, Any]:
    """Images/s of one cell; of K cells as K processes; of K cells (seeds 0…K-1) as one grouped model, for each K in `sizes`.

    Per net and in aggregate, on the same net, batch size and device, one after another in this run.
    """
    cell, runtime = options.cell(), options.runtime()
    device = resolve_device(options.device)
    configure_device(device, runtime.deterministic)
    images = bench_images().to(device)
    timing = dict(steps=options.steps, warmup=options.warmup, runtime=runtime)
    one = measure_depthlab(cell, device=device, images=images, **timing)[0]
    rows = []
    for k in sizes:
        processes, _ = concurrent_rate(cell, k, device, **timing) if k > 1 else (one, [])
        seeds = [dataclasses.replace(cell, seed=seed) for seed in range(k)]
        span = _grouped_span(seeds, device=device, images=images, **timing)
        grouped = k * options.steps * options.batch_size / (span.end - span.start)
        rows.append({"k": k, "processes": processes, "processes_per_net": processes / k, "grouped": grouped,
                     "grouped_per_net": grouped / k, "grouped_over_processes": grouped / processes, "grouped_over_one_cell": grouped / one,
                     "grouped_execution": span.execution})
    return {"model": f"{options.arch}-{options.depth}", "batch_size": options.batch_size, "precision": options.precision,
            "steps": options.steps, "warmup": options.warmup, "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "compile": resolve_compile(runtime.compile, device),
            "one_cell": one, "groups": rows}


PATHS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))  # (precision, channels_last)
COMPARE_ROUNDS = 2  # the paths take turns this many times; each keeps its best, so a burst of load touches all alike


def compare_paths(options: BenchOptions) -> dict[str, Any]:
    """Images/s of one cell's step in fp32 and bf16 autocast, NCHW and channels_last, and what `auto` picks here.

    The four paths `train.precision` and `runtime.channels_last` choose between, timed on the
    same images in turns (speedup: against fp32 NCHW, which is what depthlab ran before it chose).
    """
    device = resolve_device(options.device)
    runtime = options.runtime()
    configure_device(device, runtime.deterministic)
    images = bench_images().to(device)
    cells = {path: dataclasses.replace(options, precision=path[0]).cell() for path in PATHS}
    rates = {path: 0.0 for path in PATHS}
    for _ in range(COMPARE_ROUNDS):
        for path, cell in cells.items():
            formatted = dataclasses.replace(runtime, channels_last=path[1])
            rates[path] = max(rates[path], depthlab_rate(cell, steps=options.steps, warmup=options.warmup, device=device,
                                                         runtime=formatted, images=images))
    chosen_precision = resolve_precision("auto", device)
    chosen = (chosen_precision, resolve_channels_last("auto", device, chosen_precision == "bf16"))
    baseline = rates[PATHS[0]]
    return {"model": f"{options.arch}-{options.depth}", "batch_size": options.batch_size, "steps": options.steps,
            "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "compile": resolve_compile(runtime.compile, device),
            "paths": [{"precision": p, "memory_format": "channels_last" if cl else "nchw", "images_per_second": rates[(p, cl)],
                       "speedup": rates[(p, cl)] / baseline, "auto": (p, cl) == chosen} for p, cl in PATHS]}


ESTIMATE_REPEATS = 3  # a choice: the fewest timings that show a spread, to keep `plan --estimate` short


def _model_key(cell: Cell) -> tuple:
    """What sets a cell's speed: cells that share it are timed once."""
    return cell.arch, cell.depth, cell.shortcut, cell.train.batch_size, cell.train.precision


def estimate_seconds(cells: list[Cell], device: torch.device, runtime: RuntimeSpec, n_train: int, jobs: int,
                     steps: int = 20, repeats: int = ESTIMATE_REPEATS) -> dict[str, Any]:
    """Time each distinct model `repeats` times and project each cell's and the sweep's wall time, with its spread.

    One untimed run first pays the process's one-time costs (thread pools, allocator, kernel
    choice), which would otherwise all land on the first model timed. The repeats take turns
    over the models, so a change in the machine's load touches each alike; the spread (standard
    deviation) over repeats is the uncertainty. The sweep's figure assumes `jobs` cells at once
    add up linearly: an optimistic bound.
    """
    images = bench_images(2_000).to(device)
    probes = {_model_key(cell): dataclasses.replace(cell, seed=0) for cell in cells}

    def rate(probe: Cell) -> float:
        return depthlab_rate(probe, steps=steps, warmup=5, device=device, runtime=runtime, images=images)

    if probes:
        rate(next(iter(probes.values())))  # the warm-up: not timed
    rates = [{key: rate(probe) for key, probe in probes.items()} for _ in range(repeats)]
    images_per_cell = {cell.id: cell.train.run_length(n_train).iterations * cell.train.batch_size for cell in cells}
    seconds = [{cell.id: images_per_cell[cell.id] / timing[_model_key(cell)] for cell in cells} for timing in rates]
    serial = [sum(each.values()) for each in seconds]
    wall = [max(total / jobs, max(each.values(), default=0.0)) for total, each in zip(serial, seconds)]

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return {"cells": {cell.id: statistics.fmean(each[cell.id] for each in seconds) for cell in cells},
            "serial_seconds": statistics.fmean(serial), "serial_seconds_spread": spread(serial),
            "wall_seconds": statistics.fmean(wall), "wall_seconds_spread": spread(wall),
            "jobs": jobs, "repeats": repeats}
