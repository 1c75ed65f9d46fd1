"""Crown confidence: the mean crown probability calibrated on validation crowns, so that it
separates real crowns from false ones and reads as a probability."""
from __future__ import annotations

import numpy as np
import pytest

from landcover_plugin.engine.vector.confidence import calibrate, fit_calibration, logit
from landcover_plugin.engine.vector.crown_metrics import crown_confidences


def test_calibration_recovers_how_often_crowns_are_real():
    rng = np.random.default_rng(0)
    mean = rng.uniform(0.5, 0.62, 4000)  # raw means bunch up just above the threshold
    real = rng.random(4000) < 1 / (1 + np.exp(-(12 * logit(mean) - 2.5)))
    scale, shift = fit_calibration(mean, real)
    assert scale == pytest.approx(12, rel=0.25) and shift == pytest.approx(-2.5, abs=0.6)
    conf = calibrate(mean, scale, shift)
    assert conf.max() - conf.min() > 0.4  # spread out, not 0.5-0.62
    high, low = real[conf >= 0.5], real[conf < 0.5]
    assert high.mean() > 0.6 > 0.4 > low.mean()
    for lo, hi in ((0.2, 0.4), (0.4, 0.6), (0.6, 0.8)):  # it reads as a probability
        band = (conf >= lo) & (conf < hi)
        assert lo - 0.08 < real[band].mean() < hi + 0.08


@pytest.mark.parametrize("mean, real", [([0.6, 0.7], [True, False]), ([0.6] * 8, [True] * 8), ([], [])])
def test_nothing_to_calibrate_on_leaves_the_raw_mean(mean, real):
    assert fit_calibration(np.array(mean), np.array(real, bool)) == (1.0, 0.0)
    assert calibrate(np.array([0.3, 0.8]), 1.0, 0.0) == pytest.approx([0.3, 0.8], abs=1e-6)


def test_each_decoded_crown_has_its_mean_probability_and_whether_it_matched():
    yy, xx = np.mgrid[:60, :100]
    prob, heat = np.zeros((60, 100)), np.zeros((60, 100))
    for (r, c), p in (((30, 25), 0.9), ((30, 75), 0.6)):
        disk = (yy - r) ** 2 + (xx - c) ** 2 <= 10 ** 2
        prob[disk] = p
        heat = np.maximum(heat, np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 20))
    truth = [(15.0, 20.0, 36.0, 41.0)]  # only the left crown is a tree
    post = {"threshold": 0.5, "seed_distance_m": 0.5, "min_crown_m2": 0.5}
    probs, matched = crown_confidences((prob, heat, None), truth, post, 0.1)
    assert probs == pytest.approx([0.9, 0.6]) and matched.tolist() == [True, False]
