"""The few-shot recipe's parts: crowns pasted onto other chips (image and labels together),
the crown-border loss weight, and the options `train --base` fills in for trees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from landcover_plugin.engine.learn.augment import paste_crowns


def chips(n: int = 6, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Chips whose crown pixels (value 1 in the image) are exactly the mask's crowns, with a
    heatmap peak of 255 at each crown's centre; a border of ignored pixels on the last chip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    x = np.zeros((n, size, size, 3), np.float32)
    y = np.zeros((n, size, size, 2), np.float32)
    for i in range(n):
        for _ in range(2):
            r, c = rng.integers(10, size - 10, 2)
            disk = (yy - r) ** 2 + (xx - c) ** 2 <= 36
            if y[i, ..., 0][disk].any():
                continue
            x[i][disk] = 1.0
            y[i, ..., 0][disk] = 1
            y[i, ..., 1][disk] = np.maximum(y[i, ..., 1][disk], 255 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 18)[disk])
    y[-1, :, :3, 0] = 255  # ignored: never pasted over (crowns start at column 4)
    return x, y


def test_pasted_crowns_carry_their_pixels_mask_and_centre():
    x, y = chips()
    px, py = paste_crowns(x, y, share=1.0, seed=0)
    assert len(px) == 2 * len(x) and np.array_equal(px[:len(x)], x) and np.array_equal(py[:len(y)], y)
    new_x, new_y = px[len(x):], py[len(y):]
    crown = new_y[..., 0] == 1
    assert np.array_equal(new_x[..., 0] == 1.0, crown)  # image and labels moved together
    counts = [ndimage.label(c)[1] for c in crown]
    assert sum(counts) > sum(ndimage.label(c)[1] for c in y[..., 0] == 1)  # more crowns per chip than before
    assert all(new_y[i, ..., 1][crown[i]].max() == pytest.approx(255, abs=1) for i in range(len(new_y)) if crown[i].any())
    assert np.array_equal(paste_crowns(x, y, share=1.0, seed=0)[0], px)  # seeded: a run is reproducible


def test_nothing_to_paste_leaves_the_chips():
    x, y = chips()
    assert paste_crowns(x, y, share=0.0, seed=0)[0] is x
    empty = np.zeros_like(y)
    assert paste_crowns(x, empty, share=1.0, seed=0)[1] is empty


def border_loss(pred: np.ndarray, truth: np.ndarray, weight: float) -> float:
    from landcover_plugin.engine.learn.losses import make_loss

    y = np.stack([truth, np.zeros_like(truth)], -1)[None].astype(np.float32)
    p = np.stack([pred, np.zeros_like(pred)], -1)[None].astype(np.float32)
    return float(make_loss("trees", border_weight=weight)(y, p))


def test_the_border_weight_makes_border_errors_cost_more():
    yy, xx = np.mgrid[:40, :40]
    d2 = (yy - 20) ** 2 + (xx - 20) ** 2
    truth = (d2 <= 100).astype(np.float32)
    wrong_border = np.where(d2 <= 81, 0.95, 0.05)  # the crown one pixel too small
    wrong_inside = np.where((d2 <= 100) & (d2 > 9), 0.95, 0.05)  # a hole at its centre
    gain_border = border_loss(wrong_border, truth, 4.0) / border_loss(wrong_border, truth, 0.0)
    gain_inside = border_loss(wrong_inside, truth, 4.0) / border_loss(wrong_inside, truth, 0.0)
    assert gain_border > 1.0 > gain_inside


def test_fine_tuning_trees_takes_the_few_shot_recipe_unless_told_otherwise():
    from landcover_plugin.engine.stages.train import DEFAULTS, FEW_SHOT, TrainParams, resolved

    plain = TrainParams(dataset=Path("ds"), out=Path("m"))
    tuned = TrainParams(dataset=Path("ds"), out=Path("m"), base=Path("trees-base"))
    assert {k: getattr(resolved(tuned, "trees"), k) for k in FEW_SHOT} == FEW_SHOT
    assert {k: getattr(resolved(plain, "trees"), k) for k in DEFAULTS} == DEFAULTS
    assert {k: getattr(resolved(tuned, "landcover"), k) for k in DEFAULTS} == DEFAULTS
    mine = resolved(TrainParams(dataset=Path("ds"), out=Path("m"), base=Path("b"), epochs=3, copy_paste=0.0), "trees")
    assert (mine.epochs, mine.copy_paste) == (3, 0.0)  # the user's options win
