"""The fast path: precision follows the hardware's bf16, the CPU's memory format follows one stored measurement,
and every summary and report says what actually ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import depthlab.fastpath as fastpath
from depthlab import files
from depthlab.bench import BenchOptions, compare_paths
from depthlab.config import parse_config
from depthlab.data import synthetic_images
from depthlab.report import build_report, report_json, report_markdown
from depthlab.sweep import run_sweep
from depthlab.train import build_training_setup, train_cell

from .conftest import tiny_sweep
from .test_ray import Recorder

CPU = torch.device("cpu")


@pytest.fixture
def measurements(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Replaces the memory-format timing by a recorder that answers 1.25 (channels_last faster) and forgets earlier answers."""
    calls: list[bool] = []

    def measure(device: torch.device, bf16: bool) -> float:
        calls.append(bf16)
        return 1.25

    monkeypatch.setattr(fastpath, "measure_channels_last_speedup", measure)
    monkeypatch.setattr(fastpath, "_measured", {})
    return calls


def store(isolated_cache: Path, bf16: bool, speedup: float) -> None:
    files.write_json(isolated_cache / fastpath.FORMAT_CACHE, {fastpath._machine_key(bf16): {"speedup": speedup}})


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_exactly_where_the_hardware_computes_it(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(fastpath, "native_bf16", lambda device: native)
    assert fastpath.resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert fastpath.resolve_precision("fp32", CPU) == "fp32" and fastpath.resolve_precision("bf16", CPU) == "bf16"


def test_a_cpu_without_bf16_instructions_is_not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not fastpath.native_bf16(CPU)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert fastpath.native_bf16(CPU)


def test_auto_precision_is_a_setting_of_the_recipe() -> None:
    cell = parse_config(tiny_sweep(train={"epochs": 1, "precision": "auto"})).cells[0]
    assert cell.train.precision == "auto"
    assert cell.fingerprint() != parse_config(tiny_sweep(train={"epochs": 1, "precision": "fp32"})).cells[0].fingerprint()


# ----------------------------------------------------------------------------- memory format


def test_the_cpu_memory_format_is_measured_once_and_then_read_back(measurements: list[bool], isolated_cache: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert fastpath.resolve_channels_last("auto", CPU, bf16=True)
    assert fastpath.resolve_channels_last("auto", CPU, bf16=True)
    assert measurements == [True]
    stored = json.loads((isolated_cache / fastpath.FORMAT_CACHE).read_text())
    assert stored == {fastpath._machine_key(True): {"speedup": 1.25}}
    monkeypatch.setattr(fastpath, "_measured", {})  # another process: it reads the stored answer
    assert fastpath.resolve_channels_last("auto", CPU, bf16=True) and measurements == [True]
    fastpath.resolve_channels_last("auto", CPU, bf16=False)  # another precision is another measurement
    assert measurements == [True, False]


@pytest.mark.parametrize("speedup, expected", [(1.3, True), (0.9, False)])
def test_a_stored_answer_decides_without_measuring_again(measurements: list[bool], isolated_cache: Path,
                                                         speedup: float, expected: bool) -> None:
    store(isolated_cache, bf16=False, speedup=speedup)
    assert fastpath.resolve_channels_last("auto", CPU, bf16=False) is expected
    assert measurements == []


def test_a_damaged_memory_format_cache_is_measured_again(measurements: list[bool], isolated_cache: Path) -> None:
    (isolated_cache / fastpath.FORMAT_CACHE).write_text("{not json")
    assert fastpath.resolve_channels_last("auto", CPU, bf16=False)
    assert measurements == [False]


def test_explicit_memory_formats_and_gpus_need_no_measurement(measurements: list[bool]) -> None:
    assert fastpath.resolve_channels_last(True, CPU, bf16=False) is True
    assert fastpath.resolve_channels_last(False, CPU, bf16=True) is False
    assert fastpath.resolve_channels_last("auto", torch.device("cuda"), bf16=True) is True
    assert measurements == []


def test_the_measurement_times_both_memory_formats_of_a_real_net() -> None:
    speedup = fastpath.measure_channels_last_speedup(CPU, bf16=False)
    assert 0.2 < speedup < 5


# ----------------------------------------------------------------------------- what ran, recorded


def test_the_summary_records_the_precision_and_memory_format_that_ran(measurements: list[bool], monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(fastpath, "native_bf16", lambda device: True)
    config = parse_config(tiny_sweep(train={"epochs": 1, "batch_size": 64, "precision": "auto"}))
    summary = train_cell(config.cells[0], synthetic_images(128, 64), CPU, config.runtime, tmp_path)
    assert summary["precision"] == "bf16" and summary["memory_format"] == "channels_last"
    setup = build_training_setup(config.cells[0], CPU, config.runtime)
    assert setup.bf16 and setup.memory_format == torch.channels_last
    assert next(setup.model.parameters()).dtype == torch.float32  # autocast: the master weights stay fp32


def test_a_sweep_measures_the_memory_format_before_its_workers_start_and_they_all_use_it(isolated_cache: Path, tmp_path: Path) -> None:
    store(isolated_cache, bf16=False, speedup=0.5)  # NCHW here, whatever this machine would measure
    config = parse_config(tiny_sweep(runtime={"device": "cpu", "jobs": 2}, grid={"arch": ["plain", "residual"], "depth": [8], "seed": [0]}))
    outcome = run_sweep(config, tmp_path / "out", Recorder())
    assert len(outcome.ran) == 2
    for cell_id in outcome.ran:
        summary = files.read_json(tmp_path / "out" / "cells" / cell_id / "summary.json")
        assert (summary["precision"], summary["memory_format"]) == ("fp32", "nchw")
    report = build_report(tmp_path / "out")
    assert [(r["precision"], r["memory_format"], r["cells"]) for r in report_json(report)["ran"]] == [("fp32", "nchw", 2)]
    assert "## How it ran" in report_markdown(report)


def test_summaries_from_before_the_fast_path_say_what_is_known_and_what_was_not_recorded(tmp_path: Path) -> None:
    from .test_report import finish, write_sweep

    [cell] = write_sweep(tmp_path, {"name": "old", "grid": {"arch": ["plain"], "depth": [20], "seed": [0]}}).values()
    finish(tmp_path, cell, 7.0)  # a summary without precision, memory_format or execution
    [ran] = report_json(build_report(tmp_path))["ran"]
    assert (ran["precision"], ran["memory_format"], ran["execution"]) == ("fp32", "unrecorded", "unrecorded")


# ----------------------------------------------------------------------------- bench


def test_bench_compare_times_the_four_paths_and_marks_the_one_auto_picks(measurements: list[bool]) -> None:
    result = compare_paths(BenchOptions(arch="residual", depth=8, batch_size=32, steps=2, warmup=1, device="cpu", compile="none"))
    paths = [(p["precision"], p["memory_format"]) for p in result["paths"]]
    assert paths == [("fp32", "nchw"), ("fp32", "channels_last"), ("bf16", "nchw"), ("bf16", "channels_last")]
    assert all(p["images_per_second"] > 0 for p in result["paths"]) and result["paths"][0]["speedup"] == 1.0
    chosen = [(p["precision"], p["memory_format"]) for p in result["paths"] if p["auto"]]
    assert chosen == [(fastpath.resolve_precision("auto", CPU), "channels_last")]  # the recorder measured channels_last faster


def test_bench_compare_on_the_command_line(cli, measurements: list[bool]) -> None:
    result = cli("bench", "--compare", "--depth", "8", "--batch-size", "32", "--steps", "2", "--warmup", "1",
                 "--device", "cpu", "--compile", "none")
    assert result.exit_code == 0, result.output
    assert "bf16 channels_last" in result.stdout and result.stdout.count("← auto") == 1
