"""The nets of He et al. 2015 §4.2: shapes, the paper's parameter counts, and the shortcut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthlab.models import PadShortcut, PostBlock, ProjectionShortcut, build_net, count_macs, count_params
from depthlab.options import NetSpec

# Table 6 of the paper, in millions of parameters (option A shortcuts).
PAPER_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS_M))
def test_resnet_parameter_counts_match_table_6(depth: int) -> None:
    params = count_params(build_net(NetSpec("residual", depth)))
    assert round(params / 1e6, 2 if depth < 100 else 1) == PAPER_PARAMS_M[depth]


def test_resnet20_has_exactly_269722_parameters() -> None:
    assert count_params(build_net(NetSpec("residual", 20))) == 269_722


@pytest.mark.parametrize("depth", [8, 20, 56])
def test_plain_and_option_a_residual_nets_have_the_same_parameters(depth: int) -> None:
    assert count_params(build_net(NetSpec("plain", depth))) == count_params(build_net(NetSpec("residual", depth, shortcut="A")))


def test_option_b_adds_a_learned_projection_where_the_shape_changes() -> None:
    net = build_net(NetSpec("residual", 20, shortcut="B"))
    projections = [m for m in net.modules() if isinstance(m, ProjectionShortcut)]
    assert len(projections) == 2  # entering stage 2 (16→32) and stage 3 (32→64)
    assert [p[0].weight.shape for p in projections] == [torch.Size([32, 16, 1, 1]), torch.Size([64, 32, 1, 1])]
    assert count_params(net) > count_params(build_net(NetSpec("residual", 20, shortcut="A")))
    assert not any(isinstance(m, ProjectionShortcut) for m in build_net(NetSpec("residual", 20, shortcut="A")).modules())


@pytest.mark.parametrize("arch", ["plain", "residual"])
@pytest.mark.parametrize("depth", [8, 14, 20, 32])
def test_depth_counts_weighted_layers(arch: str, depth: int) -> None:
    net = build_net(NetSpec(arch, depth))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [0, 7, 9, 21, 100, -4])
def test_a_depth_that_is_not_6n_plus_2_is_a_clear_error(depth: int) -> None:
    with pytest.raises(ValueError, match=r"6n\+2.*8, 14, 20, 26"):
        build_net(NetSpec("residual", depth))


def test_multiply_accumulates_grow_linearly_with_depth() -> None:
    macs = [count_macs(build_net(NetSpec("plain", d))) for d in (8, 14, 20, 26)]
    steps = {b - a for a, b in zip(macs, macs[1:])}
    assert len(steps) == 1
    # stem conv: 32·32 outputs × 16 filters × 3·3·3 inputs
    stem = 32 * 32 * 16 * 27
    assert count_macs(build_net(NetSpec("plain", 8))) > stem


def test_the_shortcut_is_added_before_the_final_relu() -> None:
    block = PostBlock(4, 4, shortcut=nn.Identity())
    with torch.no_grad():  # make the branch output exactly -1 everywhere
        block.bn2.weight.zero_()
        block.bn2.bias.fill_(-1.0)
    block.eval()
    x = torch.full((1, 4, 8, 8), 2.0)
    # relu(z + a) = relu(-1 + 2) = 1; adding after the ReLU would give relu(-1) + 2 = 2
    assert torch.allclose(block(x), torch.ones_like(x))


def test_a_residual_block_with_zero_weights_is_the_identity_but_a_plain_one_is_not() -> None:
    x = torch.rand(2, 16, 8, 8)  # post-ReLU activations are non-negative
    residual, plain = PostBlock(16, 16, shortcut=nn.Identity()), PostBlock(16, 16)
    for block in (residual, plain):
        with torch.no_grad():
            block.conv2.weight.zero_()
            block.bn2.bias.zero_()
        block.eval()
    assert torch.allclose(residual(x), x)
    assert torch.count_nonzero(plain(x)) == 0


def test_option_a_subsamples_and_zero_pads_channels() -> None:
    x = torch.randn(1, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0
