"""The fastest correct path per device: bf16 autocast where the hardware computes bf16, and the
memory format that measures faster here.

Evidence (`depthlab bench --compare`, a 2-core AMD EPYC with AVX512-BF16, torch 2.14.1, ResNet-56,
batch 128, depthlab's whole step): fp32 NCHW 169 img/s, fp32 channels_last 217, bf16 autocast NCHW
298, bf16 autocast channels_last 335 (docs/performance.md). So neither choice is assumed:
precision follows the hardware's bf16 support, and on a CPU the memory format follows a short timing
that is kept in the cache folder, so every cell (and every resume) on this machine uses the same one.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import files
from .data import default_cache_dir
from .models import build_net
from .options import NetSpec

FORMAT_PROBE_BATCH = 128  # the training batch of the paper's recipe
FORMAT_PROBE_ROUNDS = 3  # timed passes per memory format, taking turns after one untimed pass each; the best counts
CHANNELS_LAST_MARGIN = 1.0  # channels_last when it measures faster at all: near a tie either format costs the same
FORMAT_CACHE = "memory-format.json"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: GPUs of compute capability 8.0 (Ampere) or later,
    x86 CPUs with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)  # torch < 2.3 lacks the probes: fp32


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` as it runs on `device`: auto is bf16 where the hardware has it, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def _pass_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    """The wall time of one forward and backward pass."""
    started = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return time.perf_counter() - started


def measure_channels_last_speedup(device: torch.device, bf16: bool) -> float:
    """How much faster a ResNet-20 training pass runs in channels_last than in NCHW here (> 1: faster).

    The formats take turns, so a change in the machine's load touches both alike; each keeps its
    best pass. About a second on a 2-core CPU.
    """
    torch.manual_seed(0)
    y = torch.randint(0, 10, (FORMAT_PROBE_BATCH,), device=device)
    x = torch.randn(FORMAT_PROBE_BATCH, 3, 32, 32, device=device)
    formats = (torch.contiguous_format, torch.channels_last)
    runs = {fmt: (build_net(NetSpec("residual", 20)).to(device, memory_format=fmt), x.contiguous(memory_format=fmt))
            for fmt in formats}
    best = {}
    for fmt, (model, inputs) in runs.items():
        _pass_seconds(model, inputs, y, bf16)  # untimed: the kernels' one-time setup
        best[fmt] = float("inf")
    for _ in range(FORMAT_PROBE_ROUNDS):
        for fmt, (model, inputs) in runs.items():
            best[fmt] = min(best[fmt], _pass_seconds(model, inputs, y, bf16))
    return best[torch.contiguous_format] / best[torch.channels_last]


def _machine_key(bf16: bool) -> str:
    """What a memory-format measurement holds for: this CPU, this torch, this precision.

    Not the thread count (a guess: the format's gain is in each kernel's vector loads, not in how
    threads share the work), so a sweep's worker processes, each with fewer threads, share the answer.
    """
    cpu = platform.processor() or _cpu_model()
    return f"{platform.machine()} {cpu} torch {torch.__version__} {'bf16' if bf16 else 'fp32'}"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "cpu"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")


def prepare_memory_formats(setting: bool | str, device: torch.device, precisions: set[str]) -> None:
    """Measure, before worker processes start, the memory formats they would each measure: they then read one answer."""
    for precision in sorted(precisions):
        resolve_channels_last(setting, device, resolve_precision(precision, device) == "bf16")


_measured: dict[str, float] = {}  # this process's own measurements, by machine key


def channels_last_speedup(bf16: bool) -> float:
    """channels_last's speedup on this CPU, measured once per machine and precision and kept in the cache folder.

    The stored answer wins over a new measurement: a sweep's cells, its worker processes and later
    resumes all train in the memory format measured first, so a cell's numbers never hang on a re-measurement.
    """
    path = default_cache_dir() / FORMAT_CACHE
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    key = _machine_key(bf16)
    entry = stored.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("speedup"), (int, float)):
        return float(entry["speedup"])
    if key not in _measured:
        _measured[key] = round(measure_channels_last_speedup(torch.device("cpu"), bf16), 3)
    try:
        files.write_json(path, {**stored, key: {"speedup": _measured[key]}})
    except OSError:
        pass  # a read-only cache: this process remembers it, others measure again
    return _measured[key]


def resolve_channels_last(setting: bool | str, device: torch.device, bf16: bool) -> bool:
    """`runtime.channels_last` as it runs: auto is on for GPUs (tensor cores read NHWC) and measured on a CPU."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and channels_last_speedup(bf16) > CHANNELS_LAST_MARGIN
