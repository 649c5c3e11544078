"""The compiled path, on the CPU: torch.compile with `aot_eager` (dynamo and AOTAutograd without
inductor's code generation) stands in for the GPU's inductor, and a recording backend counts compiles.

What only a GPU can show is listed in docs/performance.md ("What the first GPU run must check").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch._dynamo import lookup_backend

from depthlab import bench as bench_module
from depthlab import files
from depthlab.bench import BenchOptions, run_bench
from depthlab.config import RuntimeSpec, parse_config
from depthlab.data import synthetic_images
from depthlab.results_folder import CellFolder
from depthlab.models import STAGE_WIDTHS
from depthlab.options import NetSpec, blocks_per_stage
from depthlab.pool import GIB, auto_jobs, dataset_bytes, memory_per_job, saved_activation_bytes
from depthlab.train import TrainStep, configure_device, kernel_settings, build_training_setup, train_cell

from .conftest import tiny_sweep

CPU = torch.device("cpu")
COMPILED = RuntimeSpec(device="cpu", compile="default")
EAGER = RuntimeSpec(device="cpu", compile="none")


class RecordingBackend:
    """aot_eager, counting the graphs dynamo hands it: one per compile or recompile."""

    __name__ = "recording_aot_eager"

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return lookup_backend("aot_eager")(graph, example_inputs)


def failing_backend(error: Exception):
    """A backend that raises `error` when asked to compile, as a broken compiler would."""

    def broken_compiler(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        raise error

    return broken_compiler


def cells(arch: str = "residual", depth: int | list[int] = 8, shortcut: str | list[str] = "A", **train):
    recipe = {"epochs": 3, "milestones": [2], "batch_size": 32, **train}
    return parse_config(tiny_sweep(train=recipe, grid={"arch": arch, "depth": depth, "shortcut": shortcut, "seed": 0})).cells


IMAGES = synthetic_images(256, 64)


def final_weights(cell_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(CellFolder(cell_dir).weights)


def metrics(cell_dir: Path) -> pd.DataFrame:
    return pd.read_csv(CellFolder(cell_dir).metrics).drop(columns="seconds")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One cell (3 epochs, the lr dropping for the 3rd, evaluation after each) trained eagerly, and compiled with an
    interruption after epoch 1, as two processes would; with the graphs compiled by the call that resumed."""
    root = tmp_path_factory.mktemp("runs")
    cell, backend = cells()[0], RecordingBackend()
    eager = train_cell(cell, IMAGES, CPU, EAGER, root / "eager")
    train_cell(cell, IMAGES, CPU, COMPILED, root / "compiled", stop_after_epochs=1, compile_backend="aot_eager")
    compiled = train_cell(cell, IMAGES, CPU, COMPILED, root / "compiled", compile_backend=backend)
    return {"root": root, "eager": eager, "compiled": compiled, "graphs": backend.graphs}


def test_a_compiled_cell_trains_and_resumes_bit_identically_to_eager(runs: dict) -> None:
    eager, compiled = final_weights(runs["root"] / "eager"), final_weights(runs["root"] / "compiled")
    assert eager.keys() == compiled.keys() and all(torch.equal(eager[k], compiled[k]) for k in eager)
    pd.testing.assert_frame_equal(metrics(runs["root"] / "eager"), metrics(runs["root"] / "compiled"))


def test_lr_changes_and_train_eval_switches_cause_no_recompiles(runs: dict) -> None:
    assert metrics(runs["root"] / "compiled").lr.tolist() == pytest.approx([0.1, 0.1, 0.01])
    assert runs["graphs"] == 1  # one graph for the 16 steps of epochs 2 and 3, across the lr drop and two evaluations


def test_each_summary_says_what_was_asked_what_ran_and_how_long_compiling_took(runs: dict) -> None:
    eager, compiled = runs["eager"], runs["compiled"]
    assert (eager["compile_requested"], eager["compile_mode"], eager["execution"]) == ("none", "none", "eager")
    assert eager["compile_seconds"] == 0.0 and eager["fallback_reason"] is None
    assert (compiled["compile_requested"], compiled["compile_mode"], compiled["execution"]) == ("default", "default", "compiled")
    assert compiled["compile_backend"] == "recording_aot_eager" and compiled["fallback_reason"] is None
    assert compiled["compile_seconds"] > 0 and compiled["train_seconds"] > 0
    rows = pd.read_csv(CellFolder(runs["root"] / "compiled").metrics)
    assert compiled["compile_seconds"] + compiled["train_seconds"] <= rows.seconds.sum()  # evaluation is in neither
    on_disk = files.read_json(CellFolder(runs["root"] / "compiled").summary)
    assert on_disk["execution"] == "compiled" and on_disk["compile_seconds"] == compiled["compile_seconds"]
    for summary in (eager, compiled):  # the CPU: no cuDNN, no TF32, fp32 matmuls
        assert (summary["deterministic"], summary["cudnn_benchmark"], summary["conv_tf32"]) == (False, False, False)
        assert summary["float32_matmul_precision"] == torch.get_float32_matmul_precision()


def test_ten_distinct_nets_in_one_process_all_train_compiled() -> None:
    nets = cells("plain", [8, 14, 20, 26]) + cells("residual", [8, 14, 20], ["A", "B"])
    assert len({(c.arch, c.depth, c.shortcut) for c in nets}) == 10 > 8  # dynamo's recompile limit per function is 8
    x, y = IMAGES.train_x[:2].float(), IMAGES.train_y[:2]
    for cell in nets:
        backend = RecordingBackend()
        step = build_training_setup(cell, CPU, COMPILED, backend).step
        step(x, y)
        assert (cell.id, backend.graphs, step.execution) == (cell.id, 1, "compiled")


def test_a_compiler_error_falls_back_to_eager_and_the_summary_says_why_even_after_a_resume(runs: dict, tmp_path: Path) -> None:
    broken = failing_backend(RuntimeError("no kernel for conv2d"))
    with pytest.warns(UserWarning, match="training this cell eagerly"):
        train_cell(cells()[0], IMAGES, CPU, COMPILED, tmp_path, stop_after_epochs=1, compile_backend=broken)
    summary = train_cell(cells()[0], IMAGES, CPU, EAGER, tmp_path)  # the rest in another process, eager by choice
    assert summary["execution"] == "eager-fallback"
    assert "BackendCompilerFailed" in summary["fallback_reason"] and "no kernel for conv2d" in summary["fallback_reason"]
    assert summary["final"] == runs["eager"]["final"]  # the compiler failed before the step ran: eager from the start


def tiny_step(backend, compile_mode: str = "default") -> TrainStep:
    """A step around a linear model: dynamo traces it in a fraction of a second."""
    model = nn.Linear(8, 10)
    return TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), bf16=False, compile_mode=compile_mode, backend=backend)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (while autotuning)"),
                                   torch.AcceleratorError("CUDA error: an illegal memory access was encountered")],
                         ids=["out-of-memory", "cuda-error"])
def test_a_device_error_inside_the_compiler_is_raised_not_hidden_by_a_fallback(error: Exception) -> None:
    step = tiny_step(failing_backend(error))
    with pytest.raises(type(error), match=re.escape(str(error))):
        step(torch.randn(4, 8), torch.arange(4))
    assert step.fallback_reason is None


def test_a_device_error_while_a_compiled_step_runs_is_raised() -> None:
    def compiles_then_fails_on_the_device(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args: torch.Tensor) -> object:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return run

    step = tiny_step(compiles_then_fails_on_the_device)
    with pytest.raises(torch.AcceleratorError):
        step(torch.randn(4, 8), torch.arange(4))
    assert step.execution == "compiled"


def test_both_cuda_graph_modes_mark_step_boundaries_and_no_other_mode_does() -> None:
    marks = {mode: tiny_step("inductor", mode).cudagraphs for mode in ("none", "default", "reduce-overhead", "max-autotune")}
    assert marks == {"none": False, "default": False, "reduce-overhead": True, "max-autotune": True}
    assert not tiny_step("aot_eager", "reduce-overhead").cudagraphs  # only inductor captures CUDA graphs


@pytest.fixture
def restore_kernel_settings():
    """configure_device changes process-wide flags: put them back for the tests after this one."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


def test_deterministic_mode_gives_up_cudnn_autotuning_and_is_recorded(restore_kernel_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    gpu = torch.device("cuda")  # the flags are plain settings: they can be set, not used, without a GPU
    configure_device(gpu)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    configure_device(gpu, deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"

    build_training_setup(cells()[0], CPU, RuntimeSpec(device="cpu", deterministic=True))
    assert kernel_settings(CPU)["deterministic"] is True  # what each summary records
    build_training_setup(cells()[0], CPU, EAGER)
    assert kernel_settings(CPU)["deterministic"] is False


def test_the_bench_baseline_runs_under_the_settings_depthlab_s_side_runs_under(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(bench_module, "configure_device", lambda device, deterministic: calls.append(("configure", deterministic)))
    monkeypatch.setattr(bench_module, "common_way_rate", lambda *args, **kwargs: calls.append("baseline") or 1.0)
    monkeypatch.setattr(bench_module, "measure_depthlab", lambda *args, **kwargs: calls.append("depthlab") or (2.0, {}))
    run_bench(BenchOptions(depth=8, steps=1, warmup=0, jobs=1, device="cpu"))
    assert calls == [("configure", False), "baseline", "depthlab"]  # build_training_setup configures the same again inside measure_depthlab


def conv_output_bytes(depth: int) -> int:
    """fp32 bytes of every conv's output for one image: stem at 32×32, then 2n convs per stage at 32², 16², 8²."""
    n = blocks_per_stage(depth)
    sides = (32, 16, 8)
    return 4 * (STAGE_WIDTHS[0] * 32 * 32 + sum(2 * n * width * side * side for width, side in zip(STAGE_WIDTHS, sides)))


def test_saved_activations_are_about_two_tensors_per_conv_output() -> None:
    for depth in (20, 56):
        per_image, largest = saved_activation_bytes(NetSpec("residual", depth))
        assert 1.5 * conv_output_bytes(depth) < per_image < 3 * conv_output_bytes(depth)  # BN keeps the conv's output, ReLU its own
        assert largest == STAGE_WIDTHS[0] * 32 * 32 * 4


def test_memory_per_job_grows_with_depth_and_batch_and_counts_the_dataset_and_the_context() -> None:
    cifar = parse_config({"name": "m", "grid": {"arch": "residual", "depth": [8, 20, 56]}}).cells
    assert dataset_bytes(cifar[0].data) == 60_000 * (3 * 32 * 32 + 8)  # 50k training and 10k test images with labels: 185 MB
    small, medium, large = (memory_per_job(c, RuntimeSpec()) for c in cifar)
    assert GIB < small < medium < large < 3 * GIB
    bigger_batch = parse_config({"name": "m", "train": {"batch_size": 512}, "grid": {"arch": "residual", "depth": 56}}).cells[0]
    assert memory_per_job(bigger_batch, RuntimeSpec()) > large + 3 * 128 * saved_activation_bytes(NetSpec("residual", 56))[0]


def test_auto_jobs_fits_the_largest_cell_in_free_gpu_memory_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    cifar = parse_config({"name": "m", "grid": {"arch": "residual", "depth": [8, 56]}, "runtime": {"device": "cpu"}}).cells
    per_job = memory_per_job(cifar[1], RuntimeSpec())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = torch.device("cuda")
    for free, jobs in ((2.5 * per_job, 2), (0.5 * per_job, 1), (100 * per_job, 2)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index, free=free: (int(free), int(free)))
        assert auto_jobs(gpu, cifar, RuntimeSpec()) == jobs  # never more jobs than cells
    many = cifar * 10
    assert auto_jobs(gpu, many, RuntimeSpec()) == 6  # MAX_JOBS_PER_GPU, a guess
    assert auto_jobs(CPU, many, RuntimeSpec()) == 1
