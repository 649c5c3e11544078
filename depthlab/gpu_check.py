"""The first thing to run on a GPU: the checks of docs/performance.md ("What the first GPU run must
check") in a few minutes, written to one JSON file.

    python -m depthlab.gpu_check --out gpu-check.json

Each check says `pass`, `fail`, `skipped` (with the reason: on a CPU the GPU-only parts are
skipped) or `error` (it could not run; the message says why), with what it measured:

- compile_and_cudagraphs: the step compiled by inductor with CUDA graphs (`compile: auto`) ran
  every step in graphs: no eager step, no skipped capture, no fallback (GPU only);
- bf16: the device computes bf16, and the compiled bf16 step runs, at what speed against fp32;
- memory_per_job: each measured process's peak (its CUDA context plus what torch reserved) stays
  within `sweep.memory_per_job`'s bound, fp32 and bf16, compiled and eager (GPU only);
- jobs_throughput: aggregate images/s of 1…K cells at once (`bench --jobs K`) and the knee;
- deterministic_resume: with `runtime.deterministic`, a cell stopped after an epoch and resumed
  ends with the weights of an uninterrupted run; without it, how far apart they end.

The exit status is 1 when a check fails or cannot run. The file is written either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__, files
from .bench import BenchOptions, bench_images, concurrent_rate, measure_depthlab
from .config import parse_config
from .data import synthetic_images
from .fastpath import native_bf16, resolve_precision
from .results_folder import CellFolder
from .pool import dataset_bytes, memory_per_job
from .train import configure_device, device_name, forget_compiled_nets, kernel_settings, resolve_device, train_cell

KNEE_SHARE = 0.95  # a choice: the knee is the fewest jobs that reach this share of the best aggregate throughput
GPU_JOB_COUNTS = (1, 2, 4, 6, 8)  # a choice: around MAX_JOBS_PER_GPU (6), the guess this measures


@dataclass(frozen=True)
class CheckOptions:
    """Sizes of the checks. The defaults take a few minutes on one H100/H200 (most of it compiling)."""

    device: str = "auto"
    depth: int = 20  # the ResNet compiled and measured; --depth 56 for the paper's bench target (longer compiles)
    batch_size: int = 128
    steps: int = 50  # timed steps per measurement
    warmup: int = 10  # untimed steps first: compilation, CUDA-graph recording, cuDNN autotuning
    images: int = 10_000  # synthetic images on the device for the measurements
    max_jobs: int | None = None  # the most cells at once measured: GPU_JOB_COUNTS up to it; default 8 on a GPU, 1 on a CPU
    resume_depth: int = 8
    resume_images: int = 2_048
    resume_epochs: int = 2


def _bench_options(options: CheckOptions, precision: str, compile_mode: str, device: str) -> BenchOptions:
    return BenchOptions(arch="residual", depth=options.depth, batch_size=options.batch_size, precision=precision,
                        steps=options.steps, warmup=options.warmup, jobs=1, device=device, compile=compile_mode, baseline=False)


def _fresh_compiler_state(device: torch.device) -> None:
    """Each measurement starts from no compiled graphs and an empty allocator, so that its memory peak is its own."""
    torch._dynamo.reset()
    forget_compiled_nets()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(options: CheckOptions, device: torch.device, precision: str, compile_mode: str) -> dict[str, Any]:
    """One cell's step timed in this process: images/s, how it ran, and on a GPU its memory against the bound."""
    bench = _bench_options(options, precision, compile_mode, str(device))
    cell, runtime = bench.cell(), bench.runtime()
    images = bench_images(options.images).to(device)
    _fresh_compiler_state(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rate, execution = measure_depthlab(cell, options.steps, warmup=options.warmup, device=device, runtime=runtime, images=images)
    result = {"precision": resolve_precision(precision, device), "compile": compile_mode, "images_per_second": rate, **execution,
              "warnings": sorted({str(w.message)[:300] for w in caught})}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        context = (total - free) - torch.cuda.memory_reserved(device)  # assumes no other process on this GPU
        image_bytes = images.train_x.nbytes + images.test_x.nbytes + images.train_y.nbytes + images.test_y.nbytes
        bound = memory_per_job(cell, runtime) - dataset_bytes(cell.data) + image_bytes
        result.update(context_bytes=context, peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
                      peak_bytes=context + torch.cuda.max_memory_reserved(device), bound_bytes=bound)
    return result


def check_compile(runs: dict[str, dict], device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no GPU: compile auto stays eager on a CPU, and CUDA graphs need a GPU"}
    run = runs["fp32 compiled"]
    ok = run["execution"] == "compiled" and run["eager_steps"] == 0 and run["cudagraph_skips"] == 0
    return {"status": "pass" if ok else "fail", **run}


def check_bf16(runs: dict[str, dict], device: torch.device) -> dict[str, Any]:
    if not native_bf16(device):
        return {"status": "skipped", "reason": f"{device_name(device)} does not compute bf16 in hardware: auto trains fp32 here"}
    mode = "compiled" if device.type == "cuda" else "eager"
    bf16, fp32 = runs[f"bf16 {mode}"], runs[f"fp32 {mode}"]
    ok = bf16["precision"] == "bf16" and (device.type != "cuda" or bf16["execution"] == "compiled")
    return {"status": "pass" if ok else "fail", "speedup_over_fp32": bf16["images_per_second"] / fp32["images_per_second"], **bf16}


def check_memory(runs: dict[str, dict], device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no GPU: the bound is of GPU memory"}
    within = {name: run["peak_bytes"] <= run["bound_bytes"] for name, run in runs.items()}
    fields = ("context_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "peak_bytes", "bound_bytes")
    return {"status": "pass" if all(within.values()) else "fail",
            "runs": {name: {"within_bound": within[name], **{key: run[key] for key in fields}} for name, run in runs.items()}}


def check_jobs(options: CheckOptions, device: torch.device) -> dict[str, Any]:
    """Aggregate images/s of K cells at once, compiled as a sweep compiles them; K = 1 runs in a process of its own too."""
    most = options.max_jobs if options.max_jobs is not None else (max(GPU_JOB_COUNTS) if device.type == "cuda" else 1)
    counts = [k for k in GPU_JOB_COUNTS if k <= most] or [1]
    bench = _bench_options(options, "fp32", "auto", str(device))
    cell, runtime = bench.cell(), bench.runtime()
    rates, executions = {}, {}
    for jobs in counts:
        if jobs == 1 and most == 1:  # nothing to compare with: no process to start
            _fresh_compiler_state(device)
            rate, execution = measure_depthlab(cell, options.steps, warmup=options.warmup, device=device, runtime=runtime,
                                               images=bench_images(options.images).to(device))
            rates[jobs], executions[jobs] = rate, [execution["execution"]]
            continue
        rate, workers = concurrent_rate(cell, jobs, device, options.steps, warmup=options.warmup, runtime=runtime)
        rates[jobs], executions[jobs] = rate, [worker["execution"] for worker in workers]
    best = max(rates.values())
    knee = min(jobs for jobs, rate in rates.items() if rate >= KNEE_SHARE * best)
    result = {"status": "pass", "images_per_second": {str(k): v for k, v in rates.items()},
              "speedup_over_one": {str(k): v / rates[counts[0]] for k, v in rates.items()}, "knee_jobs": knee,
              "executions": {str(k): v for k, v in executions.items()}}
    if most == 1:
        result["note"] = "one job only: more cells at once are measured on a GPU (on a CPU jobs: auto is 1)"
    return result


def _resume_pair(options: CheckOptions, device: torch.device, deterministic: bool, root: Path) -> dict[str, Any]:
    """Train a cell straight through, and again stopped after one epoch and resumed; how far apart their weights end."""
    document = {"name": "gpu-check", "data": {"source": "synthetic", "train_size": options.resume_images, "test_size": 256},
                "train": {"epochs": options.resume_epochs, "batch_size": options.batch_size},
                "runtime": {"device": str(device), "deterministic": deterministic},
                "cells": [{"arch": "residual", "depth": options.resume_depth, "seed": 0}]}
    config = parse_config(document, source="gpu check")
    cell, runtime = config.cells[0], config.runtime
    images = synthetic_images(options.resume_images, 256).to(device)
    straight, resumed = root / f"straight-{deterministic}", root / f"resumed-{deterministic}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fresh_compiler_state(device)
        summary = train_cell(cell, images, device, runtime, straight)
        _fresh_compiler_state(device)  # the resuming process starts with nothing compiled
        train_cell(cell, images, device, runtime, resumed, stop_after_epochs=1)
        _fresh_compiler_state(device)
        train_cell(cell, images, device, runtime, resumed)
    a, b = torch.load(CellFolder(straight).weights), torch.load(CellFolder(resumed).weights)
    equal = all(torch.equal(a[key], b[key]) for key in a)
    difference = max(float((a[key].double() - b[key].double()).abs().max()) for key in a if a[key].is_floating_point())
    return {"weights_equal": equal, "max_abs_difference": difference, "execution": summary["execution"],
            "warnings": sorted({str(w.message)[:300] for w in caught if "deterministic" in str(w.message).lower()})}


def check_resume(options: CheckOptions, device: torch.device) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="depthlab-gpu-check-") as root:
        deterministic = _resume_pair(options, device, True, Path(root))
        default = _resume_pair(options, device, False, Path(root))
    configure_device(device, False)
    return {"status": "pass" if deterministic["weights_equal"] else "fail", "deterministic": deterministic, "default": default}


def _run_check(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A check's result with its duration; one that raises is an error with its last line, and the next check still runs."""
    started = time.perf_counter()
    try:
        result = check()
    except Exception as err:  # recorded so that the other checks still run and the file is still written
        result = {"status": "error", "error": f"{type(err).__name__}: {' '.join(str(err).split())}"[:500],
                  "traceback": traceback.format_exc()[-2000:]}
    return {**result, "seconds": time.perf_counter() - started}


def run_checks(options: CheckOptions) -> dict[str, Any]:
    """Every check, in one process (the jobs check starts its own), and what they ran on."""
    started = time.perf_counter()
    device = resolve_device(options.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    configure_device(device, False)
    modes = ("compiled", "eager") if device.type == "cuda" else ("eager",)
    runs: dict[str, dict] = {}
    measuring = {}
    precisions = ("fp32", "bf16") if native_bf16(device) else ("fp32",)  # emulated bf16 is slow and never chosen by auto
    for precision in precisions:
        for mode in modes:
            name = f"{precision} {mode}"
            measuring[name] = _run_check(lambda p=precision, m=mode: measure(options, device, p, "auto" if m == "compiled" else "none"))
            if measuring[name].get("status") != "error":
                runs[name] = measuring[name]
    failed = {name: run for name, run in measuring.items() if run.get("status") == "error"}

    def needs_runs(check: Callable[[dict, torch.device], dict]) -> Callable[[], dict]:
        if failed:
            return lambda: {"status": "error", "error": "measurements failed: " + "; ".join(f"{n}: {r['error']}" for n, r in failed.items())}
        return lambda: check(runs, device)

    checks = {"compile_and_cudagraphs": _run_check(needs_runs(check_compile)), "bf16": _run_check(needs_runs(check_bf16)),
              "memory_per_job": _run_check(needs_runs(check_memory)),
              "jobs_throughput": _run_check(lambda: check_jobs(options, device)),
              "deterministic_resume": _run_check(lambda: check_resume(options, device))}
    return {"depthlab": __version__, "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "device_name": device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            "options": dataclasses.asdict(options), "kernel_settings": kernel_settings(device),
            "passed": all(check["status"] in ("pass", "skipped") for check in checks.values()),
            "checks": checks, "measurements": measuring, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m depthlab.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    defaults = CheckOptions()
    for field in dataclasses.fields(CheckOptions):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=str if field.name == "device" else int, default=getattr(defaults, field.name),
                            help=f"default: {getattr(defaults, field.name)}")
    args = parser.parse_args(argv)
    options = CheckOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(CheckOptions)})
    result = run_checks(options)
    files.write_json(args.out, result)
    for name, check in result["checks"].items():
        detail = check.get("reason") or check.get("error") or ""
        print(f"{name:<24} {check['status']:<8} {check['seconds']:6.1f} s  {detail}".rstrip())
    print(f"wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
