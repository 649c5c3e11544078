"""The CIFAR-10 networks of He et al. 2015, §4.2, and the ablations that ask why depth hurts plain nets.

The 2015 net (`NetSpec(arch, depth)` with every default) is a 3×3 conv with 16 filters, then three
stages of 2n 3×3 convs with 16, 32 and 64 filters (the first conv of stages 2 and 3 has stride 2),
then global average pooling and a 10-way linear layer. BatchNorm follows every conv, before the
ReLU. Convs come in pairs: in a residual net each pair is a block a[l+2] = relu(z[l+2] + a[l]), in
a plain net the same pair without the addition. The two families have identical layers.

The ablations (see `options.NetSpec`) change one thing each: λ in a[l+2] = g(z[l+2] + λ·shortcut(a[l])),
the initialisation, BatchNorm or none, the 2016 pre-activation block order, or fully-connected
layers on the flattened image instead of convs (the MLP family, widths `MLP_WIDTHS`).

The pre-activation net follows He et al. 2016's reference code (fb.resnet.torch, models/preresnet.lua,
the revision with `no_preact`/`both_preact` blocks): the stem is conv-BN-ReLU as in the 2015 net; the
first block of stage 1 starts at its conv (its input is already the stem's BN-ReLU); the first block
of stages 2 and 3, where the shape changes, applies BN-ReLU *before* the split, so its shortcut sees
the activated input; every other block has BN-ReLU at the start of its branch and a pure identity
shortcut; a final BN-ReLU comes before pooling.
λ = 0 gives exactly the plain net's outputs and gradients for the same weights. With option B the
projection W_s is then still computed (its BN statistics still update) but it adds nothing and gets
zero gradients, so only weight decay moves it; option A shortcuts have no parameters at all.

The contract a probe can rely on, for every net `build_net` returns:
- `net(x) == net.classifier(net.pool(net.final_norm(net.stages(net.stem(x)))))`; `stem` is the first
  weighted layer (with its norm and ReLU in `post` nets; the MLP's stem also flattens the image),
  `final_norm` is the pre-activation net's closing norm-ReLU (nn.Identity in `post` nets), `pool` is
  global average pooling and flattening (nn.Identity in the MLP), `classifier` the last nn.Linear.
- `stages` is an nn.Sequential of three nn.Sequential of blocks.
- every block has `preactivate(x)` (the pre-activation shared by branch and shortcut: BN-ReLU in the
  `pre` block where the shape changes, else the identity), `residual_branch(a)` (F(a), everything
  before the add, of the pre-activated input a = preactivate(x)), `shortcut` (a module, or None in a
  plain block), `shortcut_scale` (λ; 0.0 in a plain block, which adds nothing) and `branch_scale`
  (SkipInit's α, a learned scalar that multiplies F inside `residual_branch`; None unless init skipinit).
  A `post` block returns relu(F(a) + λ·shortcut(a)), a `pre` block F(a) + λ·shortcut(a).
- a block's weighted layers are `conv1` and `conv2`, each followed by `bn1`/`bn2` (nn.Identity
  under norm none). The MLP keeps these names for its nn.Linear and BatchNorm1d layers: they are the
  state-dict keys under which the 2015 nets' saved weights were written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
import math

import torch
import torch.nn.functional as F
from torch import nn

from .options import Init, NetSpec, Shortcut, blocks_per_stage, net_spec_error

STAGE_WIDTHS = (16, 32, 64)
MLP_WIDTHS = (64, 128, 256)  # a choice: doubling like the conv stages, so option A can zero-pad; 64 = the conv net's widest stage
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
RELU_GAIN = math.sqrt(2.0)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3×3 conv; without bias when a BatchNorm follows it and supplies one."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


@dataclass(frozen=True)
class Layers:
    """How one family makes its layers, so that each block is written once for convs and for the MLP."""

    family: str = "conv"
    norm: str = "bn"

    def weighted(self, in_width: int, out_width: int, stride: int = 1) -> nn.Module:
        """z = W a (+ b): a 3×3 conv or a linear layer; the bias only when no BatchNorm follows."""
        bias = self.norm == "none"
        if self.family == "mlp":
            return nn.Linear(in_width, out_width, bias=bias)
        return conv3x3(in_width, out_width, stride, bias)

    def normalise(self, width: int) -> nn.Module:
        """The BatchNorm after a weighted layer, or nothing."""
        if self.norm == "none":
            return nn.Identity()
        return nn.BatchNorm1d(width) if self.family == "mlp" else nn.BatchNorm2d(width)

    def shortcut(self, in_width: int, out_width: int, stride: int, option: Shortcut) -> nn.Module:
        """The identity where the shape stays, else option A (zero-pad) or B (learned projection)."""
        if stride == 1 and in_width == out_width:
            return nn.Identity()
        if option == "A":
            return PadShortcut(in_width, out_width, stride)
        return ProjectionShortcut(in_width, out_width, stride, self)

    def projection(self, in_width: int, out_width: int, stride: int) -> nn.Module:
        """Option B's W_s: a 1×1 conv or a linear layer; the bias only when no BatchNorm follows."""
        bias = self.norm == "none"
        if self.family == "mlp":
            return nn.Linear(in_width, out_width, bias=bias)
        return nn.Conv2d(in_width, out_width, 1, stride=stride, bias=bias)

    def classifier(self, in_width: int, num_classes: int) -> nn.Module:
        """The last layer, logits from the pooled features."""
        return nn.Linear(in_width, num_classes)

    def branch_scale(self) -> nn.Parameter:
        """SkipInit's α: one learned scalar per block (init_weights sets it to 0)."""
        return nn.Parameter(torch.ones(()))


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels (or MLP units). No parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, self.extra_channels))


class ProjectionShortcut(nn.Sequential):
    """Option B: a learned projection W_s (1×1 conv or linear layer, with its norm) that matches the new shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, layers: Layers = Layers()):
        super().__init__(layers.projection(in_channels, out_channels, stride), layers.normalise(out_channels))


class Block(nn.Module):
    """Two weighted layers and their norms, plus an optional shortcut scaled by λ; subclasses set the order."""

    def __init__(self, in_width: int, out_width: int, stride: int = 1, shortcut: nn.Module | None = None,
                 shortcut_scale: float = 1.0, layers: Layers = Layers(), bn1: nn.Module | None = None,
                 skip_init: bool = False):
        super().__init__()
        self.conv1 = layers.weighted(in_width, out_width, stride)
        self.bn1 = layers.normalise(out_width) if bn1 is None else bn1
        self.conv2 = layers.weighted(out_width, out_width)
        self.bn2 = layers.normalise(out_width)
        self.shortcut = shortcut
        self.shortcut_scale = shortcut_scale if shortcut is not None else 0.0
        # SkipInit (De & Smith 2020): x + α·F(x) with a learned α that starts at 0 (set by init_weights)
        self.branch_scale = layers.branch_scale() if skip_init else None

    def preactivate(self, x: torch.Tensor) -> torch.Tensor:
        """What both the branch and the shortcut receive: the block's input, unless a subclass activates it first."""
        return x

    def branch(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def residual_branch(self, a: torch.Tensor) -> torch.Tensor:
        """F(a), everything before the add (α·F(a) under SkipInit)."""
        fa = self.branch(a)
        return fa if self.branch_scale is None else scale_branch(self.branch_scale, fa)

    def add_shortcut(self, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """F(x) + λ·shortcut(x); F(x) alone in a plain block."""
        if self.shortcut is None:
            return branch
        shortcut = self.shortcut(x)
        return branch + (shortcut if self.shortcut_scale == 1.0 else self.shortcut_scale * shortcut)  # λ = 1: no extra pass


def scale_branch(scale: torch.Tensor, fa: torch.Tensor) -> torch.Tensor:
    """α·F(a): a scalar α, or one α per net when `fa` holds several nets' channels side by side (a grouped model)."""
    if scale.dim() == 0:
        return scale * fa
    per_net = fa.unflatten(1, (len(scale), -1))
    return (per_net * scale.view(-1, *[1] * (per_net.dim() - 2))).flatten(1, 2)


class PostBlock(Block):
    """He et al. 2015: a[l+2] = relu(z[l+2] + λ·shortcut(a[l])), the shortcut added *before* the last ReLU."""

    def branch(self, a: torch.Tensor) -> torch.Tensor:
        """z[l+2]: conv-BN-ReLU-conv-BN, up to (not including) the final ReLU."""
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(a)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.add_shortcut(self.residual_branch(x), x))


PREACTS = ("branch", "shared", "none")  # fb.resnet.torch's default, both_preact and no_preact blocks


class PreBlock(Block):
    """He et al. 2016 (identity mappings): a[l+2] = F(a[l]) + λ·shortcut(a[l]), with no ReLU after the add.

    The norms come before the weighted layers. `preact` says where the block's first BN-ReLU (`bn1`,
    over the input width) sits: `branch` — at the start of F, the shortcut stays a pure identity;
    `shared` — before the split, so the shortcut sees the activated input too (where the shape
    changes); `none` — no first BN-ReLU, for the block right after the stem's BN-ReLU.
    """

    def __init__(self, in_width: int, out_width: int, stride: int = 1, shortcut: nn.Module | None = None,
                 shortcut_scale: float = 1.0, layers: Layers = Layers(), skip_init: bool = False, preact: str = "branch"):
        if preact not in PREACTS:
            raise ValueError(f"preact must be one of {', '.join(PREACTS)}; got {preact!r}")
        bn1 = nn.Identity() if preact == "none" else layers.normalise(in_width)
        super().__init__(in_width, out_width, stride, shortcut, shortcut_scale, layers, bn1=bn1, skip_init=skip_init)
        self.preact = preact

    def preactivate(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(x)) if self.preact == "shared" else x

    def branch(self, a: torch.Tensor) -> torch.Tensor:
        """F: [BN-ReLU-]conv-BN-ReLU-conv, the first BN-ReLU only where it is not shared or the stem's."""
        if self.preact == "branch":
            a = F.relu(self.bn1(a))
        return self.conv2(F.relu(self.bn2(self.conv1(a))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.preactivate(x)
        return self.add_shortcut(self.residual_branch(a), a)


BLOCKS: dict[str, type[Block]] = {"post": PostBlock, "pre": PreBlock}


class CifarNet(nn.Module):
    """A 6n+2-layer net for 32×32 images: stem, three stages of n blocks, final norm, pooling, classifier."""

    def __init__(self, spec: NetSpec, num_classes: int = NUM_CLASSES, layers: Layers | None = None):
        """`layers` makes the weighted layers and norms (default: one net's, `Layers(spec.family, spec.norm)`)."""
        super().__init__()
        problem = net_spec_error(spec)
        if problem:
            raise ValueError(problem)
        self.spec = spec = spec.canonical()
        layers = layers or Layers(spec.family, spec.norm)
        widths = MLP_WIDTHS if spec.family == "mlp" else STAGE_WIDTHS
        self.stem = self._stem(layers, widths[0])
        self.stages = self._stages(spec, layers, widths)
        self.final_norm = nn.Sequential(layers.normalise(widths[-1]), nn.ReLU()) if spec.block == "pre" else nn.Identity()
        self.pool = nn.Identity() if spec.family == "mlp" else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = layers.classifier(widths[-1], num_classes)
        init_weights(self, spec.init)

    @staticmethod
    def _stem(layers: Layers, width: int) -> nn.Sequential:
        """The first weighted layer with its norm and ReLU, in both block orders (as preresnet.lua)."""
        flatten = [nn.Flatten()] if layers.family == "mlp" else []
        in_width = math.prod(IMAGE_SHAPE) if layers.family == "mlp" else IMAGE_SHAPE[0]
        return nn.Sequential(*flatten, layers.weighted(in_width, width), layers.normalise(width), nn.ReLU())

    @staticmethod
    def _stages(spec: NetSpec, layers: Layers, widths: tuple[int, ...]) -> nn.Sequential:
        """Three stages of n blocks; the first block of stages 2 and 3 widens (and, in the conv net, halves the map)."""
        n, block_type, residual = blocks_per_stage(spec.depth), BLOCKS[spec.block], spec.arch == "residual"
        skip_init = spec.init == "skipinit"
        stages, in_width = [], widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for b in range(n):
                stride = 2 if index > 0 and b == 0 and layers.family == "conv" else 1
                shortcut = layers.shortcut(in_width, width, stride, spec.shortcut) if residual else None
                # preresnet.lua's three kinds of pre-activation block, by position
                preact = {"preact": "branch" if b > 0 else ("none" if index == 0 else "shared")} if spec.block == "pre" else {}
                blocks.append(block_type(in_width, width, stride, shortcut, spec.shortcut_scale, layers,
                                         skip_init=skip_init, **preact))
                in_width = width
            stages.append(nn.Sequential(*blocks))
        return nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.final_norm(self.stages(self.stem(x)))))


def residual_blocks(net: CifarNet) -> list[Block]:
    """The blocks of a net that have a shortcut."""
    return [block for stage in net.stages for block in stage if block.shortcut is not None]


def delta_orthogonal_(weight: torch.Tensor, gain: float = RELU_GAIN) -> None:
    """Xiao et al. 2018: zero everywhere except the centre tap, which is gain × a random orthogonal matrix.

    With fewer outputs than inputs the centre has orthonormal rows, otherwise orthonormal columns.
    A linear layer's weight is its own centre tap.
    """
    centre = tuple(k // 2 for k in weight.shape[2:])
    with torch.no_grad():
        weight.zero_()
        weight[(slice(None), slice(None), *centre)] = nn.init.orthogonal_(torch.empty(weight.shape[:2]), gain)


def init_weighted_layer(layer: nn.Conv2d | nn.Linear, init: Init) -> None:
    """He init: Kaiming normal, fan_out for convs (as the paper's [13]) and fan_in for the MLP's linear
    layers (whose input layer has 48× more inputs than outputs, so fan_out would blow its output up);
    or delta-orthogonal. Biases start at zero."""
    if init == "delta_orthogonal":
        delta_orthogonal_(layer.weight)
    else:
        mode = "fan_out" if isinstance(layer, nn.Conv2d) else "fan_in"
        nn.init.kaiming_normal_(layer.weight, mode=mode, nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def zero_last_layer_(block: Block) -> None:
    """Make a residual branch output zeros while every branch parameter can still learn.

    In a `post` block the last γ (Goyal et al. 2017; torchvision's zero_init_residual): no ReLU follows
    it inside the branch, so its gradient is non-zero. In a `pre` block the last BN precedes a ReLU,
    and a zero γ (with β = 0) would leave that ReLU at 0, where its gradient is 0, killing the whole
    branch for good; so the last conv's weights are zeroed instead (as timm's pre-activation
    ResNetV2 does in `zero_init_last`): that conv gets a gradient at once, the rest after one step.
    """
    if isinstance(block, PreBlock):
        nn.init.zeros_(block.conv2.weight)
    else:
        nn.init.zeros_(block.bn2.weight)


def init_weights(net: CifarNet, init: Init = "he") -> None:
    """Initialise every layer before the classifier; BN starts as the identity (γ=1, β=0).

    zero_gamma then zeroes the last layer of each residual branch (`zero_last_layer_`), so the
    branch outputs zeros and the block starts as its shortcut (the identity within a stage);
    skipinit keeps He init and sets each branch's α to 0, with the same effect on any net, with or
    without BatchNorm. The classifier keeps PyTorch's default.
    """
    for module in chain(net.stem.modules(), net.stages.modules(), net.final_norm.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init_weighted_layer(module, init)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for block in residual_blocks(net):
        if init == "zero_gamma":
            zero_last_layer_(block)
        if block.branch_scale is not None:
            nn.init.zeros_(block.branch_scale)


def build_net(spec: NetSpec) -> CifarNet:
    """The one builder: `build_net(NetSpec("residual", 56))` is ResNet-56. A ValueError names an impossible spec."""
    return CifarNet(spec)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (the numbers in the paper's Table 6)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-accumulates of one forward pass on one image (convs and linear layers)."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


@lru_cache(maxsize=None)
def net_size(spec: NetSpec) -> tuple[int, int]:
    """(parameters, forward MACs per image) of a net, computed once per spec."""
    model = build_net(spec)
    return count_params(model), count_macs(model)

