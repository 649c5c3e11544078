"""The GPU path's failure modes, shown on the CPU: a worker that dies is an error, never a hang; each cell
records how its step really ran; a CUDA-graph failure falls back within the cell; each net compiles once per
process; the project runs as `python -m depthlab`; and the first GPU run's checks run (GPU parts skipped) here.

torch.compile runs with `aot_eager` (as in test_compile.py); inductor's CUDA-graph messages and failures are
injected by a backend at the points where inductor would raise or log them on a GPU.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo import lookup_backend

import depthlab.bench as bench_module
import depthlab.fastpath as fastpath
import depthlab.gpu_check as gpu_check
import depthlab.pool as pool_module
import depthlab.train as train_module
from depthlab.bench import BenchOptions, BenchWorkerError, concurrent_rate
from depthlab.config import RuntimeSpec, parse_config
from depthlab.data import synthetic_images
from depthlab.attempt import CellOutcome
from depthlab.pool import compile_key, next_cell, serve
from depthlab.sweep import exclusive
from depthlab.train import TrainStep, forget_compiled_nets, build_training_setup, prepare_worker_process, train_cell

from .conftest import tiny_sweep
from .test_compile import RecordingBackend, failing_backend

CPU = torch.device("cpu")
COMPILED = RuntimeSpec(device="cpu", compile="default")
EAGER = RuntimeSpec(device="cpu", compile="none")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def nchw_without_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's memory-format probe takes seconds per fresh cache: these tests train NCHW without it."""
    monkeypatch.setattr(fastpath, "channels_last_speedup", lambda bf16: 1.0)


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test starts and ends with nothing compiled in this process."""
    torch._dynamo.reset()
    forget_compiled_nets()
    yield
    torch._dynamo.reset()
    forget_compiled_nets()


def tiny_cells(**grid) -> list:
    return parse_config(tiny_sweep(data={"source": "synthetic", "train_size": 64, "test_size": 32},
                                   train={"epochs": 1, "batch_size": 32}, grid={"depth": 8, "seed": 0, **grid})).cells


BATCH = synthetic_images(8, 8).train_x.float(), torch.arange(8) % 10


# ----------------------------------------------------------------------------- how the step ran


def test_a_cell_asked_to_compile_that_dynamo_ran_eagerly_is_recorded_as_eager(tmp_path: Path) -> None:
    cell = tiny_cells(arch="residual")[0]
    with torch._dynamo.config.patch(recompile_limit=0):  # dynamo then runs every frame in Python
        summary = train_cell(cell, synthetic_images(64, 32), CPU, COMPILED, tmp_path, compile_backend="aot_eager")
    assert (summary["compile_requested"], summary["compile_mode"], summary["execution"]) == ("default", "default", "eager")
    assert summary["eager_steps"] == summary["iterations"] == 2 and summary["dynamo_graphs"] == 0
    assert summary["fallback_reason"] is None


def test_a_net_past_dynamo_s_limit_that_ran_eagerly_says_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a worker without the reset met: its next net ran in Python while the step still asked to compile."""
    monkeypatch.setattr(train_module, "_keep_or_reset_compiled", lambda key: None)
    with torch._dynamo.config.patch(recompile_limit=1):
        executions = []
        for cell in tiny_cells(arch="plain") + tiny_cells(arch="residual"):
            step = build_training_setup(cell, CPU, COMPILED, "aot_eager").step
            step(*BATCH)
            step(*BATCH)
            executions.append((step.execution, step.eager_steps, step.record().dynamo_graphs))
    assert executions == [("compiled", 0, 1), ("eager", 2, 0)]


def test_a_compiled_cell_records_its_graphs_and_no_eager_step(tmp_path: Path) -> None:
    summary = train_cell(tiny_cells(arch="residual")[0], synthetic_images(64, 32), CPU, COMPILED, tmp_path, compile_backend="aot_eager")
    assert summary["execution"] == "compiled"
    assert (summary["eager_steps"], summary["dynamo_graphs"], summary["dynamo_recompiles"], summary["cudagraph_skips"]) == (0, 1, 0, 0)


def test_each_net_compiles_once_per_process_and_dynamo_resets_only_when_one_more_net_would_pass_its_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    resets, reset = [], torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or reset())
    plain, residual_s0, residual_s1, residual_b = tiny_cells(arch="plain") + tiny_cells(arch="residual", seed=[0, 1]) + \
        tiny_cells(arch="residual", shortcut="B")
    backend, seen = RecordingBackend(), []
    with torch._dynamo.config.patch(recompile_limit=2):
        for cell in (residual_s0, residual_s1, plain, residual_b):  # the third distinct net would be dynamo's third graph
            step = build_training_setup(cell, CPU, COMPILED, backend).step
            step(*BATCH)
            seen.append((cell.id, step.record().dynamo_graphs, step.execution, len(resets)))
    assert seen == [(residual_s0.id, 1, "compiled", 0), (residual_s1.id, 0, "compiled", 0),  # another seed: the same graph
                    (plain.id, 1, "compiled", 0), (residual_b.id, 1, "compiled", 1)]
    assert backend.graphs == 3


def skipping_backend(message: str):
    """aot_eager that reports a skipped CUDA-graph capture the way inductor does (its logger and counter)."""

    def compile_and_skip(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

        log_cudagraph_skip_and_bump_counter(message)
        return lookup_backend("aot_eager")(graph, example_inputs)

    return compile_and_skip


def linear_step(backend, cudagraphs: bool = False) -> TrainStep:
    """A step around a linear model on flattened images (eager without a backend), as if compiled for CUDA graphs
    when `cudagraphs`; its weights come from seed 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    mode = "none" if backend is None else "reduce-overhead" if cudagraphs else "default"
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), bf16=False, compile_mode=mode, backend=backend or "inductor")
    step.cudagraphs = step.cudagraphs_asked = cudagraphs  # what inductor's CUDA-graph modes set
    return step


def test_a_skipped_cuda_graph_capture_is_counted_with_inductor_s_reason() -> None:
    message = "skipping cudagraphs due to mutated inputs (1 instances)"
    step = linear_step(skipping_backend(message), cudagraphs=True)
    step(*BATCH)
    record = step.record()
    assert (record.cudagraph_skips, record.cudagraph_skip_reasons) == (1, [message])
    assert step.execution == "compiled-without-cudagraphs"


def failing_first_graph(error: Exception):
    """A backend whose first compiled graph raises `error` when it runs (a failed CUDA-graph recording); later ones work."""
    compiled = []

    def compile_(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        inner = lookup_backend("aot_eager")(graph, example_inputs)
        compiled.append(inner)
        if len(compiled) > 1:
            return inner

        def run(*args: torch.Tensor) -> object:
            raise error
        return run

    return compile_


def test_a_cuda_graph_failure_recompiles_the_step_without_graphs_and_the_cell_trains_on_unchanged() -> None:
    error = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    step, eager = linear_step(failing_first_graph(error), cudagraphs=True), linear_step(None)
    with pytest.warns(UserWarning, match="training this cell compiled without them"):
        for _ in range(2):
            step(*BATCH)
    for _ in range(2):
        eager(*BATCH)
    assert all(torch.equal(a, b) for a, b in zip(step.model.state_dict().values(), eager.model.state_dict().values()))
    assert "operation not permitted when stream is capturing" in step.cudagraphs_fallback_reason
    assert step.fallback_reason is None and not step.cudagraphs and step.execution == "compiled-without-cudagraphs"
    assert step.compile_seconds > 0


def test_an_error_that_recurs_without_cuda_graphs_is_raised_after_one_retry() -> None:
    error = RuntimeError("CUDA error: an illegal memory access was encountered")

    def always_failing(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args: torch.Tensor) -> object:
            raise error
        return run

    step = linear_step(always_failing, cudagraphs=True)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        step(*BATCH)
    assert step.cudagraphs_fallback_reason is None


def test_a_failed_compile_is_not_compile_time() -> None:
    step = linear_step(failing_backend(RuntimeError("no C++ compiler")))
    with pytest.warns(UserWarning, match="training this cell eagerly"):
        step(*BATCH)
    assert step.compile_seconds == 0.0 and step.failed_compile_seconds > 0 and step.execution == "eager-fallback"


def test_a_worker_takes_its_share_of_the_cores_for_torch_and_for_inductor_s_compile_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", inductor_config.compile_threads)  # restored after the test
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's cores; the process may run on 16 of them
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    try:
        prepare_worker_process(CPU, 4, "default")
        assert (torch.get_num_threads(), inductor_config.compile_threads) == (4, 4)
        prepare_worker_process(CPU, 32, "default")
        assert (torch.get_num_threads(), inductor_config.compile_threads) == (1, 1)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- workers that die


def dying_worker(cell, args, device, jobs, barrier, results, rank) -> None:
    """Worker 0 ends as the OOM killer would end it, without a word; the others would wait at the barrier for a minute."""
    if rank == 0:
        os._exit(3)
    time.sleep(60)


def test_a_bench_worker_that_dies_ends_the_measurement_with_an_error_not_a_hang() -> None:
    cell = BenchOptions(depth=8, batch_size=16, device="cpu", compile="none").cell()
    started = time.monotonic()
    with pytest.raises(BenchWorkerError, match=r"bench worker 0 died \(exit code 3\)"):
        concurrent_rate(cell, 2, CPU, 1, target=dying_worker, warmup=0, runtime=EAGER)
    assert time.monotonic() - started < 45  # the other worker's minute of sleep was cut short


def test_a_bench_worker_that_fails_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real worker, sent to a GPU this machine lacks: its error comes back as the measurement's error."""
    monkeypatch.setattr(bench_module, "indexed_device", lambda device: torch.device("cuda", 7))
    cell = BenchOptions(depth=8, batch_size=16, device="cpu", compile="none").cell()
    with pytest.raises(BenchWorkerError, match=r"bench worker \d failed: .+"):
        concurrent_rate(cell, 2, CPU, 1, warmup=0, runtime=EAGER, timeout=120)


def test_bench_with_a_dying_worker_is_one_error_line_and_exit_code_1(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_module, "_concurrent_worker", dying_worker)
    monkeypatch.setattr(bench_module, "bench_images", lambda size=0: synthetic_images(64, 10))
    result = cli("bench", "--depth", 8, "--batch-size", 16, "--steps", 1, "--warmup", 0, "--jobs", 2, "--device", "cpu",
                 "--no-baseline")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: bench worker 0 died") and len(result.stderr.strip().splitlines()) == 1


def test_bench_workers_are_sent_an_indexed_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert str(bench_module.indexed_device(torch.device("cuda"))) == "cuda:0"
    assert str(bench_module.indexed_device(torch.device("cuda", 1))) == "cuda:1"
    assert bench_module.indexed_device(CPU) == CPU


SLEEPER = "import sys, time; time.sleep(60)"


def orphaning_worker(rank, parent_pid, lock, config, cells, out_dir, device, jobs, conn) -> None:
    """A fake worker that, on its first cell, dies while a process it started still holds its pipe open
    (as a compiler's worker pool can): the sweep sees no end of file, only a dead process."""

    def attempt(index: int) -> CellOutcome:
        marker = out_dir / "orphaned"
        if not marker.exists():
            sleeper = subprocess.Popen([sys.executable, "-c", SLEEPER], pass_fds=(conn.fileno(),))
            marker.write_text(str(sleeper.pid))
            os._exit(3)
        return CellOutcome({"id": cells[index].id})

    serve(conn, attempt)


class Ended:
    def __init__(self) -> None:
        self.cells: list[tuple[str, bool]] = []

    def sweep_started(self, start) -> None: ...
    def cell_started(self, cell_id, total_epochs, done_epochs) -> None: ...
    def epoch_done(self, cell_id, row) -> None: ...

    def cell_ended(self, cell_id, summary, error) -> None:
        self.cells.append((cell_id, error is None))


def test_a_sweep_worker_that_dies_with_its_pipe_held_open_is_found_by_its_liveness_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "WORKER_POLL_SECONDS", 0.5)
    config = parse_config(tiny_sweep(grid={"arch": "plain", "depth": 8, "seed": [0, 1, 2]}))
    ended, out = Ended(), tmp_path / "out"
    started = time.monotonic()
    try:
        with exclusive(out) as fd:
            pool_module.run_pool(config, config.cells, out, CPU, 2, ended, fd, target=orphaning_worker)
    finally:
        os.kill(int((out / "orphaned").read_text()), 9)
    assert sorted(ended.cells) == sorted((cell.id, True) for cell in config.cells)  # the lost cell was retried and ended
    assert time.monotonic() - started < 45  # not the minute the pipe stayed open


def test_a_free_worker_is_sent_another_seed_of_the_net_it_compiled_before_the_longest_cell() -> None:
    cells = parse_config(tiny_sweep(grid={"arch": ["plain", "residual"], "depth": 8, "seed": [0, 1]})).cells
    residual = compile_key(next(cell for cell in cells if cell.arch == "residual"))
    pending = collections.deque(range(len(cells)))
    first = next_cell(pending, cells, residual)
    assert cells[first].arch == "residual" and first not in pending
    assert next_cell(pending, cells, None) == min(set(range(len(cells))) - {first})  # nothing compiled yet: the queue's order


# ----------------------------------------------------------------------------- running it


def test_python_dash_m_depthlab_runs_from_a_checkout_without_an_install() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "depthlab", "--version"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("depthlab ")


def test_the_gpu_check_runs_on_a_cpu_skips_the_gpu_parts_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    code = gpu_check.main(["--out", str(out), "--device", "cpu", "--depth", "8", "--batch-size", "16", "--steps", "2",
                           "--warmup", "1", "--images", "64", "--resume-images", "64", "--resume-epochs", "2"])
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert set(checks) == {"compile_and_cudagraphs", "bf16", "memory_per_job", "jobs_throughput", "deterministic_resume"}
    for gpu_only in ("compile_and_cudagraphs", "memory_per_job"):
        assert checks[gpu_only]["status"] == "skipped" and "no GPU" in checks[gpu_only]["reason"]
    assert checks["bf16"]["status"] == ("pass" if fastpath.native_bf16(CPU) else "skipped")
    assert checks["jobs_throughput"]["status"] == "pass" and checks["jobs_throughput"]["images_per_second"]["1"] > 0
    assert checks["deterministic_resume"]["status"] == "pass" and checks["deterministic_resume"]["deterministic"]["weights_equal"]
    assert code == 0 and result["passed"] and result["device"] == "cpu"


def test_a_gpu_check_that_cannot_run_is_an_error_with_its_reason_and_the_others_still_run() -> None:
    failed = gpu_check._run_check(lambda: 1 / 0)
    assert failed["status"] == "error" and failed["error"].startswith("ZeroDivisionError") and failed["seconds"] >= 0
