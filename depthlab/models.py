"""The CIFAR-10 networks of He et al. 2015, §4.2: plain and residual nets of depth 6n+2.

A net is a 3×3 conv with 16 filters, then three stages of 2n 3×3 convs with 16, 32 and 64
filters (the first conv of stages 2 and 3 has stride 2), then global average pooling and a
10-way linear layer. BatchNorm follows every conv, before the ReLU. Convs come in pairs:
in a residual net each pair is a block a[l+2] = relu(z[l+2] + a[l]), in a plain net the same
pair without the addition. The two families have identical layers; only the shortcut differs.
"""

from __future__ import annotations

from functools import lru_cache
import torch
import torch.nn.functional as F
from torch import nn

from .options import ARCHS, SHORTCUTS, Arch, Shortcut, blocks_per_stage

STAGE_WIDTHS = (16, 32, 64)
NUM_CLASSES = 10


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3×3 conv without bias: the BatchNorm after it has the bias."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels. No parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class ProjectionShortcut(nn.Sequential):
    """Option B: a learned 1×1 projection W_s (with BatchNorm) that matches the new shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class PlainBlock(nn.Module):
    """Two conv-BN layers, each followed by ReLU: the residual block minus its shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def residual_branch(self, x: torch.Tensor) -> torch.Tensor:
        """z[l+2]: the two convs, up to (not including) the final ReLU."""
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_branch(x))


class ResidualBlock(PlainBlock):
    """a[l+2] = relu(z[l+2] + shortcut(a[l])): the shortcut is added *before* the last ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: Shortcut = "A"):
        super().__init__(in_channels, out_channels, stride)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = ProjectionShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_branch(x) + self.shortcut(x))


class CifarNet(nn.Module):
    """A 6n+2-layer CIFAR-10 net: stem, three stages of n blocks, pooling, classifier."""

    def __init__(self, arch: Arch, depth: int, shortcut: Shortcut = "A", num_classes: int = NUM_CLASSES):
        super().__init__()
        n = blocks_per_stage(depth)
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; allowed: {', '.join(SHORTCUTS)}")
        self.arch, self.depth, self.shortcut = arch, depth, shortcut
        self.stem = nn.Sequential(conv3x3(3, STAGE_WIDTHS[0]), nn.BatchNorm2d(STAGE_WIDTHS[0]), nn.ReLU())
        stages, in_channels = [], STAGE_WIDTHS[0]
        for index, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for b in range(n):
                stride = 2 if index > 0 and b == 0 else 1
                if arch == "residual":
                    blocks.append(ResidualBlock(in_channels, width, stride, shortcut))
                else:
                    blocks.append(PlainBlock(in_channels, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init for convs, as the paper ([13]); BN starts as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(arch: Arch, depth: int, shortcut: Shortcut = "A") -> CifarNet:
    """The builder for both families: `build_model("residual", 56)` is ResNet-56."""
    return CifarNet(arch, depth, shortcut)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (the numbers in the paper's Table 6)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-accumulates of one forward pass on one image (convs and the linear layer)."""
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
def model_size(arch: Arch, depth: int, shortcut: Shortcut = "A") -> tuple[int, int]:
    """(parameters, forward MACs per image) of a net, computed once per shape."""
    model = build_model(arch, depth, shortcut)
    return count_params(model), count_macs(model)
