"""The probes of `depthlab.probe` on nets whose answer is known by construction, and `depthlab.paper`."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from depthlab import dynamics, paper, probe
from depthlab.config import Cell, DataSpec, TrainSpec
from depthlab.models import build_net
from depthlab.options import NetSpec


class LinearBlock(nn.Module):
    """A block without nonlinearity: F(x) = W x, output F(x) (plain) or x + F(x) (residual)."""

    def __init__(self, width: int, residual: bool):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.shortcut = nn.Identity() if residual else None

    def residual_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_branch(x)
        return out + self.shortcut(x) if self.shortcut is not None else out


class LinearNet(nn.Module):
    """stem → stages → classifier, all linear: the model contract with a known input-gradient."""

    def __init__(self, residual: bool, width: int = 12, blocks: int = 3):
        super().__init__()
        self.stem = nn.Linear(5, width)
        self.stages = nn.Sequential(nn.Sequential(*[LinearBlock(width, residual) for _ in range(blocks)]))
        self.classifier = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stages(self.stem(x)))


def cifar_batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def seeded(arch: str, depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_net(NetSpec(arch, depth))


def identity_resnet(depth: int = 8) -> nn.Module:
    """A ResNet whose every branch outputs 0 (last BN γ = β = 0): each block is its shortcut."""
    net = seeded("residual", depth)
    with torch.no_grad():
        for ref in dynamics.blocks(net):
            ref.module.bn2.weight.zero_()
            ref.module.bn2.bias.zero_()
    return net


def outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(x)


# ----------------------------------------------------------------------------- shattered gradients


@pytest.mark.parametrize("residual", [False, True])
def test_a_linear_net_has_perfectly_correlated_input_gradients_at_every_distance(residual: bool) -> None:
    torch.manual_seed(0)
    net = LinearNet(residual)
    x, y = torch.randn(32, 5), torch.randint(0, 4, (32,))
    result = probe.probe_model(net, x, y)
    assert len(result.nearby_by_lag) == probe.WALK_POINTS - 1
    assert result.nearby_by_lag == pytest.approx([1.0] * (probe.WALK_POINTS - 1), abs=1e-9)
    assert result.unrelated_image_gradient_cosine == pytest.approx(1.0, abs=1e-6)


class HalfSquare(nn.Module):
    """f(x) = ‖x‖²/2 as a one-logit net: its input-gradient is ±x, so the cosines along a walk are known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.flatten(1).pow(2).sum(1, keepdim=True)


def test_the_walk_compares_gradients_lag_steps_apart_along_the_line() -> None:
    start, end = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 4.0]])  # the walk goes up from (1, 0)
    by_lag = probe.nearby_gradient_correlation(HalfSquare(), start, end, points=3, span=0.5)
    # points (1, 0), (1, 1), (1, 2); gradients are the points themselves
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))
    lag1 = (cos([1.0, 0.0], [1.0, 1.0]) + cos([1.0, 1.0], [1.0, 2.0])) / 2
    assert by_lag == pytest.approx([lag1, cos([1.0, 0.0], [1.0, 2.0])])


def test_a_walk_starts_at_the_first_image_and_covers_its_span() -> None:
    start, end = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    path = probe.walk(start, end, points=5, span=0.25)
    assert path.shape == (2, 5, 3, 4, 4)
    assert torch.equal(path[:, 0], start) and torch.allclose(path[:, -1], torch.full_like(start, 0.25))


def test_a_relu_net_at_depth_has_less_correlated_input_gradients_than_a_linear_one() -> None:
    x, y = cifar_batch()
    result = probe.probe_model(seeded("plain", 20), x, y, walk_lines=2)  # two lines keep the test fast
    assert result.unrelated_image_gradient_cosine < 0.9
    assert result.nearby_gradient_correlation < 0.999
    assert result.nearby_by_lag[-1] < result.nearby_by_lag[0]  # farther apart, less alike


def test_relative_gradients_compare_the_first_conv_with_the_last_conv_not_the_classifier() -> None:
    net = seeded("residual", 8)
    result = probe.probe_model(net, *cifar_batch())
    assert result.first_conv == "stem.0" and result.last_conv == "stages.2.0.conv2"
    assert result.relative["stem.0"] == pytest.approx(result.layers["stem.0"] / float(net.stem[0].weight.detach().norm()))
    assert result.rel_grad_ratio == pytest.approx(result.relative["stem.0"] / result.relative["stages.2.0.conv2"])


def test_under_batchnorm_scaling_a_conv_scales_its_gradient_inversely_but_not_its_relative_gradient() -> None:
    """Why the relative measure: BN makes the net invariant to a conv's scale, so ‖∂L/∂W‖ ∝ 1/‖W‖."""
    x, y = cifar_batch()
    net = seeded("plain", 8)
    before = probe.probe_model(net, x, y)
    with torch.no_grad():
        net.stem[0].weight.mul_(10)
    after = probe.probe_model(net, x, y)
    assert after.layers["stem.0"] == pytest.approx(before.layers["stem.0"] / 10, rel=1e-2)  # up to BN's eps
    assert after.relative["stem.0"] == pytest.approx(before.relative["stem.0"] / 100, rel=1e-2)
    assert after.nearby_by_lag == pytest.approx(before.nearby_by_lag, abs=1e-4)


def test_the_logit_scale_is_the_std_of_the_logits_on_the_batch() -> None:
    net, (x, y) = seeded("residual", 8), cifar_batch()
    net.train()
    with torch.no_grad():
        expected = float(net(x).std())
    assert probe.probe_model(net, x, y).logit_std == pytest.approx(expected, rel=1e-6)


def test_mean_pairwise_cosine_counts_only_pairs_of_different_images() -> None:
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # a zero gradient is similarity 0
    assert probe.mean_pairwise_cosine(opposite) == pytest.approx(-1.0)
    assert probe.mean_pairwise_cosine(orthogonal) == pytest.approx(0.0)


def test_input_gradients_are_per_image_although_batchnorm_uses_batch_statistics() -> None:
    """Each image's gradient must not depend on the rest of the batch (BN's statistics held fixed)."""
    net = seeded("plain", 8)
    x, y = cifar_batch(8)
    whole = probe.probe_model(net, x, y).unrelated_image_gradient_cosine
    halves_swapped = probe.probe_model(net, torch.cat([x[4:], x[:4]]), torch.cat([y[4:], y[:4]])).unrelated_image_gradient_cosine
    assert whole == pytest.approx(halves_swapped, abs=1e-6)


# ----------------------------------------------------------------------------- gradients and signals


def test_resnet20_gradient_norms_at_init_are_positive_and_finite() -> None:
    result = probe.probe_model(seeded("residual", 20), *cifar_batch())
    norms = list(result.layers.values())
    assert len(norms) == 20
    assert all(n > 0 and math.isfinite(n) for n in norms)
    assert list(result.layers)[0] == "stem.0" and list(result.layers)[-1] == "classifier"
    assert result.grad_ratio == pytest.approx(norms[0] / norms[-1])


def test_probe_model_is_deterministic_for_a_fixed_batch() -> None:
    net, batch = seeded("residual", 8), cifar_batch()
    assert probe.probe_model(net, *batch) == probe.probe_model(net, *batch)


def test_probe_model_leaves_grads_running_statistics_and_mode_untouched() -> None:
    net = seeded("plain", 8)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe.probe_model(net, *cifar_batch())
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_block_rows_give_output_statistics_and_branch_ratio_for_every_block() -> None:
    result = probe.probe_model(seeded("plain", 14), *cifar_batch())
    assert [(b["stage"], b["index"]) for b in result.blocks] == [(s, i) for s in (1, 2, 3) for i in (1, 2)]
    assert all(b["act_std"] > 0 and b["act_mean"] > 0 and b["branch_ratio"] > 0 for b in result.blocks)  # after a ReLU


def test_a_resnet_of_identity_blocks_has_zero_branch_ratio_everywhere() -> None:
    result = probe.probe_model(identity_resnet(), *cifar_batch())
    assert [b["branch_ratio"] for b in result.blocks] == [0.0] * 3


def test_branch_ratio_of_a_linear_block_is_the_rms_of_its_output_over_its_input() -> None:
    block = LinearBlock(4, residual=True)
    with torch.no_grad():
        block.linear.weight.copy_(3 * torch.eye(4))
        block.linear.bias.zero_()
    ratios = dynamics.BranchRatios()
    x = torch.randn(6, 4)
    ratios(dynamics.BlockRef("b", 1, 1, block), x, block.residual_branch(x))
    assert [float(r) for r in ratios.per_block().values()] == [pytest.approx(3.0)]


# ----------------------------------------------------------------------------- once per epoch


def test_the_recorded_gradient_norms_are_the_norms_of_each_sections_weight_gradients() -> None:
    net = seeded("residual", 8)
    x, y = cifar_batch()
    stats = dynamics.training_dynamics(net, x, y)
    assert [k for k in stats if k.startswith("grad_norm/")] == ["grad_norm/stem", "grad_norm/stage1", "grad_norm/stage2",
                                                                 "grad_norm/stage3", "grad_norm/classifier"]
    net.train()
    nn.functional.cross_entropy(net(x), y).backward()  # the same train-mode step, by hand
    stage2 = net.stages[1][0]
    expected = math.sqrt(stage2.conv1.weight.grad.norm() ** 2 + stage2.conv2.weight.grad.norm() ** 2)
    assert stats["grad_norm/stage2"] == pytest.approx(float(expected), rel=1e-5)


def test_branch_ratios_per_stage_are_recorded_only_inside_the_with_block() -> None:
    net = seeded("residual", 14)
    x, _ = cifar_batch()
    with dynamics.record_branch_ratios(net) as ratios:
        net(x)
    net(x)
    per_stage = ratios.per_stage()
    assert list(per_stage) == ["branch_ratio/stage1", "branch_ratio/stage2", "branch_ratio/stage3"]
    assert all(0 < float(v) < 10 for v in per_stage.values())
    assert set(ratios.counts.values()) == {1}
    assert all("residual_branch" not in ref.module.__dict__ for ref in dynamics.blocks(net))


# ----------------------------------------------------------------------------- lesions


def test_removing_any_identity_block_leaves_the_output_unchanged() -> None:
    net, (x, _) = identity_resnet(), cifar_batch()
    intact = outputs(net, x)
    for ref in dynamics.blocks(net):
        with probe.removed(ref):
            assert torch.allclose(outputs(net, x), intact, atol=1e-6), ref.name


def test_lesion_of_identity_blocks_changes_neither_error_nor_loss() -> None:
    rows = probe.lesion(identity_resnet(), *cifar_batch())
    intact, lesions = rows[0], rows[1:]
    assert intact["removed"] is None and len(lesions) == 3
    assert all(r["removable"] and r["error"] == intact["error"] for r in lesions)
    assert all(r["loss"] == pytest.approx(intact["loss"], abs=1e-6) for r in lesions)


def test_removing_a_real_block_changes_the_output() -> None:
    net, (x, _) = seeded("residual", 8), cifar_batch()
    intact = outputs(net, x)
    with probe.removed(dynamics.blocks(net)[0]):
        assert not torch.allclose(outputs(net, x), intact)


def test_removed_block_uses_the_shortcut_scale() -> None:
    net, (x, _) = identity_resnet(14), cifar_batch()
    last = dynamics.blocks(net)[-1]  # 64 → 64 channels: its shortcut is the identity
    last.module.shortcut_scale = 0.5
    with torch.no_grad():
        net.eval()
        features = net.stages[:2](net.stem(x))
        features = net.stages[2][:-1](features)
        with probe.removed(last):
            assert torch.allclose(last.module(features), 0.5 * features)


def test_lesion_restores_the_model() -> None:
    for arch in ("plain", "residual"):
        net, batch = seeded(arch, 8), cifar_batch()
        before, state = outputs(net, batch[0]), {k: v.clone() for k, v in net.state_dict().items()}
        net.train()
        probe.lesion(net, *batch)
        assert net.training
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
        assert torch.equal(outputs(net, batch[0]), before)


def test_plain_blocks_that_change_shape_are_not_removable() -> None:
    rows = {r["removed"]: r for r in probe.lesion(seeded("plain", 14), *cifar_batch())}
    assert not rows["stages.1.0"]["removable"] and rows["stages.1.0"]["error"] is None
    assert rows["stages.0.1"]["removable"] and rows["stages.1.1"]["removable"]
    assert rows["stages.0.0"]["removable"]  # 16 → 16 channels at stride 1: the identity fits


# ----------------------------------------------------------------------------- across depths


def test_probe_depths_gives_one_tidy_row_per_net_and_a_figure() -> None:
    frame = probe.probe_depths(["plain", "residual"], [8, 14], batch=cifar_batch(8), seed=0)
    assert list(frame.columns) == probe.PROBE_COLUMNS + ["nearby_by_lag"]
    assert list(zip(frame["arch"], frame["depth"])) == [("plain", 8), ("plain", 14), ("residual", 8), ("residual", 14)]
    assert frame.drop(columns=["arch", "variant"]).notna().all().all()
    assert (frame["gradient_correlation"] == frame["unrelated_image_gradient_cosine"]).all()  # the former key, kept
    source = probe.ProbeSource.of(None, 8, 0)
    fig = probe.probe_figure(frame, source)
    assert isinstance(fig, Figure) and len(fig.axes) == len(probe.PANELS)
    assert "SYNTHETIC" in fig._suptitle.get_text() and "batch 8, seed 0" in fig._suptitle.get_text()
    decay = probe.decay_table(frame)
    assert len(decay) == 4 * (probe.WALK_POINTS - 1)
    assert decay["distance"].max() == pytest.approx(probe.WALK_SPAN)


def test_probe_depths_probes_each_variant_a_net_accepts() -> None:
    variants = [{}, {"norm": "none", "init": "skipinit"}]
    frame = probe.probe_depths(["plain", "residual"], [8], batch=cifar_batch(8), seed=0, variants=variants)
    assert list(zip(frame["arch"], frame["variant"])) == [("plain", ""), ("residual", ""), ("residual", "init=skipinit-norm=none")]
    skipinit = frame[frame.variant != ""].iloc[0]
    assert skipinit["branch_ratio"] == 0.0 and skipinit["logit_std"] > 0


def test_probe_depths_builds_the_same_nets_for_the_same_seed_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = probe.probe_depths(["residual"], [8], batch=cifar_batch(8), seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.equals(probe.probe_depths(["residual"], [8], batch=cifar_batch(8), seed=1))


def test_probe_depths_rejects_an_unknown_arch() -> None:
    with pytest.raises(ValueError, match="allowed: plain, residual"):
        probe.probe_depths(["dense"], [8], batch=cifar_batch(4), seed=0)


# ----------------------------------------------------------------------------- the paper's numbers


def paper_cell(depth: int = 56, **train) -> dict:
    """A cell trained exactly as He et al. 2015 §4.2 (ResNet-110 with its warm-up)."""
    warmup = {"warmup_lr": 0.01, "warmup_until_err": 80.0} if depth == 110 else {}
    spec = TrainSpec(milestones=[32_000, 48_000], **{**warmup, **train})
    return Cell("residual", depth, 0, "A", spec, DataSpec()).to_dict()


@pytest.mark.parametrize("depth", sorted(paper.TABLE6_TEST_ERROR))
def test_the_papers_recipe_gets_table_6s_number(depth: int) -> None:
    assert paper.paper_test_error(paper_cell(depth)) == paper.TABLE6_TEST_ERROR[depth]


def test_default_milestones_are_the_papers_32k_and_48k() -> None:
    recipe = paper_cell()
    recipe["train"]["milestones"] = None
    assert paper.paper_test_error(recipe) == 6.97


@pytest.mark.parametrize("change", [
    {"arch": "plain"}, {"shortcut": "B"}, {"depth": 14},
    {"train": {"iterations": 32_000}}, {"train": {"milestones": [30_000, 45_000]}}, {"train": {"lr": 0.05}},
    {"train": {"momentum": 0.0}}, {"train": {"weight_decay": 5e-4}}, {"train": {"batch_size": 256}},
    {"train": {"iterations": None, "epochs": 164}}, {"train": {"warmup_lr": 0.01}},
    {"data": {"val_split": 5000}}, {"data": {"train_size": 1000}}, {"data": {"normalize": "channel"}},
    {"data": {"source": "synthetic"}},
])
def test_any_other_recipe_has_no_paper_number(change: dict) -> None:
    recipe = paper_cell()
    for key, value in change.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    assert paper.paper_test_error(recipe) is None


def test_resnet110_without_the_papers_warmup_has_no_paper_number() -> None:
    recipe = paper_cell(110)
    recipe["train"]["warmup_lr"] = None
    assert paper.paper_test_error(recipe) is None


def test_the_table_cites_its_source_and_the_110_layer_runs() -> None:
    assert "1512.03385" in paper.CITATION and "Table 6" in paper.CITATION


def test_paper_module_does_not_need_torch() -> None:
    code = "import sys, depthlab.paper; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
