"""Throughput: depthlab's training step against the common way of training, on the current device.

The common way is what most tutorials do: a map-style dataset that hands PIL images to
torchvision transforms (RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize),
a DataLoader with worker processes, an eager fp32 model and `loss.item()` every step.
depthlab's way keeps the uint8 images on the device and augments whole batches there.
All figures are measured in this process (or, for K cells at once, in K processes started
together), on the same model and batch size, so their ratios are fair.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .config import Cell, RuntimeSpec, TrainSpec
from .data import Images, Normalizer, epoch_batches, synthetic_images, training_batch
from .models import build_model
from .train import TrainStep, configure_device, device_name, epoch_generator, make_optimizer, resolve_compile, resolve_memory_format


def bench_images(size: int = 10_000) -> Images:
    """Pixels do not change the speed: synthetic images of CIFAR's shape serve every benchmark."""
    return synthetic_images(size, 10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
                    images: Images, loader_workers: int = 4) -> float:
    """Images/s of the usual DataLoader + eager fp32 loop (the baseline)."""
    model = build_model(arch, depth).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(_PilDataset(images), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=loader_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=loader_workers > 0)
    done, started, running_loss = 0, None, 0.0
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                _sync(device)
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
    _sync(device)
    return steps * batch_size / (time.perf_counter() - started)


def _depthlab_span(arch: str, depth: int, shortcut: str, batch_size: int, precision: str, steps: int, warmup: int,
                   device: torch.device, runtime: RuntimeSpec, images: Images,
                   ready: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Wall-clock start and end of `steps` timed steps of train_cell's own step, after `warmup` untimed ones.

    `ready` runs between the two (K processes meet there, so that they time the same interval).
    """
    configure_device(device)
    torch.manual_seed(0)
    model = build_model(arch, depth, shortcut).to(device)
    memory_format = resolve_memory_format(runtime, device)
    model.to(memory_format=memory_format)
    spec = TrainSpec(iterations=1, batch_size=batch_size, precision=precision)
    step = TrainStep(model, make_optimizer(model, spec, device), precision == "bf16", resolve_compile(runtime.compile, device))
    normalize = Normalizer(images.train_x, "pixel_mean")
    done, started, epoch = 0, 0.0, 0
    while done < warmup + steps:
        generator = epoch_generator(0, epoch, device)
        for index in epoch_batches(len(images.train_y), batch_size, generator, device):
            if done == warmup:
                _sync(device)
                ready()
                started = time.time()
            step(training_batch(images.train_x, index, normalize, generator, memory_format), images.train_y[index])
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    _sync(device)
    return started, time.time()


def depthlab_rate(*, steps: int, batch_size: int, **args: Any) -> float:
    """Images/s of train_cell's own step: device-resident data, batched augmentation, no host syncs."""
    start, end = _depthlab_span(steps=steps, batch_size=batch_size, **args)
    return steps * batch_size / (end - start)


def _concurrent_worker(args: dict, jobs: int, barrier: Any, results: Any) -> None:
    device = torch.device(args["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // jobs))
    images = bench_images().to(device)
    results.put(_depthlab_span(**dict(args, device=device), images=images, ready=barrier.wait))


def concurrent_rate(jobs: int, device: torch.device, **args: Any) -> float:
    """Aggregate images/s of `jobs` cells trained at once, each in its own process, over the same interval."""
    context = torch.multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(jobs), context.Queue()
    payload = dict(args, device=str(device))
    procs = [context.Process(target=_concurrent_worker, args=(payload, jobs, barrier, results)) for _ in range(jobs)]
    for p in procs:
        p.start()
    spans = [results.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return jobs * args["steps"] * args["batch_size"] / wall


def run_bench(arch: str, depth: int, shortcut: str, batch_size: int, precision: str, steps: int, warmup: int,
              jobs: int, device: torch.device, runtime: RuntimeSpec, loader_workers: int, baseline: bool = True) -> dict:
    """All three measurements and their ratios to the baseline."""
    images = bench_images()
    common = dict(arch=arch, depth=depth, batch_size=batch_size, steps=steps, warmup=warmup)
    result: dict[str, Any] = {"model": f"{arch}-{depth}", "batch_size": batch_size, "precision": precision,
                              "steps": steps, "device": str(device), "device_name": device_name(device),
                              "torch": torch.__version__, "compile": resolve_compile(runtime.compile, device)}
    if baseline:
        result["common_way"] = common_way_rate(device=device, images=images, loader_workers=loader_workers, **common)
    ours = dict(common, shortcut=shortcut, precision=precision, runtime=runtime)
    result["single_cell"] = depthlab_rate(device=device, images=images.to(device), **ours)
    if jobs > 1:
        result["concurrent"] = concurrent_rate(jobs, device, **ours)
        result["jobs"] = jobs
    if baseline:
        for key in ("single_cell", "concurrent"):
            if key in result:
                result[f"{key}_speedup"] = result[key] / result["common_way"]
    return result


def estimate_seconds(cells: list[Cell], device: torch.device, runtime: RuntimeSpec, iterations_of: Any, jobs: int,
                     steps: int = 20) -> dict[str, float]:
    """Calibrate each distinct model briefly and project each cell's and the sweep's wall time.

    The sweep's figure assumes `jobs` cells at once add up linearly: an optimistic bound.
    """
    images = bench_images(2_000).to(device)
    rates: dict[tuple, float] = {}
    per_cell = {}
    for cell in cells:
        key = (cell.arch, cell.depth, cell.shortcut, cell.train.batch_size, cell.train.precision)
        if key not in rates:
            arch, depth, shortcut, batch_size, precision = key
            rates[key] = depthlab_rate(arch=arch, depth=depth, shortcut=shortcut, batch_size=batch_size, precision=precision,
                                       steps=steps, warmup=5, device=device, runtime=runtime, images=images)
        per_cell[cell.id] = iterations_of(cell) * cell.train.batch_size / rates[key]
    total = sum(per_cell.values())
    return {"cells": per_cell, "serial_seconds": total, "jobs": jobs,
            "wall_seconds": max(total / jobs, max(per_cell.values(), default=0.0))}

