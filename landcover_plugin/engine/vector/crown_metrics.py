"""Crown detection metrics: the NeonTreeEvaluation protocol.

Predicted crowns and annotated crowns are compared as boxes (pixel
xmin, ymin, xmax, ymax); each prediction matches at most one annotation
(one-to-one, the assignment that maximises total IoU) and a match counts when
its IoU is at least 0.4. No TensorFlow here: eval and scripts share it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .vectorize import find_seeds, split_crowns

IOU_THRESHOLD = 0.4
Box = tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in pixels


@dataclass
class CrownScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: "CrownScore") -> "CrownScore":
        return CrownScore(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self, prefix: str = "crown_") -> dict[str, float]:
        return {f"{prefix}precision": self.precision, f"{prefix}recall": self.recall, f"{prefix}f1": self.f1,
                f"{prefix}tp": self.tp, f"{prefix}fp": self.fp, f"{prefix}fn": self.fn}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of boxes given as (n, 4) arrays."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def matched_boxes(pred: list[Box], truth: list[Box], threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Whether each predicted box matches an annotated box (one-to-one, at `threshold`)."""
    hit = np.zeros(len(pred), bool)
    if pred and truth:
        iou = box_iou(np.array(pred), np.array(truth))
        rows, cols = linear_sum_assignment(-iou)
        hit[rows[iou[rows, cols] >= threshold]] = True
    return hit


def match_boxes(pred: list[Box], truth: list[Box], threshold: float = IOU_THRESHOLD) -> CrownScore:
    """One-to-one matching of predicted to annotated boxes; TP/FP/FN at `threshold`."""
    tp = int(matched_boxes(pred, truth, threshold).sum())
    return CrownScore(tp, len(pred) - tp, len(truth) - tp)


def crown_boxes(prob: np.ndarray, heat: np.ndarray, threshold: float = 0.5, seed_radius_px: int = 5,
                min_pixels: int = 20, valid: np.ndarray | None = None) -> list[Box]:
    """Predicted crowns as boxes: crown pixels split between heatmap peaks, as predict does."""
    return crown_boxes_probs(prob, heat, threshold, seed_radius_px, min_pixels, valid)[0]


def crown_boxes_probs(prob: np.ndarray, heat: np.ndarray, threshold: float = 0.5, seed_radius_px: int = 5,
                      min_pixels: int = 20, valid: np.ndarray | None = None) -> tuple[list[Box], np.ndarray]:
    """crown_boxes and each crown's mean probability (what its confidence is made of)."""
    crown = prob > threshold
    if valid is not None:
        crown &= valid
    trees, _ = split_crowns(crown, find_seeds(heat, crown, seed_radius_px))
    boxes, ids = _label_boxes(trees, min_pixels, with_ids=True)
    return boxes, np.asarray(ndimage.mean(prob, trees, ids) if ids else [], np.float64)


def truth_boxes_from_mask(mask: np.ndarray) -> list[Box]:
    """Annotated crowns of a trees chip mask (band 1 crown 1/2, band 2 heatmap):
    the crown ellipses split at the heatmap's peaks (the exact crown centres)."""
    crown = (mask[0] == 1) | (mask[0] == 2)
    heat = np.where(crown, mask[1].astype(np.float32) / 255.0, 0.0)
    trees, _ = split_crowns(crown, find_seeds(heat, crown, 1, min_heat=0.6))
    return _label_boxes(trees, 1)


def _label_boxes(trees: np.ndarray, min_pixels: int, with_ids: bool = False):
    boxes, ids = [], []
    sizes = ndimage.sum(np.ones_like(trees), trees, range(1, int(trees.max()) + 1)) if trees.max() else []
    for k, slc in enumerate(ndimage.find_objects(trees), start=1):
        if slc is None or sizes[k - 1] < min_pixels:
            continue
        boxes.append((float(slc[1].start), float(slc[0].start), float(slc[1].stop), float(slc[0].stop)))
        ids.append(k)
    return (boxes, ids) if with_ids else boxes


# The crown post-processing a model carries (ModelInfo threshold, seed_distance_m,
# min_crown_m2), chosen on held-out crowns after each training.
POST_GRID = {"threshold": [0.3, 0.5, 0.7], "seed_distance_m": [0.5, 1.0, 2.0], "min_crown_m2": [0.5, 2.0, 4.0]}
Prediction = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # crown probability, heatmap, valid mask


def score_post(prediction: Prediction, truth: list[Box], post: dict, resolution_m: float) -> CrownScore:
    """Crown boxes decoded with the post-processing `post`, matched to the annotated boxes."""
    prob, heat, valid = prediction
    return match_boxes(crown_boxes(prob, heat, post["threshold"], **_post_pixels(post, resolution_m), valid=valid),
                       truth)


def crown_confidences(prediction: Prediction, truth: list[Box], post: dict,
                      resolution_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Each crown decoded with `post`: its mean probability and whether it matched an annotated crown."""
    prob, heat, valid = prediction
    boxes, probs = crown_boxes_probs(prob, heat, post["threshold"], **_post_pixels(post, resolution_m), valid=valid)
    return probs, matched_boxes(boxes, truth)


def _post_pixels(post: dict, resolution_m: float) -> dict:
    return {"seed_radius_px": max(1, round(post["seed_distance_m"] / resolution_m)),
            "min_pixels": max(1, round(post["min_crown_m2"] / resolution_m**2))}


def tune_post(predictions: list[Prediction], truths: list[list[Box]], resolution_m: float) -> tuple[dict, CrownScore]:
    """The post-processing of POST_GRID with the best pooled F1 on these crowns, and its score
    (ties: the first, i.e. the lower threshold and the smaller distances)."""
    best: tuple[dict, CrownScore] | None = None
    for post in ({"threshold": t, "seed_distance_m": d, "min_crown_m2": a} for t in POST_GRID["threshold"]
                 for d in POST_GRID["seed_distance_m"] for a in POST_GRID["min_crown_m2"]):
        total = CrownScore()
        for prediction, truth in zip(predictions, truths):
            total = total.add(score_post(prediction, truth, post, resolution_m))
        if best is None or total.f1 > best[1].f1:
            best = (post, total)
    return best

