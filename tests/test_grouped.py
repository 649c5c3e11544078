"""Seeds as a batch dimension: K cells of one net trained as one grouped model end as the K cells trained alone.

What is equal bit for bit: each net's initial weights, each net's batches (order and augmentation),
packing and unpacking, and a group resumed from its nets' checkpoints against the same group
uninterrupted. What is equal within a tolerance: weights and metrics after training, because a
grouped convolution (and the grouped classifier's einsum) may add its products in another order
than a solo one. Measured on the 2-core CPU this was written on, over the 8 steps below: losses
differ by ≤ 5e-6 (relative ≤ 3e-6) and weights by ≤ 1e-4; the tolerances (losses 1e-4 relative,
weights 2e-3) are ~20× that, far below what a wrong gradient, a swapped batch or a shared
BatchNorm statistic produce (those change the loss in its second or third digit after one step).
An error rate may differ by one image where two logits tie within rounding.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from depthlab import pool as pool_module
from depthlab import train as train_module
from depthlab import group_training
from depthlab.attempt import CellOutcome, retry_policy, run_group
from depthlab.config import ConfigError, RuntimeSpec, parse_config
from depthlab.data import load_images
from depthlab.group_training import group_refusal, plan_groups, train_group
from depthlab.grouped import build_grouped_net, pack, pack_optimizer, unpack, unpack_optimizer
from depthlab.models import build_net
from depthlab.options import NetSpec, net_spec_error
from depthlab.pool import CUDA_CONTEXT_BYTES, dataset_bytes, memory_per_job, serve
from depthlab.results_folder import ResultsFolder
from depthlab.sweep import exclusive, run_sweep
from depthlab.train import train_cell

from .conftest import tiny_sweep
from .test_faults import FakePipe
from .test_ray import Recorder

CPU = torch.device("cpu")
SEEDS = [0, 1, 2]
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 2e-3


def every_net_variant() -> list[NetSpec]:
    """Each block type the config allows, at the smallest depth: family × arch × shortcut × λ × init × norm × order."""
    specs = [NetSpec(arch, 8, family=family, shortcut=shortcut, shortcut_scale=scale, init=init, norm=norm, block=block)
             for family, arch, shortcut, scale, init, norm, block in itertools.product(
                 ("conv", "mlp"), ("plain", "residual"), ("A", "B"), (1.0, 0.5), ("he", "zero_gamma", "delta_orthogonal", "skipinit"),
                 ("bn", "none"), ("post", "pre"))]
    return list(dict.fromkeys(spec.canonical() for spec in specs if net_spec_error(spec) is None))


def seeded_nets(spec: NetSpec, seeds: list[int]) -> list[torch.nn.Module]:
    """One net per seed, every float (weights, α, BN statistics) moved off its initial value so that no layer hides a mix-up."""
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)
        net = build_net(spec)
        with torch.no_grad():
            for key, tensor in net.state_dict().items():
                if tensor.is_floating_point():  # a running variance stays positive
                    tensor.add_(0.1 * (torch.rand_like(tensor) if key.endswith("running_var") else torch.randn_like(tensor)))
        nets.append(net)
    return nets


def test_every_block_type_packs_unpacks_exactly_and_computes_each_net_apart() -> None:
    for spec in every_net_variant():
        nets = seeded_nets(spec, SEEDS)
        grouped = build_grouped_net(spec, len(SEEDS))
        grouped.load_state_dict(pack([net.state_dict() for net in nets], grouped.state_dict()))
        back = unpack(grouped.state_dict(), nets[0].state_dict(), len(SEEDS))
        for net, state in zip(nets, back):
            assert all(torch.equal(state[key], value) for key, value in net.state_dict().items()), spec
        images = [torch.randn(4, 3, 32, 32) for _ in SEEDS]
        for training in (True, False):
            grouped.train(training)
            logits = grouped(torch.cat(images, dim=1)).unflatten(1, (len(SEEDS), -1))
            for k, (net, x) in enumerate(zip(nets, images)):
                net.train(training)
                alone = net(x)
                assert torch.allclose(logits[:, k], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item()), (spec, training, k)


def test_optimizer_momentum_packs_and_unpacks_exactly() -> None:
    spec = NetSpec("residual", 8, shortcut="B", init="skipinit")
    nets = seeded_nets(spec, SEEDS)
    optimizers = []
    for net in nets:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        net(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        optimizers.append(optimizer)
    grouped = build_grouped_net(spec, len(SEEDS))
    grouped_optimizer = torch.optim.SGD(grouped.parameters(), lr=0.1, momentum=0.9)
    packed = pack_optimizer([o.state_dict() for o in optimizers], nets[0], grouped, grouped_optimizer.state_dict())
    grouped_optimizer.load_state_dict(packed)
    back = unpack_optimizer(grouped_optimizer.state_dict(), grouped, nets[0], optimizers[0].state_dict(), len(SEEDS))
    for optimizer, state in zip(optimizers, back):
        mine = optimizer.state_dict()["state"]
        assert mine.keys() == state["state"].keys()
        assert all(torch.equal(mine[i]["momentum_buffer"], state["state"][i]["momentum_buffer"]) for i in mine)


def three_seeds(**train) -> list:
    document = tiny_sweep(grid={"arch": ["residual"], "depth": [8], "seed": SEEDS},
                          data={"source": "synthetic", "train_size": 128, "test_size": 64},
                          train={"epochs": 2, "milestones": [1], "batch_size": 32, **train})
    return parse_config(document, source="test").cells


def record_steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every step's batch, labels and the model's weights before it (only the first step's are kept)."""
    seen: list[tuple] = []
    real = train_module.TrainStep.__call__

    def recording(step, x, y):
        weights = {key: value.clone() for key, value in step.model.state_dict().items()} if not seen or seen[-1][0] is not step else None
        seen.append((step, x.clone(), y.clone(), weights))
        return real(step, x, y)

    monkeypatch.setattr(train_module.TrainStep, "__call__", recording)
    return seen


def test_a_group_of_three_sees_each_seeds_solo_weights_and_batches_exactly_and_ends_as_the_solo_cells(tmp_path, monkeypatch) -> None:
    cells = three_seeds()
    images = load_images(cells[0].data)
    steps = record_steps(monkeypatch)
    grouped = train_group(cells, images, CPU, parse_config(tiny_sweep(), source="t").runtime, [tmp_path / "g" / c.id for c in cells])
    grouped_steps = list(steps)
    steps.clear()
    alone = [train_cell(cell, images, CPU, parse_config(tiny_sweep(), source="t").runtime, tmp_path / "s" / cell.id) for cell in cells]
    per_cell = len(steps) // len(cells)
    assert per_cell == len(grouped_steps) == 8
    first = grouped_steps[0]
    solo_model = build_net(cells[0].net_spec())
    initial = unpack(first[3], solo_model.state_dict(), len(cells))
    for k, cell in enumerate(cells):
        own = steps[k * per_cell: (k + 1) * per_cell]
        assert all(torch.equal(initial[k][key], value) for key, value in own[0][3].items())  # the same initial weights, exactly
        for (_, x, y, _), (_, gx, gy, _) in zip(own, grouped_steps):
            assert torch.equal(gx.chunk(len(cells), dim=1)[k], x) and torch.equal(gy[:, k], y)  # the same batches, exactly
    for cell, group_summary, solo_summary in zip(cells, grouped, alone):
        assert group_summary["group_size"] == 3 and solo_summary["group_size"] == 1
        group_rows, solo_rows = (pd.read_csv(tmp_path / side / cell.id / "metrics.csv") for side in ("g", "s"))
        for column in ("train_loss", "test_loss"):
            assert group_rows[column].to_numpy() == pytest.approx(solo_rows[column].to_numpy(), rel=LOSS_RTOL)
        for column in ("train_err", "test_err"):
            assert (group_rows[column] - solo_rows[column]).abs().max() <= 100 / 64 + 1e-9
        assert group_summary["final"]["clean_train_loss"] == pytest.approx(solo_summary["final"]["clean_train_loss"], rel=LOSS_RTOL)
        group_weights, solo_weights = (torch.load(tmp_path / side / cell.id / "model.pt") for side in ("g", "s"))
        assert max((group_weights[key].float() - value.float()).abs().max().item() for key, value in solo_weights.items()) < WEIGHT_ATOL
        assert (tmp_path / "g" / cell.id / "DONE").is_file() and not (tmp_path / "g" / cell.id / "checkpoint.pt").exists()


def test_an_interrupted_group_resumes_from_its_nets_checkpoints_bit_for_bit(tmp_path) -> None:
    cells = three_seeds()
    images = load_images(cells[0].data)
    runtime = parse_config(tiny_sweep(), source="t").runtime
    whole = train_group(cells, images, CPU, runtime, [tmp_path / "whole" / c.id for c in cells])
    stopped = train_group(cells, images, CPU, runtime, [tmp_path / "cut" / c.id for c in cells], stop_after_epochs=1)
    assert [s["status"] for s in stopped] == ["interrupted"] * 3
    assert all((tmp_path / "cut" / c.id / "checkpoint.pt").is_file() for c in cells)
    resumed = train_group(cells, images, CPU, runtime, [tmp_path / "cut" / c.id for c in cells])
    for a, b in zip(whole, resumed):
        assert a["final"] == b["final"]


def test_a_sweep_killed_mid_group_resumes_with_no_finished_member_retrained(tmp_path) -> None:
    """One member finished (DONE), one checkpointed after epoch 1, two not started: the finished one is skipped,
    the two fresh ones train as a group, the checkpointed one continues alone from its epoch."""
    document = tiny_sweep(grid={"arch": ["residual"], "depth": [8], "seed": [0, 1, 2, 3]},
                          data={"source": "synthetic", "train_size": 128, "test_size": 64},
                          train={"epochs": 2, "milestones": [1], "batch_size": 32}, runtime={"device": "cpu", "group_seeds": 4})
    config = parse_config(document, source="test")
    out = tmp_path / "out"
    images = load_images(config.data)
    results = ResultsFolder(out)
    done, partial = config.cells[0], config.cells[1]
    train_cell(done, images, CPU, config.runtime, results.cell(done.id).path)
    train_cell(partial, images, CPU, config.runtime, results.cell(partial.id).path, stop_after_epochs=1)
    done_stamp = results.cell(done.id).done.stat().st_mtime_ns
    first_epoch = pd.read_csv(results.cell(partial.id).metrics).iloc[0]

    events = Recorder()
    outcome = run_sweep(config, out, events)
    assert outcome.skipped == [done.id] and not outcome.failed
    assert results.cell(done.id).done.stat().st_mtime_ns == done_stamp
    assert (partial.id, 2, 1) in events.started  # continued from its epoch, not from scratch
    resumed = pd.read_csv(results.cell(partial.id).metrics)
    assert len(resumed) == 2 and resumed.iloc[0].equals(first_epoch)
    summaries = {cell.id: json.loads(results.cell(cell.id).summary.read_text()) for cell in config.cells[1:]}
    assert {cell_id: summary["group_size"] for cell_id, summary in summaries.items()} == {
        partial.id: 1, config.cells[2].id: 2, config.cells[3].id: 2}
    for cell in config.cells[2:]:  # a group's cells record their identity as a solo cell's do
        record = cell.to_record()
        assert summaries[cell.id]["variant"] == record["variant"] and summaries[cell.id]["net_spec"] == record["net_spec"]
        assert json.loads(results.cell(cell.id).config.read_text())["net_spec"] == record["net_spec"]


def test_a_diverged_member_is_recorded_and_the_others_finish_as_they_would(tmp_path) -> None:
    cells = three_seeds(epochs=3, milestones=[2])
    images = load_images(cells[0].data)
    runtime = parse_config(tiny_sweep(), source="t").runtime
    clean = train_group(cells, images, CPU, runtime, [tmp_path / "clean" / c.id for c in cells])
    dirs = [tmp_path / "nan" / c.id for c in cells]
    train_group(cells, images, CPU, runtime, dirs, stop_after_epochs=1)
    checkpoint = torch.load(dirs[1] / "checkpoint.pt", weights_only=False)
    checkpoint["model"]["stem.0.weight"].fill_(math.nan)
    torch.save(checkpoint, dirs[1] / "checkpoint.pt")
    ended = train_group(cells, images, CPU, runtime, dirs)
    assert [s["status"] for s in ended] == ["finished", "diverged", "finished"]
    assert ended[1]["epochs"] == 2 and (dirs[1] / "DONE").is_file()
    for k in (0, 2):  # trained beside a NaN net for an epoch, then as a group of two: as if the NaN net were not there
        assert ended[k]["group_size"] == 2
        assert ended[k]["final"]["clean_train_loss"] == pytest.approx(clean[k]["final"]["clean_train_loss"], rel=LOSS_RTOL)


def test_a_member_that_ended_before_its_groups_error_keeps_its_result_and_is_not_retried(tmp_path, monkeypatch) -> None:
    cells = three_seeds(epochs=3, milestones=[2])
    images = load_images(cells[0].data)
    config = parse_config(tiny_sweep(), source="t")
    dirs = [ResultsFolder(tmp_path).cell(cell.id).path for cell in cells]
    train_group(cells, images, CPU, config.runtime, dirs, stop_after_epochs=1)
    checkpoint = torch.load(dirs[1] / "checkpoint.pt", weights_only=False)
    checkpoint["model"]["stem.0.weight"].fill_(math.nan)
    torch.save(checkpoint, dirs[1] / "checkpoint.pt")
    real_grouped, calls = group_training._grouped, []

    def dies_when_regrouping(*args, **kwargs):  # the second grouping is the regroup after the NaN net was recorded
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_grouped(*args, **kwargs)

    monkeypatch.setattr(group_training, "_grouped", dies_when_regrouping)
    outcomes = run_group(cells, images, CPU, config, tmp_path, events=None)
    assert outcomes[1].error is None and outcomes[1].summary["status"] == "diverged"
    assert not (dirs[1] / "error.txt").exists() and (dirs[1] / "DONE").is_file()
    assert [retry_policy(outcomes[k], attempts=1) for k in (0, 2)] == ["retry", "retry"]
    assert retry_policy(outcomes[1], attempts=1) == "record"


def test_cells_group_only_when_they_differ_in_seed_alone_and_never_beyond_k() -> None:
    document = tiny_sweep(grid={"arch": ["plain", "residual"], "depth": [8], "seed": [0, 1, 2]})
    cells = parse_config(document, source="test").cells
    units = plan_groups(cells, 2)
    assert sorted(len(unit) for unit in units) == [1, 1, 2, 2]
    assert all(len({(cells[i].arch, cells[i].depth) for i in unit}) == 1 for unit in units)
    assert plan_groups(cells, 1) == [[i] for i in range(len(cells))]
    warm = three_seeds(warmup_lr=0.01)
    assert "warmup_lr" in group_refusal(warm) and plan_groups(warm, 3) == [[0], [1], [2]]


@pytest.mark.parametrize("value, problem", [(0, "must be in [1, 64]"), (65, "must be in [1, 64]"), ("yes", "expected an integer or one of 'auto'"),
                                            (2.5, "expected an integer")])
def test_group_seeds_is_validated_with_a_clear_error(value, problem) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tiny_sweep(runtime={"device": "cpu", "group_seeds": value}), source="sweep.yaml")
    assert caught.value.key == "runtime.group_seeds" and problem in caught.value.message


@pytest.mark.parametrize("value", ["auto", 1, 8])
def test_group_seeds_accepts_auto_and_a_count(value) -> None:
    assert parse_config(tiny_sweep(runtime={"device": "cpu", "group_seeds": value}), source="sweep.yaml").runtime.group_seeds == value


def test_a_worker_sent_a_group_reports_each_cells_ending_alone_and_stops_when_the_group_killed_its_context() -> None:
    pipe = FakePipe([[0, 1], 2, [3, 4], 5])
    serve(pipe, lambda work: [CellOutcome(None, "CUDA error", "worker" if 3 in work else None) for _ in work]
          if isinstance(work, list) else CellOutcome({"id": work}))
    assert [m[1] for m in pipe.sent if m[0] == "ended"] == [0, 1, 2, 3, 4] and pipe.incoming == [5]


GROUP_CELLS = [cell.id for cell in parse_config(tiny_sweep(grid={"arch": ["plain", "residual"], "depth": [8], "seed": [0, 1, 2]})).cells]


def crashing_group_worker(rank, parent_pid, lock, config, cells, out_dir, device, jobs, conn) -> None:
    """A worker without torch work that counts each cell's attempts in a file; the first group holding the first
    cell crashes its process (as the OOM killer would), every other attempt trains."""

    def attempt(work: int | list[int]) -> CellOutcome | list[CellOutcome]:
        names = [cells[index].id for index in (work if isinstance(work, list) else [work])]
        for name in names:
            tally = out_dir / f"{name}.attempts"
            tally.write_text((tally.read_text() if tally.exists() else "") + ("g" if isinstance(work, list) else "x"))
        if isinstance(work, list) and GROUP_CELLS[0] in names:
            os._exit(3)
        outcomes = [CellOutcome({"id": name}) for name in names]
        return outcomes if isinstance(work, list) else outcomes[0]

    serve(conn, attempt)


def test_a_pool_sends_groups_and_retries_each_member_of_a_group_whose_worker_died_alone(tmp_path: Path) -> None:
    config = parse_config(tiny_sweep(grid={"arch": ["plain", "residual"], "depth": [8], "seed": [0, 1, 2]}))
    out = tmp_path / "out"
    recorder = Recorder()
    with exclusive(out) as fd:
        failed = pool_module.run_pool(config, config.cells, out, CPU, 2, recorder, fd, target=crashing_group_worker,
                                      group_seeds=2)
    assert not failed and sorted(recorder.ended) == sorted((cell_id, None) for cell_id in GROUP_CELLS)  # each ended once
    tallies = {cell_id: (out / f"{cell_id}.attempts").read_text() for cell_id in GROUP_CELLS}
    assert sorted(tallies.values()) == ["g", "g", "gx", "gx", "x", "x"]  # two groups of two, two cells alone (3 seeds, K = 2)
    assert tallies[GROUP_CELLS[0]] == "gx"  # the crashed group's members, each retried alone


def test_the_memory_bound_counts_a_grouped_workers_nets_but_its_context_and_data_once() -> None:
    cell = three_seeds()[0]
    shared = CUDA_CONTEXT_BYTES + dataset_bytes(cell.data)
    one = memory_per_job(cell, RuntimeSpec()) - shared
    assert memory_per_job(cell, RuntimeSpec(), members=4) - shared == pytest.approx(4 * one, abs=4)
