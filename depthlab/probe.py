"""Measure *why* deep plain nets train worse: gradients, signals, shattering, and lesions.

Two explanations of the degradation compete. The textbook one: deep plain nets suffer vanishing
or exploding gradients, and a residual block can easily become the identity. He et al. 2015 §4.1:
with BatchNorm, forward signals keep non-zero variance and gradients keep healthy norms, so
vanishing gradients are "unlikely" the cause. Later work: the input-gradients of deep plain nets
"shatter" — the gradients at *nearby* inputs decorrelate with depth, exponentially in plain nets
and far more slowly in ResNets (Balduzzi et al. 2017, measured along a 1-D walk in input space) —
and a trained ResNet survives losing a block where a plain net does not (Veit et al. 2016). This
module measures each of these on any net that has `stem`, `stages` (a Sequential of Sequentials of
blocks) and `classifier`, where a block has `residual_branch(a)` and, if residual, `shortcut` (and
optionally `shortcut_scale`, λ, and `preactivate(x)`, what branch and shortcut receive).

Everything is measured on the real forward, through hooks; only `lesion` changes what a block
computes, and it undoes that before returning.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .dynamics import WEIGHTED, BlockRef, BranchRatios, blocks, on_branches, restored
from .options import ARCHS, NetSpec, net_spec_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .config import DataSpec

PROBE_COLUMNS = ["arch", "variant", "depth", "loss", "logit_std", "grad_first", "grad_last", "grad_ratio",
                 "rel_grad_first_conv", "rel_grad_last_conv", "rel_grad_ratio", "nearby_gradient_correlation",
                 "nearby_gradient_correlation_far", "unrelated_image_gradient_cosine", "gradient_correlation",
                 "branch_ratio", "act_std_last"]
WALK_POINTS = 16  # points along each line between two images (Balduzzi et al. 2017 walk a 1-D line in input space)
WALK_SPAN = 1 / 8  # the points cover this fraction of the way from one image to the other
WALK_LINES = 16  # lines (image pairs) averaged over; each pair is two images of the probed batch
WALK_CHUNK = 32  # images per backward pass of the walk: bounds memory at depth 110 on a CPU
BN_MODE = "train-mode BatchNorm: the probed batch's statistics (held fixed for the input-gradients)"


# ----------------------------------------------------------------------------- the net's parts


def _shortcut_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """λ·shortcut(a), a = the block's pre-activated input: what is left of a residual block without its branch."""
    preactivate = getattr(block, "preactivate", None)
    a = x if preactivate is None else preactivate(x)
    return getattr(block, "shortcut_scale", 1.0) * block.shortcut(a)


# ----------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def _hooks(modules_and_hooks) -> Iterator[None]:
    """Forward hooks that are removed however the block ends."""
    handles = [m.register_forward_hook(h) for m, h in modules_and_hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- one batch, all probes


def _quotient(a: float, b: float) -> float:
    """a / b, inf when only b is 0 (a SkipInit branch at α = 0 gets no gradient) and nan when both are."""
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


@dataclass
class ProbeResult:
    """What `probe_model` measured on one batch.

    `layers`: conv/linear module name → ‖∂L/∂W‖, in the order the forward runs them.
    `relative`: the same layers → ‖∂L/∂W‖ / ‖W‖, the step SGD takes relative to the weight. Under
    BatchNorm a weight's gradient scales with 1/‖W‖, so only this relative size compares layers.
    `first_conv`, `last_conv`: the first weighted layer and the last one before the classifier
    (shortcut projections left out), the layers the relative ratio compares.
    `blocks`: one row per block: name, stage, index, act_mean, act_std (of its output), branch_ratio.
    `logit_std`: s.d. of the logits over the batch: the net's output scale at this point.
    `nearby_by_lag`: shattering as Balduzzi et al. measure it — the mean cosine between the
    input-gradients at points `lag` steps apart along lines between two images (lag 1, 2, …).
    `unrelated_image_gradient_cosine`: the mean cosine between the input-gradients of different,
    unrelated images of the batch (not Balduzzi et al.'s measure: near 0 for any deep net).
    """

    loss: float
    layers: dict[str, float]
    relative: dict[str, float]
    first_conv: str
    last_conv: str
    blocks: list[dict]
    logit_std: float
    nearby_by_lag: list[float]
    unrelated_image_gradient_cosine: float

    @property
    def grad_ratio(self) -> float:
        """‖∂L/∂W‖ of the first weighted layer over the last's (the classifier): absolute, so under BN it mixes scales."""
        norms = list(self.layers.values())
        return _quotient(norms[0], norms[-1])

    @property
    def rel_grad_ratio(self) -> float:
        """(‖∂L/∂W‖/‖W‖) of the first conv over that of the last conv: ≪ 1 vanishing, ≫ 1 exploding toward the input."""
        return _quotient(self.relative[self.first_conv], self.relative[self.last_conv])

    @property
    def nearby_gradient_correlation(self) -> float:
        """The mean cosine between neighbouring points' input-gradients (lag 1): 1 = smooth, 0 = shattered."""
        return self.nearby_by_lag[0] if self.nearby_by_lag else math.nan


def _batch_statistics(model: nn.Module) -> tuple[list, dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """Hooks that keep each BatchNorm's batch mean and biased variance (what train mode normalises by)."""
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module: nn.Module, inputs, output) -> None:
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        seen[module] = (x.mean(dims), x.var(dims, unbiased=False))

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    return [(m, keep) for m in norms], seen


def _freeze_batch_statistics(model: nn.Module, seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Eval mode with the running statistics set to one batch's: the same function as in train mode,
    but each image's output depends on that image alone."""
    with torch.no_grad():
        for module, (mean, var) in seen.items():
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
    model.eval()


def _projection(num_outputs: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed random unit vector over the logits: the net's scalar output for the shattering probe."""
    v = torch.randn(num_outputs, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm()).to(device)


def mean_pairwise_cosine(grads: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of different rows (images), in O(N·D).

    Σ_{i≠j} cos(g_i, g_j) = ‖Σ_i ĝ_i‖² − Σ_i ‖ĝ_i‖²; a zero gradient counts as similarity 0.
    """
    unit = F.normalize(grads.flatten(1).double(), dim=1)
    n = unit.shape[0]
    off_diagonal = unit.sum(0).pow(2).sum() - unit.pow(2).sum()
    return float(off_diagonal / (n * (n - 1)))


def input_gradients(model: nn.Module, x: torch.Tensor, seed: int = 0, chunk: int = WALK_CHUNK) -> torch.Tensor:
    """∂f/∂x per image, f = vᵀ·logits with a fixed random unit vector v (from `seed`), `chunk` images at a time.

    Balduzzi et al. 2017 study the gradient of a net's scalar *output* with respect to its input.
    A fixed projection of the logits is such an output and needs no labels and no softmax, so a
    linear net has the same gradient everywhere (correlation exactly 1) and any drop below 1 is the
    net's own nonlinearity; the loss's gradient would vary even for a linear net, through the
    softmax and the label. Each image's gradient must be its own: call this where BatchNorm uses
    fixed statistics (`probe_model` holds the probed batch's).
    """
    grads = []
    for part in x.detach().split(chunk):
        part = part.requires_grad_(True)
        logits = model(part).float()
        v = _projection(logits.shape[1], seed, logits.device)
        grads.append(torch.autograd.grad(logits @ v, part, torch.ones(len(part), device=part.device))[0])
    return torch.cat(grads)


def input_gradient_correlation(model: nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    """The mean cosine between the input-gradients of different images of `x` (unrelated images, not a walk)."""
    return mean_pairwise_cosine(input_gradients(model, x, seed))


def walk(starts: torch.Tensor, ends: torch.Tensor, points: int = WALK_POINTS, span: float = WALK_SPAN) -> torch.Tensor:
    """`points` equally spaced inputs on each line from starts[i] toward ends[i], covering `span` of the way.

    Shape (lines, points, *image); point 0 is the start image itself.
    """
    t = torch.linspace(0.0, span, points, device=starts.device).view(1, points, *([1] * (starts.dim() - 1)))
    return starts.unsqueeze(1) + t * (ends - starts).unsqueeze(1)


def cosines_by_lag(grads: torch.Tensor) -> list[float]:
    """grads of shape (lines, points, …): the mean over lines and positions of cos(g_k, g_{k+lag}), lag = 1 … points−1."""
    unit = F.normalize(grads.flatten(2).double(), dim=2)
    points = unit.shape[1]
    return [float((unit[:, :-lag] * unit[:, lag:]).sum(2).mean()) for lag in range(1, points)]


def nearby_gradient_correlation(model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, *, points: int = WALK_POINTS,
                                span: float = WALK_SPAN, seed: int = 0) -> list[float]:
    """Shattered gradients as Balduzzi et al. 2017 measure them: how alike ∂f/∂x is at nearby inputs.

    Walks `points` steps along each line from starts[i] toward ends[i] (`span` of the way) and
    returns the mean cosine between the input-gradients `lag` steps apart, for lag = 1 … points−1
    (a step is span / (points − 1) of the distance between the two images). A smooth function
    keeps them near 1 at every lag; shattered gradients are near 0 already at lag 1.
    """
    path = walk(starts, ends, points, span)
    grads = input_gradients(model, path.flatten(0, 1), seed)
    return cosines_by_lag(grads.view(*path.shape[:2], -1))


def _block_outputs(refs: list[BlockRef], rows: dict[str, dict]) -> list:
    """Forward hooks storing each block output's mean and std."""

    def keep(ref: BlockRef):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            out = output.detach().float()
            rows[ref.name].update(act_mean=float(out.mean()), act_std=float(out.std()))
        return hook

    return [(ref.module, keep(ref)) for ref in refs]


def _weighted_layers(model: nn.Module) -> tuple[list, list[tuple[str, nn.Module]]]:
    """Hooks that list the conv/linear layers in the order the forward calls them."""
    order: list[tuple[str, nn.Module]] = []
    names = {m: n for n, m in model.named_modules() if isinstance(m, WEIGHTED)}

    def called(module: nn.Module, inputs, output) -> None:
        if all(module is not m for _, m in order):
            order.append((names[module], module))

    return [(m, called) for m in names], order


def _last_conv(model: nn.Module, order: list[tuple[str, nn.Module]]) -> str:
    """The last weighted layer the forward runs before the classifier, shortcut projections left out."""
    projections = {m for ref in blocks(model) if getattr(ref.module, "shortcut", None) is not None
                   for m in ref.module.shortcut.modules()}
    hidden = [name for name, m in order if m is not model.classifier and m not in projections]
    return hidden[-1]


def probe_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, projection_seed: int = 0,
                walk_lines: int = WALK_LINES, walk_points: int = WALK_POINTS, walk_span: float = WALK_SPAN) -> ProbeResult:
    """Gradient norms, block signals, branch sizes, logit scale and shattering of `model` on one batch.

    Train mode: BatchNorm normalises by this batch's statistics, exactly as in a training step, so
    the gradients are those SGD would take (eval mode at initialisation would normalise by the
    untouched running statistics 0 and 1, i.e. not at all). The input-gradients are taken with those
    same statistics held fixed, so that each image's gradient is its own, as training's normalisation
    sees it. The walks run between images 2i and 2i+1 of the batch, for the first `walk_lines` pairs.
    Parameter `.grad`s, BN running statistics and the train/eval mode are left as they were; the loss
    is the mean cross-entropy.
    """
    refs = blocks(model)
    rows = {ref.name: {"name": ref.name, "stage": ref.stage, "index": ref.index} for ref in refs}
    ratios = BranchRatios()
    layer_hooks, order = _weighted_layers(model)
    bn_hooks, seen = _batch_statistics(model)
    lines = min(walk_lines, len(x) // 2)
    with restored(model):
        model.train()
        with _hooks(layer_hooks + bn_hooks + _block_outputs(refs, rows)), on_branches(model, ratios):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        weights = [m.weight for _, m in order]
        grads = torch.autograd.grad(loss, weights)
        _freeze_batch_statistics(model, seen)
        unrelated = input_gradient_correlation(model, x, projection_seed)
        nearby = nearby_gradient_correlation(model, x[0:2 * lines:2], x[1:2 * lines:2], points=walk_points,
                                             span=walk_span, seed=projection_seed) if lines else []
    for ref, ratio in ratios.per_block().items():
        rows[ref.name]["branch_ratio"] = float(ratio)
    layers = {name: float(torch.linalg.vector_norm(g)) for (name, _), g in zip(order, grads)}
    relative = {name: _quotient(float(torch.linalg.vector_norm(g)), float(torch.linalg.vector_norm(m.weight.detach())))
                for (name, m), g in zip(order, grads)}
    return ProbeResult(float(loss.detach()), layers, relative, order[0][0], _last_conv(model, order), list(rows.values()),
                       float(logits.detach().float().std()), nearby, unrelated)


# ----------------------------------------------------------------------------- lesions


@contextlib.contextmanager
def removed(ref: BlockRef) -> Iterator[None]:
    """The block replaced by λ·shortcut(x) (a plain block: by the identity) until the `with` ends.

    A forward hook replaces the block's output, so nothing in the net is rebuilt and removing the
    hook restores it exactly. A plain block whose output shape differs from its input is not removable.
    """
    shortcut = getattr(ref.module, "shortcut", None)

    def bypass(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if shortcut is not None:
            return _shortcut_output(module, x)
        if x.shape != output.shape:
            raise ValueError(f"block {ref.name} changes the shape {tuple(x.shape)} → {tuple(output.shape)}: not removable")
        return x

    with _hooks([(ref.module, bypass)]):
        yield


def _shape_changes(model: nn.Module, x: torch.Tensor) -> dict[str, bool]:
    """Which blocks map their input to an output of another shape (on one image)."""
    changes: dict[str, bool] = {}

    def watch(ref: BlockRef):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            changes[ref.name] = inputs[0].shape != output.shape
        return hook

    with _hooks([(ref.module, watch(ref)) for ref in blocks(model)]), torch.no_grad():
        model(x[:1])
    return changes


def _error_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Top-1 error (%) and mean cross-entropy over the data, in chunks."""
    wrong, loss = 0, 0.0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        wrong += int((logits.argmax(1) != target).sum())
        loss += float(F.cross_entropy(logits.float(), target, reduction="sum"))
    return 100.0 * wrong / len(x), loss / len(x)


def lesion(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> list[dict]:
    """Error and loss on (x, y) with each block removed in turn (Veit et al. 2016), in eval mode.

    The first row is the intact net (`removed` None); then one row per block with `removed` its
    name, `stage`, `index`, `removable`, `error` (%) and `loss` (None where not removable). Eval
    mode because a lesion tests the trained function as it would be used. The model is unchanged afterwards.
    """
    rows = []
    with restored(model), torch.no_grad():
        model.eval()
        changes = _shape_changes(model, x)
        error, loss = _error_and_loss(model, x, y, batch_size)
        rows.append({"removed": None, "stage": None, "index": None, "removable": True, "error": error, "loss": loss})
        for ref in blocks(model):
            removable = getattr(ref.module, "shortcut", None) is not None or not changes[ref.name]
            error = loss = None
            if removable:
                with removed(ref):
                    error, loss = _error_and_loss(model, x, y, batch_size)
            rows.append({"removed": ref.name, "stage": ref.stage, "index": ref.index, "removable": removable,
                         "error": error, "loss": loss})
    return rows


# ----------------------------------------------------------------------------- across depths


def probe_row(arch: str, depth: int, result: ProbeResult, variant: str = "") -> dict:
    """One tidy row per net: what the depth plot needs, plus the walk's correlation per lag (`nearby_by_lag`)."""
    norms = list(result.layers.values())
    ratios = [b["branch_ratio"] for b in result.blocks if "branch_ratio" in b]
    nearby = result.nearby_by_lag
    return {"arch": arch, "variant": variant, "depth": depth, "loss": result.loss, "logit_std": result.logit_std,
            "grad_first": norms[0], "grad_last": norms[-1], "grad_ratio": result.grad_ratio,
            "rel_grad_first_conv": result.relative[result.first_conv], "rel_grad_last_conv": result.relative[result.last_conv],
            "rel_grad_ratio": result.rel_grad_ratio, "nearby_gradient_correlation": result.nearby_gradient_correlation,
            "nearby_gradient_correlation_far": nearby[-1] if nearby else math.nan,
            "unrelated_image_gradient_cosine": result.unrelated_image_gradient_cosine,
            "gradient_correlation": result.unrelated_image_gradient_cosine,  # the same number under its former key
            "branch_ratio": sum(ratios) / len(ratios) if ratios else math.nan,
            "act_std_last": result.blocks[-1]["act_std"] if result.blocks else math.nan,
            "nearby_by_lag": list(nearby)}


def variant_name(spec: NetSpec) -> str:
    """What sets a net apart from the 2015 net, as cell ids write it (`norm=none-init=skipinit`); "" for none."""
    return "-".join(f"{key}={value}" for key, value in spec.non_default())


def probe_depths(archs: Sequence[str], depths: Sequence[int], *, batch: tuple[torch.Tensor, torch.Tensor],
                 seed: int, device: torch.device | str = "cpu", variants: Sequence[dict] = ({},)) -> pd.DataFrame:
    """Fresh nets at initialisation (`models.build_net`, weights from `seed`) probed on one batch.

    One row per arch × variant × depth; `variants` are NetSpec options (`{}` is the 2015 net,
    `{"norm": "none", "init": "skipinit"}` an ablation). A variant that names no net for an arch
    (skipinit on a plain net) is left out for that arch. The global RNG is left as it was, so
    probing does not shift a later training run's draws.
    """
    x, y = (t.to(device) for t in batch)
    rows = []
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
        for options in variants:
            for depth in depths:
                spec = NetSpec(arch, depth, **options)
                if net_spec_error(spec):
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = models.build_net(spec).to(device)
                rows.append(probe_row(arch, depth, probe_model(model, x, y), variant_name(spec.canonical())))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS + ["nearby_by_lag"])


def decay_table(frame: pd.DataFrame, points: int = WALK_POINTS, span: float = WALK_SPAN) -> pd.DataFrame:
    """The walk's correlation per lag, one row per net and lag; `distance` is the lag as a fraction of the way between the two images."""
    step = span / (points - 1)
    rows = [{"arch": r.arch, "variant": r.variant, "depth": r.depth, "lag": lag, "distance": lag * step, "correlation": c}
            for r in frame.itertuples() for lag, c in enumerate(r.nearby_by_lag, start=1)]
    return pd.DataFrame(rows, columns=["arch", "variant", "depth", "lag", "distance", "correlation"])


@dataclass(frozen=True)
class ProbeSource:
    """What a probe measured on: every output names it, so synthetic numbers never pass for CIFAR-10's."""

    data: str  # "real CIFAR-10 from PATH" or the synthetic warning
    batch_size: int
    seed: int
    bn_mode: str = BN_MODE
    walk: str = (f"{WALK_LINES} lines between two images of the batch, {WALK_POINTS} points over "
                 f"1/{round(1 / WALK_SPAN)} of the way; f = a fixed random projection of the logits")

    @classmethod
    def of(cls, path: Optional[str], batch_size: int, seed: int) -> ProbeSource:
        data = f"real CIFAR-10 from {path}" if path else "SYNTHETIC images (no --data given): not CIFAR-10, not evidence"
        return cls(data, batch_size, seed)

    @property
    def synthetic(self) -> bool:
        return self.data.startswith("SYNTHETIC")

    def as_dict(self) -> dict[str, object]:
        return {"data": self.data, "batch_size": self.batch_size, "seed": self.seed, "bn_mode": self.bn_mode, "walk": self.walk}

    def line(self) -> str:
        return f"{self.data}; batch {self.batch_size}, seed {self.seed}; {self.bn_mode}"


PANELS = (("nearby_gradient_correlation", "nearby-input gradient correlation (lag 1)", False),
          (None, "correlation vs distance along the walk", False),
          ("rel_grad_ratio", "(‖∂L/∂W‖/‖W‖) first conv / last conv", True),
          ("logit_std", "s.d. of the logits", True),
          ("branch_ratio", "mean RMS F(x) / RMS x", False),
          ("unrelated_image_gradient_cosine", "cosine of unrelated images' input-gradients", False))
ARCH_STYLE = {"plain": ("plain", "tab:red"), "residual": ("ResNet", "tab:blue")}


def _label(arch: str, variant: str) -> str:
    name = ARCH_STYLE.get(arch, (arch, None))[0]
    return f"{name} [{variant}]" if variant else name


def probe_figure(frame: pd.DataFrame, source: Optional[ProbeSource] = None) -> Figure:
    """Plain vs ResNet (and any variants) against depth, one panel per measure, and the walk's decay per depth."""
    from matplotlib.figure import Figure  # here, not at import: the probe computes without drawing

    fig = Figure(figsize=(15, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    styles = ["-", "--", ":", "-."]  # one per variant, in the order they were probed; the colour says the arch
    variants = list(dict.fromkeys(frame["variant"]))
    for ax, (column, title, log) in zip(axes, PANELS):
        for (arch, variant), rows in frame.sort_values("depth").groupby(["arch", "variant"], sort=False):
            colour = ARCH_STYLE.get(arch, (arch, None))[1]
            if column is None:  # the decay: base nets only, one line per depth, deeper = fainter
                if variant:
                    continue
                for j, row in enumerate(rows.itertuples()):
                    lags = range(1, len(row.nearby_by_lag) + 1)
                    ax.plot(lags, row.nearby_by_lag, "o-", ms=2, color=colour, alpha=1 - 0.7 * j / max(len(rows) - 1, 1),
                            label=f"{_label(arch, variant)}-{row.depth}")
                ax.set_xlabel("lag (steps along the walk)")
                continue
            values = rows[column].where(rows[column].abs() != math.inf) if log else rows[column]
            ax.plot(rows["depth"], values, "o" + styles[variants.index(variant) % len(styles)], label=_label(arch, variant),
                    color=colour)
            ax.set_xlabel("depth (layers)")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6, ncol=2)
    heading = "at initialisation" + (f" — {source.line()}" if source else "")
    fig.suptitle(heading, fontsize=10, color="tab:red" if source and source.synthetic else "black")
    return fig


# ----------------------------------------------------------------------------- the command


def probe_batch(spec: DataSpec, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` training images of `spec` (a fixed random draw), normalised as training normalises them."""
    from .data import Normalizer, load_images

    images = load_images(spec)
    if size > len(images.train_y):
        raise ValueError(f"--batch-size {size} is more than the {len(images.train_y)} training images")
    pick = torch.randperm(len(images.train_y), generator=torch.Generator().manual_seed(seed))[:size]
    normalize = Normalizer(images.train_x, spec.normalize)
    return normalize(images.train_x[pick]), images.train_y[pick]


def probe_trained(cell_dir: Path, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[ProbeResult, list[dict]]:
    """The probe and the lesion table of a finished cell's saved weights, on `batch`."""
    from .results_folder import CellFolder, read_cell

    folder = CellFolder(cell_dir)
    config = read_cell(folder).config
    if not folder.weights.is_file() or not config:
        raise FileNotFoundError(f"{cell_dir}: no finished cell here (needs {folder.config.name} and {folder.weights.name})")
    if "net_spec" in config:
        spec = NetSpec(**config["net_spec"])
    else:  # a cell trained before config.json recorded its net's fields
        spec = NetSpec(config["arch"], config["depth"], shortcut=config.get("shortcut", "A"), **config.get("net", {}))
    model = models.build_net(spec)
    model.load_state_dict(torch.load(folder.weights, map_location="cpu", weights_only=True))
    x, y = batch
    return probe_model(model, x, y), lesion(model, x, y)
