"""The ablation options of a net: each one changes exactly what it says, and the defaults change nothing."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from depthlab.models import (
    IMAGE_SHAPE, MLP_WIDTHS, NUM_CLASSES, CifarNet, Layers, PadShortcut, PostBlock, PreBlock, ProjectionShortcut,
    build_net, count_params, delta_orthogonal_, net_size, residual_blocks,
)
from depthlab.options import NetSpec, net_spec_error

FAMILIES, BLOCKS, NORMS = ("conv", "mlp"), ("post", "pre"), ("bn", "none")


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(seed))


def blocks(net: CifarNet) -> list[nn.Module]:
    return [block for stage in net.stages for block in stage]


def weighted_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --- the spec --------------------------------------------------------------------------------------------------


def test_options_can_be_imported_without_torch() -> None:
    code = "import sys, depthlab.options; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_default_spec_lists_no_options_so_existing_names_stay() -> None:
    assert NetSpec("residual", 56).non_default() == ()
    assert NetSpec("plain", 20, shortcut_scale=1).non_default() == ()


def test_non_default_options_are_listed_in_field_order() -> None:
    spec = NetSpec("residual", 20, block="pre", shortcut="B", family="mlp", shortcut_scale=0)
    assert spec.non_default() == (("family", "mlp"), ("shortcut", "B"), ("shortcut_scale", 0.0), ("block", "pre"))


def test_a_plain_net_ignores_the_shortcut_options() -> None:
    assert NetSpec("plain", 20, shortcut="B", shortcut_scale=0.5).canonical() == NetSpec("plain", 20)
    assert NetSpec("plain", 20, shortcut="B", shortcut_scale=0.5, norm="none").non_default() == (("norm", "none"),)
    assert net_size(NetSpec("plain", 8, shortcut="B")) == net_size(NetSpec("plain", 8, shortcut="A"))


@pytest.mark.parametrize(
    "spec, words",
    [
        (NetSpec("plain", 20, init="zero_gamma"), ["zero_gamma", "residual"]),
        (NetSpec("residual", 20, init="zero_gamma", norm="none"), ["zero_gamma", "norm bn"]),
        (NetSpec("residual", 20, shortcut_scale=math.inf), ["shortcut_scale", "inf"]),
        (NetSpec("residual", 20, shortcut_scale=True), ["shortcut_scale", "True"]),
        (NetSpec("residual", 20, norm="layer"), ["norm", "bn, none", "'layer'"]),
        (NetSpec("residual", 20, init="xavier"), ["init", "he, zero_gamma, delta_orthogonal"]),
        (NetSpec("residual", 20, block="middle"), ["block", "post, pre"]),
        (NetSpec("residual", 20, family="cnn"), ["family", "conv, mlp"]),
        (NetSpec("residual", 21), ["6n+2"]),
    ],
)
def test_an_impossible_spec_is_named_and_refused_by_the_builder(spec: NetSpec, words: list[str]) -> None:
    problem = net_spec_error(spec)
    assert problem is not None and all(word in problem for word in words)
    with pytest.raises(ValueError, match=re.escape(problem)):
        build_net(spec)


@pytest.mark.parametrize("family, block", list(itertools.product(FAMILIES, BLOCKS)))
def test_plain_pre_activation_nets_and_orthogonal_mlps_are_allowed(family: str, block: str) -> None:
    for spec in (NetSpec("plain", 8, family=family, block=block), NetSpec("residual", 8, family=family, init="delta_orthogonal")):
        assert net_spec_error(spec) is None


# --- the contract every net keeps ------------------------------------------------------------------------------


@pytest.mark.parametrize("family, arch, block, norm", list(itertools.product(FAMILIES, ("plain", "residual"), BLOCKS, NORMS)))
def test_every_net_keeps_the_probe_contract(family: str, arch: str, block: str, norm: str) -> None:
    net = build_net(NetSpec(arch, 8, family=family, block=block, norm=norm))
    x = images()
    assert torch.equal(net(x), net.classifier(net.pool(net.final_norm(net.stages(net.stem(x))))))
    assert isinstance(net.stages, nn.Sequential) and len(net.stages) == 3
    assert all(isinstance(stage, nn.Sequential) for stage in net.stages)
    h = net.stem(x)
    for block_ in blocks(net):
        assert (block_.shortcut is None) == (arch == "plain")
        assert block_.shortcut_scale == (1.0 if arch == "residual" else 0.0)
        assert block_.residual_branch(block_.preactivate(h)).shape == block_(h).shape
        h = block_(h)
    projections = sum(len(weighted_layers(b.shortcut)) for b in blocks(net) if b.shortcut is not None)
    assert len(weighted_layers(net)) - projections == 8
    assert net(x).shape == (4, NUM_CLASSES)


def test_default_nets_keep_the_state_dict_keys_their_saved_weights_use() -> None:
    keys = set(build_net(NetSpec("residual", 8, shortcut="B")).state_dict())
    expected = {"stem.0.weight", "stem.1.weight", "stages.0.0.conv1.weight", "stages.0.0.bn1.running_mean",
                "stages.2.0.conv2.weight", "stages.2.0.bn2.bias", "stages.1.0.shortcut.0.weight",
                "stages.1.0.shortcut.1.running_var", "classifier.weight", "classifier.bias"}
    assert expected <= keys
    assert not any(k.startswith(("final_norm", "pool")) for k in keys)


def test_net_size_is_cached_per_spec_and_counts_the_net() -> None:
    spec = NetSpec("residual", 8, family="mlp", norm="none")
    assert net_size(spec) is net_size(spec)
    assert net_size(spec)[0] == count_params(build_net(spec))


# --- shortcut scale λ ------------------------------------------------------------------------------------------


def loss_and_grads(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad()
    out = net(x)
    out.square().sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("family, block, shortcut", list(itertools.product(FAMILIES, BLOCKS, ("A", "B"))))
def test_shortcut_scale_zero_is_exactly_the_plain_net(family: str, block: str, shortcut: str) -> None:
    residual = build_net(NetSpec("residual", 8, family=family, block=block, shortcut=shortcut, shortcut_scale=0.0))
    plain = build_net(NetSpec("plain", 8, family=family, block=block))
    missing, unexpected = plain.load_state_dict(residual.state_dict(), strict=False)
    assert not missing and all(".shortcut." in key for key in unexpected)
    assert bool(unexpected) == (shortcut == "B")  # option A adds no parameters
    x = images()
    residual_out, residual_grads = loss_and_grads(residual, x)
    plain_out, plain_grads = loss_and_grads(plain, x)
    assert torch.equal(residual_out, plain_out)
    for name, grad in residual_grads.items():
        if name in plain_grads:
            assert torch.equal(grad, plain_grads[name]), name
        else:  # option B's projection W_s is computed but, scaled by 0, learns nothing
            assert torch.count_nonzero(grad) == 0, name


def test_shortcut_scale_multiplies_the_shortcut_before_the_add() -> None:
    block = PreBlock(4, 4, shortcut=nn.Identity(), shortcut_scale=0.25)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(block(x), block.residual_branch(x) + 0.25 * x)


# --- initialisation ------------------------------------------------------------------------------------------


def through_shortcuts(net: CifarNet, x: torch.Tensor) -> torch.Tensor:
    """What the net computes when every block is replaced by its shortcut."""
    h = net.stem(x)
    for block in blocks(net):
        h = block.shortcut(block.preactivate(h))
    return net.classifier(net.pool(net.final_norm(h)))


@pytest.mark.parametrize("family, block", list(itertools.product(FAMILIES, BLOCKS)))
def test_zero_gamma_makes_every_residual_block_its_shortcut_at_init(family: str, block: str) -> None:
    net = build_net(NetSpec("residual", 14, family=family, block=block, init="zero_gamma"))
    x = images()
    h = net.stem(x)
    for block_ in blocks(net):
        assert torch.count_nonzero(block_.residual_branch(block_.preactivate(h))) == 0
        if isinstance(block_.shortcut, nn.Identity):
            assert torch.equal(block_(h.relu()), h.relu())  # post-ReLU activations are non-negative
        h = block_(h)
    assert torch.equal(net(x), through_shortcuts(net, x))


def test_zero_gamma_makes_the_first_stage_the_identity_and_only_stage_entries_change_the_signal() -> None:
    net = build_net(NetSpec("residual", 14, init="zero_gamma"))
    x = images()
    stem = net.stem(x)
    assert torch.equal(net.stages[0](stem), stem)
    pads = [b.shortcut for b in residual_blocks(net) if isinstance(b.shortcut, PadShortcut)]
    assert len(pads) == 2  # entering stages 2 and 3: the only blocks that are not the identity


def test_zero_gamma_zeroes_only_the_last_gamma_of_each_post_branch() -> None:
    net = build_net(NetSpec("residual", 8, shortcut="B", init="zero_gamma"))
    for block in residual_blocks(net):
        assert torch.count_nonzero(block.bn2.weight) == 0
        assert torch.all(block.bn1.weight == 1)
        if isinstance(block.shortcut, ProjectionShortcut):
            assert torch.all(block.shortcut[1].weight == 1)


def test_zero_gamma_in_a_pre_block_zeroes_the_last_conv_and_leaves_every_gamma_at_one() -> None:
    """The last BN of a pre-activation branch feeds a ReLU: a zero γ there would stop every gradient of the branch."""
    net = build_net(NetSpec("residual", 8, block="pre", init="zero_gamma"))
    for block in residual_blocks(net):
        assert torch.count_nonzero(block.conv2.weight) == 0
        assert torch.count_nonzero(block.conv1.weight) > 0
        assert all(torch.all(m.weight == 1) for m in block.modules() if isinstance(m, nn.BatchNorm2d))


BRANCH_INITS = ("he", "zero_gamma", "delta_orthogonal", "skipinit")


def branch_parameters(block: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of a block outside its shortcut: the weighted layers, norms and α of the residual branch."""
    return {name: p for name, p in block.named_parameters() if not name.startswith("shortcut.")}


def one_sgd_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()


@pytest.mark.parametrize("block, init, norm", [c for c in itertools.product(BLOCKS, BRANCH_INITS, NORMS)
                                                if net_spec_error(NetSpec("residual", 8, block=c[0], init=c[1], norm=c[2])) is None])
def test_every_branch_parameter_learns_after_one_step_for_every_block_and_init(block: str, init: str, norm: str) -> None:
    torch.manual_seed(0)
    net = build_net(NetSpec("residual", 8, block=block, init=init, norm=norm))
    one_sgd_step(net, images(8), torch.arange(8) % NUM_CLASSES)
    for index, block_ in enumerate(blocks(net)):
        for name, parameter in branch_parameters(block_).items():
            assert parameter.grad is not None and torch.count_nonzero(parameter.grad) > 0, f"block {index}: {name}"


def test_a_zero_gamma_in_front_of_a_relu_would_stop_the_branch_for_good() -> None:
    """Why the pre block zeroes its last conv: the γ the post block zeroes is, in a pre block, followed by a ReLU."""
    torch.manual_seed(0)
    net = build_net(NetSpec("residual", 8, block="pre"))
    with torch.no_grad():
        for block in residual_blocks(net):
            block.bn2.weight.zero_()
    one_sgd_step(net, images(8), torch.arange(8) % NUM_CLASSES)
    assert all(torch.count_nonzero(block.conv1.weight.grad) == 0 for block in residual_blocks(net))


@pytest.mark.parametrize("init", ["zero_gamma", "skipinit"])
def test_inits_that_zero_a_branch_need_a_residual_net(init: str) -> None:
    problem = net_spec_error(NetSpec("plain", 8, init=init))
    assert problem is not None and init in problem and "residual" in problem


# --- SkipInit: residual nets without BatchNorm --------------------------------------------------------------------


def logit_std(spec: NetSpec) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        return float(build_net(spec)(images(32)).std())


def test_skipinit_keeps_the_logits_of_a_resnet_without_batchnorm_finite_at_depth() -> None:
    shallow, deep = (logit_std(NetSpec("residual", d, norm="none", init="skipinit")) for d in (8, 110))
    assert 1 / 4 < deep / shallow < 4
    he_shallow, he_deep = (logit_std(NetSpec("residual", d, norm="none")) for d in (8, 110))
    assert he_deep / he_shallow > 1e3  # what it prevents: He init without BN doubles the signal's variance per block


def test_skipinit_starts_every_branch_at_alpha_zero_with_one_parameter_per_block() -> None:
    net = build_net(NetSpec("residual", 8, norm="none", init="skipinit"))
    x = images()
    h = net.stem(x)
    for block in residual_blocks(net):
        assert block.branch_scale is not None and float(block.branch_scale.detach()) == 0.0
        assert torch.count_nonzero(block.residual_branch(block.preactivate(h))) == 0
        h = block(h)
    assert torch.equal(net(x), through_shortcuts(net, x))
    assert count_params(net) == count_params(build_net(NetSpec("residual", 8, norm="none"))) + len(residual_blocks(net))


def assert_orthogonal(matrix: torch.Tensor, gain: float) -> None:
    """Orthonormal columns when the matrix is tall or square, orthonormal rows when it is wide, times gain."""
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    assert torch.allclose(gram, gain**2 * torch.eye(gram.shape[0]), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_orthogonal_kernels_are_an_orthogonal_centre_tap(family: str) -> None:
    net = build_net(NetSpec("residual", 8, family=family, shortcut="B", init="delta_orthogonal", norm="none"))
    layers = [m for m in weighted_layers(net) if m is not net.classifier]
    assert len(layers) == 7 + 2  # seven weighted layers before the classifier, two projections
    for layer in layers:
        weight = layer.weight.detach()
        if weight.dim() == 4:
            kh, kw = weight.shape[2:]
            centre = weight[:, :, kh // 2, kw // 2]
            off_centre = weight.clone()
            off_centre[:, :, kh // 2, kw // 2] = 0
            assert torch.count_nonzero(off_centre) == 0
        else:
            centre = weight
        assert_orthogonal(centre, math.sqrt(2))
        assert torch.count_nonzero(layer.bias) == 0


def test_delta_orthogonal_with_fewer_outputs_than_inputs_has_orthonormal_rows() -> None:
    weight = torch.empty(8, 16, 3, 3)
    delta_orthogonal_(weight, gain=1.0)
    assert_orthogonal(weight[:, :, 1, 1], 1.0)


def test_he_init_scales_mlp_layers_by_their_inputs() -> None:
    net = build_net(NetSpec("plain", 8, family="mlp"))
    first = net.stem[1].weight.detach()
    assert first.shape == (MLP_WIDTHS[0], math.prod(IMAGE_SHAPE))
    assert first.std().item() == pytest.approx(math.sqrt(2 / first.shape[1]), rel=0.02)


# --- normalisation and block order ---------------------------------------------------------------------------


@pytest.mark.parametrize("family, block", list(itertools.product(FAMILIES, BLOCKS)))
def test_norm_none_has_no_batchnorm_and_every_weighted_layer_has_a_bias(family: str, block: str) -> None:
    net = build_net(NetSpec("residual", 8, family=family, block=block, shortcut="B", norm="none"))
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in net.modules())
    assert all(layer.bias is not None for layer in weighted_layers(net))
    assert torch.isfinite(net(images())).all()


def test_a_pre_block_adds_without_a_relu_after_the_add() -> None:
    block = PreBlock(4, 4, shortcut=nn.Identity(), layers=Layers(norm="none"))
    with torch.no_grad():  # make the branch output exactly -1 everywhere
        block.conv2.weight.zero_()
        block.conv2.bias.fill_(-1.0)
    x = torch.full((1, 4, 8, 8), 0.5)
    # F(x) + x = -1 + 0.5 = -0.5; a ReLU after the add would give 0
    assert torch.equal(block(x), torch.full_like(x, -0.5))


def call_order(net: nn.Module, x: torch.Tensor, kinds=(nn.Conv2d, nn.BatchNorm2d, PadShortcut)) -> list[str]:
    """The names of the convs, norms and pad shortcuts in the order the forward calls them."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda m, i, o, name=name: order.append(name))
               for name, m in net.named_modules() if isinstance(m, kinds)]
    net(x)
    for h in handles:
        h.remove()
    return order


def test_the_pre_net_has_the_layer_order_of_the_reference_preresnet() -> None:
    """fb.resnet.torch preresnet.lua: stem conv-BN-ReLU; stage 1's first block starts at its conv; where the shape
    changes BN-ReLU comes before the split (the shortcut sees it); elsewhere it opens the branch; BN-ReLU before pooling."""
    net = build_net(NetSpec("residual", 14, block="pre"))
    assert [type(m) for m in net.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert [type(m) for m in net.final_norm] == [nn.BatchNorm2d, nn.ReLU]
    assert [[b.preact for b in stage] for stage in net.stages] == [["none", "branch"], ["shared", "branch"], ["shared", "branch"]]
    assert isinstance(net.stages[0][0].bn1, nn.Identity)
    assert call_order(net, images()) == [
        "stem.0", "stem.1",
        "stages.0.0.conv1", "stages.0.0.bn2", "stages.0.0.conv2",
        "stages.0.1.bn1", "stages.0.1.conv1", "stages.0.1.bn2", "stages.0.1.conv2",
        "stages.1.0.bn1", "stages.1.0.conv1", "stages.1.0.bn2", "stages.1.0.conv2", "stages.1.0.shortcut",
        "stages.1.1.bn1", "stages.1.1.conv1", "stages.1.1.bn2", "stages.1.1.conv2",
        "stages.2.0.bn1", "stages.2.0.conv1", "stages.2.0.bn2", "stages.2.0.conv2", "stages.2.0.shortcut",
        "stages.2.1.bn1", "stages.2.1.conv1", "stages.2.1.bn2", "stages.2.1.conv2",
        "final_norm.0"]


def test_where_the_shape_changes_the_pre_nets_shortcut_carries_the_activated_input() -> None:
    net = build_net(NetSpec("residual", 8, block="pre"))
    seen: dict[str, torch.Tensor] = {}
    entry, transition = net.stages[0][0], net.stages[1][0]
    handles = [transition.shortcut.register_forward_hook(lambda m, i, o: seen.update(shortcut_input=i[0])),
               transition.register_forward_hook(lambda m, i, o: seen.update(block_input=i[0])),
               entry.conv1.register_forward_hook(lambda m, i, o: seen.update(first_conv_input=i[0])),
               net.stem.register_forward_hook(lambda m, i, o: seen.update(stem_output=o))]
    net(images())
    for h in handles:
        h.remove()
    assert torch.equal(seen["shortcut_input"], transition.bn1(seen["block_input"]).relu())  # BN and ReLU before the split
    assert torch.equal(seen["first_conv_input"], seen["stem_output"])  # the stem's BN-ReLU is the first block's


def post_to_pre_names(net: CifarNet) -> dict[str, str]:
    """Module names of a plain post net → the same layer in the plain pre net: a post block's bn1 is the pre
    block's bn2, and its bn2 (after conv2) is the next pre block's bn1, or the final norm after the last block."""
    names = [f"stages.{s}.{b}" for s, stage in enumerate(net.stages) for b in range(len(stage))]
    mapping = {"stem.0": "stem.0", "stem.1": "stem.1", "classifier": "classifier"}
    for index, name in enumerate(names):
        following = f"{names[index + 1]}.bn1" if index + 1 < len(names) else "final_norm.0"
        mapping.update({f"{name}.conv1": f"{name}.conv1", f"{name}.conv2": f"{name}.conv2",
                        f"{name}.bn1": f"{name}.bn2", f"{name}.bn2": following})
    return mapping


def test_a_plain_pre_net_is_the_plain_post_net_with_its_norms_renamed() -> None:
    """For a plain net the two block orders are the same conv-BN-ReLU sequence: one network, identical numbers."""
    torch.manual_seed(0)
    post, pre = build_net(NetSpec("plain", 14)), build_net(NetSpec("plain", 14, block="pre"))
    mapping = post_to_pre_names(post)
    state = {}
    for key, value in post.state_dict().items():
        module, attribute = key.rsplit(".", 1)
        state[f"{mapping[module]}.{attribute}"] = value
    pre.load_state_dict(state, strict=True)
    x = images(8)
    with torch.no_grad():
        assert torch.allclose(pre(x), post(x), atol=1e-5)  # train mode: the same batch statistics at the same places


def test_a_pre_block_normalises_its_input_width_unless_its_input_is_already_activated() -> None:
    assert isinstance(PreBlock(16, 16, preact="none").bn1, nn.Identity)
    with pytest.raises(ValueError, match="preact"):
        PreBlock(16, 16, preact="both")


def test_a_pre_block_normalises_its_input_width() -> None:
    block = PreBlock(16, 32, stride=2, shortcut=PadShortcut(16, 32, 2))
    assert block.bn1.num_features == 16 and block.bn2.num_features == 32
    assert block(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)


# --- the MLP family --------------------------------------------------------------------------------------------


def mlp_params_from_widths(depth: int, arch: str, shortcut: str, norm: str) -> int:
    """What the widths imply for a `post` MLP: weights, plus per unit a BN γ and β or a bias."""
    per_unit = 2 if norm == "bn" else 1

    def layer(n_in: int, n_out: int) -> int:
        return n_in * n_out + per_unit * n_out

    n = (depth - 2) // 6
    total, width = layer(math.prod(IMAGE_SHAPE), MLP_WIDTHS[0]), MLP_WIDTHS[0]
    for stage_width in MLP_WIDTHS:
        total += layer(width, stage_width) + (2 * n - 1) * layer(stage_width, stage_width)
        if arch == "residual" and shortcut == "B" and width != stage_width:
            total += layer(width, stage_width)
        width = stage_width
    return total + width * NUM_CLASSES + NUM_CLASSES


@pytest.mark.parametrize("depth", [8, 20, 56])
@pytest.mark.parametrize("arch, shortcut", [("plain", "A"), ("residual", "A"), ("residual", "B")])
@pytest.mark.parametrize("norm", NORMS)
def test_mlp_parameter_count_is_what_its_widths_imply(depth: int, arch: str, shortcut: str, norm: str) -> None:
    spec = NetSpec(arch, depth, family="mlp", shortcut=shortcut, norm=norm)
    assert count_params(build_net(spec)) == mlp_params_from_widths(depth, arch, shortcut, norm)


def test_mlp_layers_are_fully_connected_on_the_flattened_image() -> None:
    net = build_net(NetSpec("residual", 8, family="mlp"))
    assert not any(isinstance(m, nn.Conv2d) for m in net.modules())
    assert any(isinstance(m, nn.BatchNorm1d) for m in net.modules())
    assert [stage[0].conv1.out_features for stage in net.stages] == list(MLP_WIDTHS)


def test_mlp_option_a_zero_pads_the_new_units() -> None:
    x = torch.randn(3, 64)
    out = PadShortcut(64, 128, 1)(x)
    assert torch.equal(out[:, :64], x) and torch.count_nonzero(out[:, 64:]) == 0
