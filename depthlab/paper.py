"""The numbers of He et al. 2015 that a sweep can be held against, with where each comes from.

Only Table 6 (test error of ResNets on CIFAR-10) is quoted. The paper gives plain nets only as
the curves of Fig. 6, so no plain-net number is given here: reading values off a figure would
pass a guess off as a measurement. Torch-free, like `options`, so reports can import it cheaply.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config import TRAIN_KEYS, TrainSpec

CITATION = ("K. He, X. Zhang, S. Ren, J. Sun. Deep Residual Learning for Image Recognition. "
            "CVPR 2016 (arXiv:1512.03385, 2015), Table 6")

# Table 6: CIFAR-10 test error (%) of ResNets with option-A shortcuts, trained with the recipe below.
TABLE6_TEST_ERROR: dict[int, float] = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
# Table 6's caption: "For ResNet-110, we run it 5 times and show 'best (mean±std)'"; the row reads 6.43 (6.61±0.16),
# the best of 5 runs.

# §4.2: lr 0.1, divided by 10 at 32k and 48k iterations, stop at 64k; weight decay 1e-4, momentum 0.9,
# mini-batch 128; the 64k length was chosen on a 45k/5k split, the reported nets train on all 50k images.
PAPER_TRAIN: dict[str, Any] = {"iterations": 64_000, "epochs": None, "lr": 0.1, "lr_decay": 0.1, "momentum": 0.9,
                               "weight_decay": 1e-4, "batch_size": 128}
PAPER_MILESTONES = [32_000, 48_000]
PAPER_DATA: dict[str, Any] = {"source": "cifar10", "normalize": "pixel_mean", "val_split": 0, "train_size": None}
# §4.2: "for ResNet-110 ... we use 0.01 to warm up the training until the training error is below 80%".
WARMUP_110 = {"warmup_lr": 0.01, "warmup_until_err": 80.0}
NO_WARMUP = {"warmup_lr": None}


def _warmup_matches(depth: int, train: Mapping[str, Any]) -> bool:
    """ResNet-110 warms up as the paper says; 20-56 do not; for 1202 the paper only says
    "trained as described above", so either reading counts as its recipe."""
    if depth == 1202:
        return True
    expected = WARMUP_110 if depth == 110 else NO_WARMUP
    return all(train.get(k) == v for k, v in expected.items())


def _milestones(train: Mapping[str, Any]) -> list[int] | None:
    """The decay points the recipe really uses (its own, or config's default proportions)."""
    known = {k: v for k, v in train.items() if k in TRAIN_KEYS}
    try:
        return TrainSpec(**known).decay_points()
    except (TypeError, AssertionError):
        return None


def paper_test_error(recipe: Mapping[str, Any]) -> float | None:
    """Table 6's test error for a cell whose recipe is the paper's, else None.

    `recipe` is a cell's `Cell.to_dict()` (also the head of its summary.json): the keys `arch`,
    `depth`, `shortcut`, `train` and `data`. Anything else — another depth, shortcut B, fewer
    iterations, a validation split — is a different experiment, so no paper number applies.
    """
    depth = recipe.get("depth")
    train, data = recipe.get("train") or {}, recipe.get("data") or {}
    if recipe.get("arch") != "residual" or recipe.get("shortcut") != "A" or depth not in TABLE6_TEST_ERROR:
        return None
    if any(train.get(k, "missing") != v for k, v in PAPER_TRAIN.items()):
        return None
    if any(data.get(k, "missing") != v for k, v in PAPER_DATA.items()):
        return None
    if _milestones(train) != PAPER_MILESTONES or not _warmup_matches(depth, train):
        return None
    return TABLE6_TEST_ERROR[depth]
