"""K nets of one architecture as one grouped model: the seeds of a net trained side by side, exactly apart.

Each layer of the grouped net holds the K nets' layers side by side: a conv has K× the channels
and `groups=K`, so net k's output channels see only net k's input channels; a BatchNorm has
K×C channels and its statistics are per channel, hence per net; option A pads each net's channels
on its own, option B's projection is a grouped 1×1 conv, the classifier a grouped linear layer,
and SkipInit's α one scalar per net. The input is the K nets' batches stacked along the channel
axis (net k's images in channels 3k…3k+2), the logits are the K nets' logits side by side.
Nothing mixes the nets: each net's output depends only on its own weights and its own images,
so the sum of the K nets' mean losses gives each net exactly its own gradient, and SGD with
momentum and weight decay, being elementwise, steps each net as if it trained alone.

A grouped model has the same module names as one net, and each of its tensors is the K nets'
tensors joined along the first axis (`pack`/`unpack`), so a net's state dict, optimizer state
and checkpoint move between a group and a solo run unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models import NUM_CLASSES, CifarNet, Layers, PadShortcut, ProjectionShortcut
from .options import NetSpec


class GroupedLinear(nn.Module):
    """K linear layers side by side: (batch, K·in) → (batch, K·out), net k's outputs from net k's inputs only.

    `weight` is the K nets' (out, in) weights joined along the first axis, as `pack` joins them.
    """

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members * out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(members * out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default; `pack` overwrites it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.view(self.members, self.out_features, self.in_features)
        out = torch.einsum("bki,koi->bko", x.unflatten(1, (self.members, self.in_features)), weight).flatten(1)
        return out if self.bias is None else out + self.bias


class GroupedPadShortcut(PadShortcut):
    """Option A for K nets: subsample, then zero-pad each net's channels at the end of its own block of channels."""

    def __init__(self, members: int, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, stride)
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        per_net = x.unflatten(1, (self.members, -1))
        return F.pad(per_net, (0, 0) * (per_net.dim() - 3) + (0, self.extra_channels)).flatten(1, 2)


@dataclass(frozen=True)
class GroupedLayers(Layers):
    """`Layers` for K nets side by side: the same blocks, written once in models.py, get grouped layers."""

    members: int = 1

    def weighted(self, in_width: int, out_width: int, stride: int = 1) -> nn.Module:
        bias, k = self.norm == "none", self.members
        if self.family == "mlp":
            return GroupedLinear(k, in_width, out_width, bias)
        return nn.Conv2d(k * in_width, k * out_width, 3, stride=stride, padding=1, bias=bias, groups=k)

    def normalise(self, width: int) -> nn.Module:
        return super().normalise(self.members * width)

    def shortcut(self, in_width: int, out_width: int, stride: int, option: str) -> nn.Module:
        if stride == 1 and in_width == out_width:
            return nn.Identity()
        if option == "A":
            return GroupedPadShortcut(self.members, in_width, out_width, stride)
        return ProjectionShortcut(in_width, out_width, stride, self)

    def projection(self, in_width: int, out_width: int, stride: int) -> nn.Module:
        bias, k = self.norm == "none", self.members
        if self.family == "mlp":
            return GroupedLinear(k, in_width, out_width, bias)
        return nn.Conv2d(k * in_width, k * out_width, 1, stride=stride, bias=bias, groups=k)

    def classifier(self, in_width: int, num_classes: int) -> nn.Module:
        return GroupedLinear(self.members, in_width, num_classes)

    def branch_scale(self) -> nn.Parameter:
        return nn.Parameter(torch.ones(self.members))


def build_grouped_net(spec: NetSpec, members: int) -> CifarNet:
    """K nets of `spec` as one grouped model (its initial weights are placeholders: `pack` the nets' own into it)."""
    spec = spec.canonical()
    return CifarNet(spec, NUM_CLASSES, GroupedLayers(spec.family, spec.norm, members))


# ----------------------------------------------------------------------------- packing


def pack(nets: list[dict[str, torch.Tensor]], grouped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The K nets' state dicts as one grouped state dict shaped like `grouped`.

    A tensor is joined along its first axis; a scalar that the group holds once per net (SkipInit's α)
    is stacked; a scalar the group holds once (BatchNorm's step count) must agree over the nets.
    """
    packed = {}
    for key, like in grouped.items():
        parts = [net[key] for net in nets]
        if like.dim() == 0:
            if any(not torch.equal(part, parts[0]) for part in parts):
                raise ValueError(f"{key} differs between the nets of a group ({[p.item() for p in parts]}): they must be at the same step")
            packed[key] = parts[0].clone()
        elif parts[0].dim() == 0:
            packed[key] = torch.stack(parts)
        else:
            packed[key] = torch.cat(parts)
    return packed


def unpack(grouped: dict[str, torch.Tensor], net: dict[str, torch.Tensor], members: int) -> list[dict[str, torch.Tensor]]:
    """The grouped state dict as K state dicts shaped like one net's (`net`): the inverse of `pack`."""
    nets: list[dict[str, torch.Tensor]] = [{} for _ in range(members)]
    for key, like in net.items():
        value = grouped[key]
        if value.dim() == 0:
            parts = [value.clone() for _ in range(members)]
        elif like.dim() == 0:
            parts = [value[k].clone() for k in range(members)]
        else:
            parts = [part.clone() for part in value.chunk(members)]
        for state, part in zip(nets, parts):
            state[key] = part
    return nets


def _by_name(model: nn.Module, optimizer_state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """An SGD state dict's per-parameter state keyed by parameter name (its keys are positions in model.parameters())."""
    names = [name for name, _ in model.named_parameters()]
    return {names[index]: state for index, state in optimizer_state["state"].items()}


def pack_optimizer(nets: list[dict], net_model: nn.Module, grouped_model: nn.Module, grouped_optimizer: dict) -> dict:
    """The K nets' SGD state dicts (momentum) as the grouped optimizer's; `grouped_optimizer` gives its param groups.

    A group trains only nets at the same step, so either every net has momentum or none has yet.
    """
    per_net = [_by_name(net_model, state) for state in nets]
    names = [name for name, _ in grouped_model.named_parameters()]
    like = dict(grouped_model.named_parameters())
    state = {}
    for index, name in enumerate(names):
        if name in per_net[0]:
            buffers = {key: [net[name][key] for net in per_net] for key in per_net[0][name]}
            state[index] = {key: pack([{name: b} for b in parts], {name: like[name].detach()})[name]
                            for key, parts in buffers.items()}
    return {"state": state, "param_groups": grouped_optimizer["param_groups"]}


def unpack_optimizer(grouped: dict, grouped_model: nn.Module, net_model: nn.Module, net_optimizer: dict, members: int) -> list[dict]:
    """The grouped SGD state dict as K state dicts of one net's optimizer (`net_optimizer` gives its param groups)."""
    per_name = _by_name(grouped_model, grouped)
    shapes = dict(net_model.named_parameters())
    nets: list[dict] = [{"state": {}, "param_groups": net_optimizer["param_groups"]} for _ in range(members)]
    for index, (name, _) in enumerate(net_model.named_parameters()):
        for key, value in per_name.get(name, {}).items():
            for k, part in enumerate(unpack({name: value}, {name: shapes[name].detach()}, members)):
                nets[k]["state"].setdefault(index, {})[key] = part[name]
    return nets


# ----------------------------------------------------------------------------- the loss


def grouped_outcome(members: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The step's loss for K nets: logits (batch, K·classes), labels (batch, K) → (sum of the nets' mean losses,
    each net's mean loss, each net's count of wrong answers). The sum gives each net its solo gradient."""

    def outcome(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per_net = logits.unflatten(1, (members, -1))
        losses = F.cross_entropy(per_net.transpose(1, 2), y, reduction="none").mean(0)
        return losses.sum(), losses, (per_net.detach().argmax(2) != y).sum(0)

    return outcome
