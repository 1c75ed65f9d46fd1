"""Crown matching (NeonTreeEvaluation protocol) and crowns read back from a dataset mask."""
from __future__ import annotations

import numpy as np
import pytest

from landcover_plugin.engine.vector.crown_metrics import (box_iou, crown_boxes, match_boxes, truth_boxes_from_mask,
                                                          score_post, tune_post)


def test_one_to_one_matching_at_iou_04():
    truth = [(0, 0, 10, 10), (20, 0, 30, 10)]
    # Two predictions over the first crown: only one may match it; the third overlaps too little.
    pred = [(0, 0, 10, 10), (1, 0, 11, 10), (24, 0, 34, 10)]
    assert box_iou(np.array(pred[2:]), np.array(truth[1:]))[0, 0] == pytest.approx(6 / 14)
    score = match_boxes(pred, truth)
    assert (score.tp, score.fp, score.fn) == (2, 1, 0)
    assert score.precision == pytest.approx(2 / 3) and score.recall == 1.0
    assert score.f1 == pytest.approx(0.8)
    assert match_boxes([(26, 0, 36, 10)], truth[1:]).tp == 0  # IoU 4/16 < 0.4
    assert (match_boxes([], truth).fn, match_boxes(pred, []).fp) == (2, 3)


def test_touching_crowns_are_split_at_their_centres():
    from landcover_plugin.engine.stages.dataset import trees_mask
    from rasterio.transform import from_origin
    from shapely.geometry import Point, box

    transform = from_origin(0, 64, 1, 1)
    crowns = [Point(20, 32).buffer(10), Point(38, 32).buffer(10)]  # overlapping discs (map units = px)
    mask = trees_mask(crowns, transform, 64, np.ones((64, 64), bool), box(0, 0, 64, 64))
    boxes = truth_boxes_from_mask(mask)
    assert len(boxes) == 2
    assert match_boxes(boxes, [(10, 22, 30, 42), (28, 22, 48, 42)]).tp == 2
    # The same crowns as a model would output them: probability and heatmap.
    prob, heat = (mask[0] == 1).astype(np.float32), mask[1] / 255.0
    assert match_boxes(crown_boxes(prob, heat, seed_radius_px=3, min_pixels=5), boxes).tp == 2


def test_post_processing_is_tuned_to_the_crowns_given():
    """Two 1.2 m crowns on a faint 0.4 haze that joins them: a threshold below the haze
    merges them into one box; the tuning finds one above it, and both crowns."""
    yy, xx = np.mgrid[0:64, 0:64]
    prob = np.full((64, 64), 0.4, np.float32)
    heat = np.zeros((64, 64), np.float32)
    truth = []
    for cx, cy in ((20, 32), (44, 32)):
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= 36
        prob[disk] = 0.9
        heat = np.maximum(heat, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0))
        truth.append((cx - 6.0, cy - 6.0, cx + 7.0, cy + 7.0))
    post, score = tune_post([(prob, heat, None)], [truth], resolution_m=0.2)
    assert post["threshold"] >= 0.5 and score.f1 == 1.0
    haze = score_post((prob, heat, None), truth, {**post, "threshold": 0.3}, resolution_m=0.2)
    assert haze.f1 < 1.0  # below the haze the crowns come out wrong: the threshold matters here

