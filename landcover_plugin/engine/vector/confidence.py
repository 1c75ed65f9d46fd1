"""Crown confidence: the crown's mean probability, calibrated on validation crowns.

The raw mean crown probability bunches up (every crown pixel is above the threshold by
construction: 0.53-0.58 on every crown of an unseen scene, issue 19). Platt scaling of
its logit, fitted after training to whether each validation crown matched an annotated
crown (IoU 0.4), maps it to the chance that the crown is a real tree. It is monotone,
so crowns rank as by the raw mean; two numbers travel in the model (ModelInfo
confidence_scale, confidence_shift; 1 and 0 leave the raw mean).
"""
from __future__ import annotations

import numpy as np

EPS = 1e-4
RIDGE = 1e-2  # a little L2 on the scale: a handful of validation crowns must not give an infinite slope
MIN_CROWNS = 5  # fewer validation crowns (or all right, or all wrong): nothing to calibrate on


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def calibrate(mean_prob: np.ndarray, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """The calibrated confidence of crowns with these mean probabilities."""
    return 1.0 / (1.0 + np.exp(-(scale * logit(mean_prob) + shift)))


def fit_calibration(mean_prob: np.ndarray, matched: np.ndarray, steps: int = 50) -> tuple[float, float]:
    """(scale, shift) of the logistic regression of `matched` on logit(mean_prob), by
    Newton's method; (1, 0) when the crowns cannot tell it (too few, or one outcome only)."""
    x, y = logit(mean_prob), np.asarray(matched, np.float64)
    if len(x) < MIN_CROWNS or y.min() == y.max():
        return 1.0, 0.0
    w = np.zeros(2)
    design = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-design @ w))
        grad = design.T @ (p - y) + RIDGE * np.array([w[0], 0.0])
        hess = design.T @ (design * (p * (1 - p))[:, None]) + RIDGE * np.diag([1.0, 0.0]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return round(float(w[0]), 4), round(float(w[1]), 4)
