"""Training one cell: SGD with the paper's recipe, per-epoch metrics, checkpoints and resume.

The loop keeps the GPU busy: the data is already on the device, a batch is an index gather
plus batched augmentation, and the running loss and error are summed on the device and read
once per epoch. Each epoch's shuffling and augmentation come from a generator seeded with
(seed, epoch), so on the CPU a cell resumed from its checkpoint ends exactly where an
uninterrupted run of it would (on the same machine). On a GPU that holds only with
`runtime.deterministic`: cuDNN's autotuning may choose other kernels in the resumed process,
and some kernels add with atomics, so the last bits differ.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import files
from .config import Cell, RunLength, RuntimeSpec, TrainSpec
from .errors import DeviceError
from .events import CellEvents
from .data import Images, Normalizer, epoch_batches, eval_batches, training_batch
from .fastpath import resolve_channels_last, resolve_precision
from .grouped import build_grouped_net, grouped_outcome
from .results_folder import METRIC_COLUMNS, CellFolder, Summary
from .models import build_net, net_size
from .dynamics import training_dynamics

WARMUP_CHECK_EVERY = 20  # iterations between looks at the training error during warm-up
# The paper's ResNet-110 warm-up lasted "about 400 iterations". A net that never reaches the threshold
# must not train at the warm-up lr forever: the warm-up ends at WARMUP_MAX_ITERATIONS (a guess: 5× the
# paper's observed length) or at the first lr milestone, whichever comes first.
WARMUP_MAX_ITERATIONS = 2_000
COMPILE_STEPS = 2  # steps timed as compilation: the first compiles, the second records the CUDA graphs (cudagraph trees warm up once first)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor modes that replay the step as CUDA graphs
DEVICE_ERRORS = (torch.cuda.OutOfMemoryError,  # eager mode would fail the same way: never a reason to fall back
                 *([torch.AcceleratorError] if hasattr(torch, "AcceleratorError") else []))  # a CUDA fault; a plain RuntimeError in older torch
CUDAGRAPH_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"  # inductor's artifact logger for skipped captures (off by default)
REASONS_KEPT = 10  # a choice: distinct skip or recompile reasons kept per cell; counts are kept whole
REASON_CHARS = 300  # a choice: compiler messages run to pages
DYNAMICS_BATCH = 128  # a choice: images of the fixed batch on which gradients and branch ratios are recorded each epoch
PROGRESS_SECONDS = 2.0  # a choice, not measured: a live bar that moves, at a cost of one host clock read per step


def resolve_device(name: str) -> torch.device:
    """'auto' is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but no CUDA GPU is visible to torch (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def configure_device(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning (shapes are static, so it searches once per shape), or deterministic kernels on request.

    Deterministic mode gives up autotuning and atomic-add kernels so that a GPU run repeats bit
    for bit; an op with no deterministic kernel warns rather than stopping the run.
    """
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace, read when it starts


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_settings(device: torch.device) -> dict[str, bool | str]:
    """The process-wide settings that decide which kernels ran and in what precision, for the summary."""
    cuda = device.type == "cuda"
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": cuda and torch.backends.cudnn.benchmark,
            "conv_tf32": cuda and torch.backends.cudnn.allow_tf32,  # fp32 convolutions rounded to TF32 (cuDNN's default)
            "float32_matmul_precision": torch.get_float32_matmul_precision()}  # highest: fp32; high: TF32 on a GPU


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        threads = torch.get_num_threads()
        return f"{model.split(':', 1)[1].strip()} ({threads} thread{'' if threads == 1 else 's'})"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


@dataclass
class Schedule:
    """Learning rate per iteration: step decays at milestones, after an optional warm-up."""

    lr: float
    decay: float
    milestones: list[int]  # in iterations
    total: int  # iterations
    warmup_lr: float | None
    warmup_until_err: float

    @classmethod
    def for_cell(cls, spec: TrainSpec, length: RunLength) -> "Schedule":
        per = 1 if spec.iterations is not None else length.iterations_per_epoch
        return cls(spec.lr, spec.lr_decay, [m * per for m in spec.decay_points()], length.iterations, spec.warmup_lr,
                   spec.warmup_until_err)

    def warmup_limit(self) -> int:
        """The iteration by which a warm-up ends even if the error never fell below the threshold."""
        return min([WARMUP_MAX_ITERATIONS, *self.milestones])

    def lr_at(self, iteration: int, warming_up: bool) -> float:
        if warming_up and self.warmup_lr is not None:
            return self.warmup_lr
        return float(f"{self.lr * self.decay ** sum(iteration >= m for m in self.milestones):.12g}")  # 0.001, not 0.0010000000000000002


def compiler_errors() -> tuple[type[Exception], ...]:
    """The compiler failing, which eager mode does not need.

    Inductor wraps whatever fails inside it (a missing Triton, a C++ build) in InductorError, a
    BackendCompilerFailed. Looked up on demand: importing torch._dynamo takes seconds that eager
    runs need not spend.
    """
    exc = torch._dynamo.exc
    return exc.BackendCompilerFailed, exc.TorchRuntimeError, exc.Unsupported, exc.InternalTorchDynamoError


def device_error_inside(err: BaseException) -> Optional[BaseException]:
    """The out-of-memory or device error that a compiler error wraps, if any (autotuning runs kernels too)."""
    while err is not None:
        if isinstance(err, DEVICE_ERRORS):
            return err
        err = getattr(err, "inner_exception", None) or err.__cause__
    return None


def one_line(err: BaseException) -> str:
    """An exception as one short line, for a summary."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:REASON_CHARS]


class _Messages(logging.Handler):
    """Keeps the messages a logger emits, so that a cell can record them whatever the log settings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split())[:REASON_CHARS])


_cudagraph_skips = _Messages()


def _listen_for_cudagraph_skips() -> _Messages:
    """Attach the recorder to inductor's CUDA-graph logger once per process (it logs a skipped capture there only)."""
    logger = logging.getLogger(CUDAGRAPH_LOGGER)
    if _cudagraph_skips not in logger.handlers:
        logger.addHandler(_cudagraph_skips)
    return _cudagraph_skips


@dataclass
class CompileRecord:
    """How the compiled step really ran, from dynamo's and inductor's own counters (what was asked is apart).

    `steps` counts the steps of a compiling TrainStep, `eager_steps` those whose forward ran in
    Python, not in a graph (dynamo hit its recompile limit or skipped the frame): a step that
    was asked to compile and ran eagerly says so here.
    """

    steps: int = 0
    eager_steps: int = 0
    dynamo_graphs: int = 0  # graphs dynamo compiled (a seed of a net already compiled in the process reuses its graphs: 0)
    dynamo_recompiles: int = 0  # of those, compiled because a cached graph's guards failed
    graph_breaks: int = 0
    cudagraph_skips: int = 0  # graphs inductor compiled but did not capture in CUDA graphs
    recompile_reasons: list[str] = field(default_factory=list)
    cudagraph_skip_reasons: list[str] = field(default_factory=list)

    COUNTS = ("steps", "eager_steps", "dynamo_graphs", "dynamo_recompiles", "graph_breaks", "cudagraph_skips")

    def add(self, other: "CompileRecord") -> None:
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("recompile_reasons", "cudagraph_skip_reasons"):
            mine = getattr(self, name)
            mine.extend(reason for reason in getattr(other, name) if reason not in mine)
            del mine[REASONS_KEPT:]


class _CompileCounters:
    """A snapshot of the process's compile counters; `since` gives what happened after it."""

    def __init__(self) -> None:
        from torch._dynamo.utils import counters

        self.counters = counters
        self.graphs, self.breaks, self.skips = self._totals()
        self.skip_messages = len(_listen_for_cudagraph_skips().messages)
        self.started_us = time.time_ns() // 1000

    def _totals(self) -> tuple[int, int, int]:
        counters = self.counters
        return (counters["stats"]["unique_graphs"], sum(sum(c.values()) for c in counters["graph_break"].values()),
                counters["inductor"]["cudagraph_skips"])

    def since(self, steps: int, eager_steps: int) -> CompileRecord:
        from torch._dynamo.utils import get_compilation_metrics

        graphs, breaks, skips = self._totals()
        reasons = [m.recompile_reason for m in get_compilation_metrics()
                   if m.recompile_reason and (m.start_time_us or 0) >= self.started_us]
        skip_reasons = list(dict.fromkeys(_cudagraph_skips.messages[self.skip_messages:]))
        return CompileRecord(steps=steps, eager_steps=eager_steps, dynamo_graphs=max(0, graphs - self.graphs),
                             dynamo_recompiles=len(reasons), graph_breaks=max(0, breaks - self.breaks),
                             cudagraph_skips=max(0, skips - self.skips),
                             recompile_reasons=list(dict.fromkeys(r[:REASON_CHARS] for r in reasons))[:REASONS_KEPT],
                             cudagraph_skip_reasons=skip_reasons[:REASONS_KEPT])


EXECUTIONS = ("eager-fallback", "eager", "partly-compiled", "compiled-without-cudagraphs", "compiled")  # least compiled first


def derive_execution(compile_mode: str, fallback_reason: Optional[str], record: CompileRecord, cudagraphs_asked: bool,
                     cudagraphs_failed: bool) -> str:
    """What trained, from the counts: eager when every step's forward ran in Python, whatever was requested."""
    if compile_mode == "none":
        return "eager"
    if fallback_reason:
        return "eager-fallback"
    if record.steps and record.eager_steps == record.steps:
        return "eager"
    if record.eager_steps:
        return "partly-compiled"
    if cudagraphs_asked and (cudagraphs_failed or record.cudagraph_skips):
        return "compiled-without-cudagraphs"
    return "compiled"


def combine_executions(executions: list[str]) -> str:
    """One cell's execution over the processes (and epochs) that trained it: a mix of eager and compiled is partly so."""
    kinds = set(executions)
    if not kinds:
        return "eager"
    if "eager-fallback" in kinds:
        return "eager-fallback"
    if "eager" in kinds and kinds != {"eager"}:
        return "partly-compiled"
    return min(kinds, key=EXECUTIONS.index)


class _CountedForward(nn.Module):
    """The model as a compiled step calls it, counting the calls that run in Python rather than in a graph.

    The count sits in the frame dynamo compiles, so when dynamo gives up on that frame (its limit of
    graphs per function, a skipped frame) the count runs; inside a graph it was traced away.
    """

    def __init__(self, model: nn.Module, step: "TrainStep"):
        super().__init__()
        self.model, self.step = model, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # while tracing this is True, and the count is not traced
            self.step.eager_steps += 1
        return self.model(x)


def one_net_outcome(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's loss for one net: (the loss to step on, the loss to report, the count of wrong answers)."""
    loss = F.cross_entropy(logits, y)
    return loss, loss, (logits.detach().argmax(1) != y).sum()


class TrainStep:
    """One SGD step on a batch, optionally graph-compiled; returns loss and error count on the device.

    When the compiler fails, the step trains eagerly from then on and keeps the reason in
    `fallback_reason`; a device error (out of memory, a CUDA fault) is raised instead, as eager
    mode would meet it too. When recording or replaying the step's CUDA graphs fails, the step
    compiles again without CUDA graphs and retries once (`cudagraphs_fallback_reason`); only if
    that retry fails too is the original error raised. The first COMPILE_STEPS compiled steps
    (and a recompilation without CUDA graphs) are timed into `compile_seconds`, so that training
    time and throughput leave compilation out; a compile that failed goes to
    `failed_compile_seconds`. `record()` says how the steps really ran.
    `backend` is torch.compile's; tests pass a cheap one (`aot_eager`) or a recording function.
    `outcome` turns logits and labels into the loss (see one_net_outcome; a grouped model's gives one loss per net).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, bf16: bool, compile_mode: str,
                 backend: str | Callable = "inductor", outcome: Callable = one_net_outcome):
        self.model, self.optimizer, self.bf16, self.outcome = model, optimizer, bf16, outcome
        self.compile_mode, self.backend = compile_mode, backend
        self.compiled = compile_mode != "none"
        self.cudagraphs = self.compiled and backend == "inductor" and compile_mode in CUDA_GRAPH_MODES
        self.cudagraphs_asked = self.cudagraphs
        self.steps = self.eager_steps = 0
        self.forward = self._compile(compile_mode) if self.compiled else model
        self.fallback_reason: Optional[str] = None
        self.cudagraphs_fallback_reason: Optional[str] = None
        self.compile_seconds = 0.0
        self.failed_compile_seconds = 0.0
        self.timed_steps = 0
        self._counters = _CompileCounters() if self.compiled else None

    def _compile(self, mode: str) -> Callable:
        inductor_mode = mode if self.backend == "inductor" and mode != "default" else None  # other backends take no mode
        return torch.compile(_CountedForward(self.model, self), backend=self.backend, mode=inductor_mode)

    @property
    def execution(self) -> str:
        """What trains, from this process's counts: see derive_execution."""
        return derive_execution(self.compile_mode, self.fallback_reason, self.record(), self.cudagraphs_asked,
                                self.cudagraphs_fallback_reason is not None)

    def record(self) -> CompileRecord:
        """How this process's steps ran so far (all zeros for an eager step)."""
        if self._counters is None:
            return CompileRecord()
        return self._counters.since(self.steps, self.eager_steps)

    @property
    def backend_name(self) -> str:
        return self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", repr(self.backend))

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
            loss, reported, wrong = self.outcome(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return reported.detach().float(), wrong

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.compiled:
            return self._run(x, y)
        self.steps += 1
        if self.timed_steps >= COMPILE_STEPS:
            return self._run_or_fall_back(x, y)
        synchronize(x.device)
        started, booked = time.perf_counter(), self.compile_seconds
        result = self._run_or_fall_back(x, y)
        synchronize(x.device)
        elapsed = time.perf_counter() - started - (self.compile_seconds - booked)  # a recompilation books its own time
        if self.fallback_reason:
            self.failed_compile_seconds += elapsed  # the compile failed: neither compilation nor training
        else:
            self.compile_seconds += elapsed
        self.timed_steps += 1
        return result

    def _run_or_fall_back(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._run(x, y)
        except Exception as err:
            if isinstance(err, compiler_errors()):
                device_error = device_error_inside(err)
                if device_error is not None:
                    raise device_error from err
                return self._fall_back_to_eager(err, x, y)
            if self.cudagraphs and not isinstance(err, torch.cuda.OutOfMemoryError):
                return self._fall_back_from_cudagraphs(err, x, y)
            raise

    def _fall_back_to_eager(self, err: Exception, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.fallback_reason = one_line(err)
        warnings.warn(f"torch.compile failed ({self.fallback_reason}); training this cell eagerly")
        self.forward, self.compiled, self.cudagraphs = self.model, False, False
        return self._run(x, y)

    def _fall_back_from_cudagraphs(self, err: Exception, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record or replay of a CUDA graph failed: compile again without CUDA graphs and retry this step once.

        The step's gradients are cleared before each backward and the optimizer runs after it, so a
        step that failed in its forward or backward left the weights as they were (BatchNorm's
        running statistics may have moved once more).
        """
        synchronize(x.device)
        started = time.perf_counter()
        torch._dynamo.reset()  # drops the graphs, their CUDA-graph trees and memory pool
        forget_compiled_nets()
        self.cudagraphs = False
        self.forward = self._compile("default")
        try:
            result = self._run_or_fall_back(x, y)
        except Exception as retry_error:
            raise err from retry_error  # not the CUDA graphs: the original error stands
        synchronize(x.device)
        self.cudagraphs_fallback_reason = one_line(err)
        warnings.warn(f"CUDA graphs failed ({self.cudagraphs_fallback_reason}); training this cell compiled without them")
        self.compile_seconds += time.perf_counter() - started
        return result


def make_optimizer(model: nn.Module, spec: TrainSpec, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter; fused kernels on the GPU."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, **fast)


def resolve_compile(mode: str, device: torch.device) -> str:
    """'auto' captures the step in CUDA graphs on a GPU and stays eager on the CPU."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    return mode


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Normalizer, batch_size: int, bf16: bool,
             memory_format: torch.memory_format = torch.contiguous_format, members: int | None = None) -> tuple[Metric, Metric]:
    """Mean loss and error (%) in eval mode without augmentation, in large batches, on the training step's fast path.

    `members`: the model is that many nets grouped (grouped.py); each sees the same images, and each gets its own numbers.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(() if members is None else (members,), device=x.device)
    errors = torch.zeros_like(loss_sum, dtype=torch.long)
    for part in eval_batches(len(y), batch_size):
        images = normalize(x[part]).contiguous(memory_format=memory_format)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images if members is None else images.repeat(1, members, *[1] * (images.dim() - 2)))
        if members is None:
            loss_sum += F.cross_entropy(logits.float(), y[part], reduction="sum")
            errors += (logits.argmax(1) != y[part]).sum()
        else:
            per_net, labels = logits.float().unflatten(1, (members, -1)), y[part, None].expand(-1, members)
            loss_sum += F.cross_entropy(per_net.transpose(1, 2), labels, reduction="none").sum(0)
            errors += (per_net.argmax(2) != labels).sum(0)
    model.train(was_training)
    loss, err = torch.stack([loss_sum, errors.float()]).tolist()
    return per_image(loss, len(y)), per_image(err, len(y), 100.0)


Metric = float | list[float]  # one net's number, or one per net of a grouped model


def per_image(total: Metric, images: int, scale: float = 1.0) -> Metric:
    """A sum over images as a mean (× scale), for one net or each net of a group."""
    if isinstance(total, list):
        return [scale * value / images for value in total]
    return scale * total / images


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The RNG of one epoch's shuffle and augmentation: a function of (seed, epoch) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


class Throttled:
    """Passes an iteration count on to `report` at most once per `seconds` of wall time.

    It reads the host clock and a Python int, never the device, so it adds no synchronisation
    (on a GPU the count is of steps queued, which run ahead of those finished by a few).
    """

    def __init__(self, report: Callable[[int], None], seconds: float):
        self.report, self.seconds, self.last = report, seconds, time.monotonic()

    def __call__(self, iterations: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            self.report(iterations)


@dataclass
class TrainState:
    """The loop's progress, saved in each checkpoint: enough to continue exactly where it stopped."""

    epoch: int = 0
    iteration: int = 0
    rows: list[dict] = field(default_factory=list)  # metrics.csv so far
    dynamics: list[dict] = field(default_factory=list)  # dynamics.csv so far
    warming_up: bool = False
    train_seconds: float = 0.0  # the training loop, less compilation and evaluation
    compile_seconds: float = 0.0  # the compiled steps timed as compilation, in every process that trained the cell
    failed_compile_seconds: float = 0.0  # compiles that failed (the step then trained eagerly)
    fallback_reason: Optional[str] = None  # why a process gave up compiling and trained eagerly
    cudagraphs_fallback_reason: Optional[str] = None  # why a process gave up CUDA graphs and trained compiled without them
    executions: list[str] = field(default_factory=list)  # how each process's steps ran so far (derive_execution)
    compile_record: dict = field(default_factory=dict)  # CompileRecord of every process, summed
    warmup_ended_at: Optional[int] = None  # the iteration at which the warm-up lr gave way to the schedule


@dataclass
class TrainingSetup:
    """What one cell trains with: the model, its optimizer, the step, its precision and the inputs' memory format."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    memory_format: torch.memory_format
    precision: str  # fp32 | bf16: train.precision resolved on this device

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def memory_format_name(self) -> str:
        """The memory format's name, for the summary."""
        return "channels_last" if self.memory_format == torch.channels_last else "nchw"


_compiled_nets: set[tuple] = set()  # what this process compiled since dynamo's last reset


def forget_compiled_nets() -> None:
    """After torch._dynamo.reset(): nothing compiled is kept."""
    _compiled_nets.clear()


def recompile_limit() -> int:
    """dynamo's graphs per function (8 by default; `cache_size_limit` in torch < 2.6)."""
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", 8))


def _keep_or_reset_compiled(key: tuple) -> None:
    """Compile each distinct net once per process: a net already compiled reuses its graphs (another seed
    is the same graph with other weights); dynamo is reset only when one more net would pass its limit of
    graphs per function, beyond which it would run the net eagerly without a word."""
    if key in _compiled_nets:
        return
    if len(_compiled_nets) >= recompile_limit():
        torch._dynamo.reset()
        forget_compiled_nets()
    _compiled_nets.add(key)


def build_training_setup(cell: Cell, device: torch.device, runtime: RuntimeSpec, compile_backend: str | Callable = "inductor",
                         members: int | None = None) -> TrainingSetup:
    """The model (initialised from the cell's seed alone), optimizer and step that `train_cell` and `bench` both use.

    `members`: that many nets of the cell's spec as one grouped model (grouped.py), whose weights the caller packs in.
    """
    configure_device(device, runtime.deterministic)
    compile_mode = resolve_compile(runtime.compile, device)
    torch.manual_seed(cell.seed)
    model = (build_net(cell.net_spec()) if members is None else build_grouped_net(cell.net_spec(), members)).to(device)
    precision = resolve_precision(cell.train.precision, device)
    channels_last = resolve_channels_last(runtime.channels_last, device, precision == "bf16")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if compile_mode != "none":
        backend = compile_backend if isinstance(compile_backend, str) else id(compile_backend)
        _keep_or_reset_compiled((cell.net_spec(), members, cell.train.batch_size, precision, channels_last, compile_mode, backend,
                                 str(device)))
    model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, cell.train, device)
    outcome = one_net_outcome if members is None else grouped_outcome(members)
    step = TrainStep(model, optimizer, precision == "bf16", compile_mode, compile_backend, outcome)
    return TrainingSetup(model, optimizer, step, memory_format, precision)


def usable_cores() -> int:
    """The cores this process may run on: under `taskset` or a container's CPU set, fewer than the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare_worker_process(device: torch.device, jobs: int, compile_mode: str) -> None:
    """A worker's share of the machine: its GPU, or on a CPU its share of the cores for torch's threads; and
    its share of the cores for inductor's compile workers (by default each process starts as many as the machine has)."""
    share = max(1, usable_cores() // jobs)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(share)
    if compile_mode != "none":
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = share


def train_epoch(step: TrainStep, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], schedule: Schedule,
                state: TrainState, device: torch.device,
                progress: Callable[[int], None] | None = None, members: int | None = None) -> tuple[Metric, Metric, float]:
    """One pass over the batches (or what is left of the iteration budget): running loss, error % and the last lr.

    Advances `state.iteration` and ends the warm-up in `state`; `progress` gets the count of
    this epoch's iterations after each step. Loss and errors are summed on the
    device and read once at the end. During a warm-up the error of each window of
    WARMUP_CHECK_EVERY batches is read to decide when it ends; a window also closes at the end of
    the epoch, so epochs shorter than a window still end the warm-up, and windows restart with each
    epoch, so a run resumed at an epoch boundary decides exactly as before.
    `members`: the step trains that many nets grouped, and loss and error come back per net (no warm-up then).
    """
    loss_sum = torch.zeros(() if members is None else (members,), device=device)
    errors = torch.zeros_like(loss_sum, dtype=torch.long)
    window_errors = torch.zeros((), device=device, dtype=torch.long)
    seen = window_seen = 0

    def close_window() -> None:  # the only host syncs, and only during warm-up
        nonlocal window_seen
        below = 100.0 * window_errors.item() / window_seen < schedule.warmup_until_err
        if below or state.iteration >= schedule.warmup_limit():
            state.warming_up, state.warmup_ended_at = False, state.iteration
        window_errors.zero_()
        window_seen = 0

    first_iteration = state.iteration
    lr = schedule.lr_at(state.iteration, state.warming_up)
    for x, y in batches:
        if state.iteration >= schedule.total:
            break
        lr = schedule.lr_at(state.iteration, state.warming_up)
        for group in step.optimizer.param_groups:
            group["lr"] = lr
        loss, wrong = step(x, y)
        loss_sum += loss * len(y)
        errors += wrong
        seen += len(y)
        state.iteration += 1
        if progress is not None:
            progress(state.iteration - first_iteration)
        if state.warming_up:
            window_errors += wrong
            window_seen += len(y)
            if window_seen == WARMUP_CHECK_EVERY * len(y):
                close_window()
    if state.warming_up and window_seen:
        close_window()
    total_loss, wrong_count = torch.stack([loss_sum, errors.float()]).tolist()
    return per_image(total_loss, seen), per_image(wrong_count, seen, 100.0), lr


def resume_state(folder: CellFolder, cell: Cell, setup: TrainingSetup, device: torch.device) -> TrainState:
    """The state saved after the last finished epoch (weights and optimizer restored), or a fresh one."""
    if not folder.checkpoint.is_file():
        return TrainState(warming_up=cell.train.warmup_lr is not None)
    saved = torch.load(folder.checkpoint, map_location=device, weights_only=False)
    if saved["fingerprint"] != cell.fingerprint():
        raise RuntimeError(f"{folder.checkpoint} belongs to a different configuration of {cell.id}")
    setup.model.load_state_dict(saved["model"])
    setup.optimizer.load_state_dict(saved["optimizer"])
    return TrainState(**saved["state"])


def save_epoch(folder: CellFolder, cell: Cell, setup: TrainingSetup, state: TrainState) -> None:
    """dynamics.csv, metrics.csv and the checkpoint after an epoch, each written atomically."""
    if state.dynamics:
        files.write_text(folder.dynamics, pd.DataFrame(state.dynamics).to_csv(index=False))
    files.write_text(folder.metrics, pd.DataFrame(state.rows, columns=list(METRIC_COLUMNS)).to_csv(index=False))
    files.save_torch(folder.checkpoint, {"fingerprint": cell.fingerprint(), "model": setup.model.state_dict(),
                                         "optimizer": setup.optimizer.state_dict(), "state": asdict(state)})


def train_cell(cell: Cell, images: Images, device: torch.device, runtime: RuntimeSpec, cell_dir: Path,
               events: CellEvents | None = None, stop_after_epochs: int | None = None,
               compile_backend: str | Callable = "inductor") -> dict:
    """Train `cell` on `images` (already on `device`), writing metrics, checkpoints and a summary to `cell_dir`.

    Resumes from the cell's checkpoint when one exists. `stop_after_epochs` ends the call early
    (as an interruption would), leaving the checkpoint for a later call to continue from.
    `compile_backend` is torch.compile's backend when `runtime.compile` compiles.
    """
    folder = CellFolder(cell_dir)
    spec = cell.train
    n_train = len(images.train_y)
    try:
        length = spec.run_length(n_train)
    except ValueError as err:
        raise ValueError(f"{cell.id}: {err}") from None
    schedule = Schedule.for_cell(spec, length)
    setup = build_training_setup(cell, device, runtime, compile_backend)
    normalize = Normalizer(images.train_x, cell.data.normalize)
    fixed = slice(0, min(DYNAMICS_BATCH, n_train))  # the same images every epoch, unaugmented
    dynamics_batch = normalize(images.train_x[fixed]).contiguous(memory_format=setup.memory_format), images.train_y[fixed]

    def evaluate_on(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        return evaluate(setup.model, x, y, normalize, runtime.eval_batch_size, setup.bf16, setup.memory_format)

    state = resume_state(folder, cell, setup, device)
    write_cell_config(folder, cell, length)
    if events:
        events.cell_started(cell.id, length.epochs, state.epoch)
    progress = Throttled(lambda done: events.epoch_progress(cell.id, state.epoch + 1, done, length.iterations_per_epoch),
                         PROGRESS_SECONDS) if events else None

    diverged = False
    epochs_this_call = 0
    while state.iteration < schedule.total and not diverged:
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            return {"id": cell.id, "status": "interrupted", "epochs": state.epoch}
        started, compiled_before, failed_before = time.perf_counter(), setup.step.compile_seconds, setup.step.failed_compile_seconds
        record_before = setup.step.record()
        setup.model.train()
        generator = epoch_generator(cell.seed, state.epoch, device)
        batches = ((training_batch(images.train_x, index, normalize, generator, setup.memory_format), images.train_y[index])
                   for index in epoch_batches(n_train, spec.batch_size, generator, device))
        train_loss, train_err, lr = train_epoch(setup.step, batches, schedule, state, device, progress)
        diverged = not math.isfinite(train_loss)
        book_training_time(state, setup.step, time.perf_counter() - started, setup.step.compile_seconds - compiled_before,
                            setup.step.failed_compile_seconds - failed_before, epoch_record(record_before, setup.step.record()))
        row = {"epoch": state.epoch + 1, "iteration": state.iteration, "lr": lr, "train_loss": train_loss, "train_err": train_err}
        if not diverged:
            state.dynamics.append({"epoch": state.epoch + 1, **training_dynamics(setup.model, *dynamics_batch, setup.bf16)})
        row["test_loss"], row["test_err"] = evaluate_on(images.test_x, images.test_y)
        if images.val_y is not None:
            row["val_loss"], row["val_err"] = evaluate_on(images.val_x, images.val_y)
        row["seconds"] = time.perf_counter() - started
        state.epoch += 1
        state.rows.append(row)
        epochs_this_call += 1
        save_epoch(folder, cell, setup, state)
        if events:
            events.epoch_done(cell.id, row)

    clean = None if diverged else evaluate_on(images.train_x, images.train_y)
    return end_cell(folder, cell, state, clean, device, runtime, setup)


def write_cell_config(folder: CellFolder, cell: Cell, length: RunLength) -> None:
    """config.json: what the cell trains, written when its training starts or resumes."""
    files.write_json(folder.config, {**cell.to_record(), "fingerprint": cell.fingerprint(), "data_path": cell.data.path,
                                     "run_length": asdict(length)})


def end_cell(folder: CellFolder, cell: Cell, state: TrainState, clean: tuple[float, float] | None, device: torch.device,
             runtime: RuntimeSpec, setup: TrainingSetup, group_size: int = 1) -> Summary:
    """Write an ended cell's weights, summary and DONE and drop its checkpoint; `clean` is None when it diverged,
    else its clean training (loss, error). `setup.model` holds this cell's own weights; `group_size` counts the nets
    it last trained beside as one grouped model (group_training.py), itself included."""
    summary = _summary(cell, state, clean is None, device, runtime, setup)
    summary["group_size"] = group_size
    if clean is not None:
        summary["final"].update(clean_train_loss=clean[0], clean_train_err=clean[1])
        files.save_torch(folder.weights, setup.model.state_dict())
    files.write_json(folder.summary, summary)
    folder.mark_done(cell.fingerprint())
    folder.checkpoint.unlink(missing_ok=True)
    return summary


def book_training_time(state: TrainState, step: TrainStep, elapsed: float, compiling: float, failed: float,
                        record: CompileRecord) -> None:
    """Split an epoch's training-loop time into compilation and training, and add how the epoch's steps ran.

    `record` is this epoch's part of the step's counts; the process's execution so far joins the cell's.
    """
    state.compile_seconds += compiling
    state.failed_compile_seconds += failed
    state.train_seconds += elapsed - compiling - failed
    state.fallback_reason = state.fallback_reason or step.fallback_reason
    state.cudagraphs_fallback_reason = state.cudagraphs_fallback_reason or step.cudagraphs_fallback_reason
    total = CompileRecord(**state.compile_record)
    total.add(record)
    state.compile_record = asdict(total)
    if step.execution not in state.executions:
        state.executions.append(step.execution)


def epoch_record(before: CompileRecord, after: CompileRecord) -> CompileRecord:
    """What one epoch added to a process's counts (reasons: those first seen in it)."""
    counts = {name: getattr(after, name) - getattr(before, name) for name in CompileRecord.COUNTS}
    return CompileRecord(**counts, recompile_reasons=[r for r in after.recompile_reasons if r not in before.recompile_reasons],
                         cudagraph_skip_reasons=[r for r in after.cudagraph_skip_reasons if r not in before.cudagraph_skip_reasons])


def _summary(cell: Cell, state: TrainState, diverged: bool, device: torch.device, runtime: RuntimeSpec,
             setup: TrainingSetup) -> Summary:
    """summary.json of an ended cell (the clean training error is added by the caller when there is one).

    `images_per_second` counts every step, though the few timed as compilation are not in `train_seconds`.
    """
    params, macs = net_size(cell.net_spec())
    last = state.rows[-1]
    step = setup.step
    return Summary(**cell.to_record(), fingerprint=cell.fingerprint(), status="diverged" if diverged else "finished",
                   params=params, macs=macs, epochs=state.epoch, iterations=state.iteration,
                   train_seconds=state.train_seconds, device=str(device), device_name=device_name(device),
                   cpu_threads=torch.get_num_threads(), warmup_ended_at=state.warmup_ended_at,
                   finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   images_per_second=state.iteration * cell.train.batch_size / max(state.train_seconds, 1e-9),
                   final={k: v for k, v in last.items() if k not in ("epoch", "iteration", "lr", "seconds")},
                   compile_requested=runtime.compile, compile_mode=step.compile_mode, compile_backend=step.backend_name,
                   execution=combine_executions(state.executions), fallback_reason=state.fallback_reason,
                   compile_seconds=state.compile_seconds, failed_compile_seconds=state.failed_compile_seconds,
                   cudagraphs_fallback_reason=state.cudagraphs_fallback_reason,
                   **{key: value for key, value in CompileRecord(**state.compile_record).__dict__.items() if key != "steps"},
                   precision=setup.precision, memory_format=setup.memory_format_name,
                   **kernel_settings(device))
