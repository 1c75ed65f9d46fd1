"""A peer's Detector (YOLO-style ONNX from Deepness's or GeoDeep's tools) over imagery:
boxes with scores, as crowns and tree points.

Outputs are decoded as both peers decode their `det_type`s (docs/DESIGN.md "Deepness
and GeoDeep"): rows of (x, y, w, h, objectness, class scores...) in tile pixels for
YOLOv5/v7, (x, y, w, h, class scores...) for v6, the same transposed (channels first)
for YOLOv8/v9 and ultralytics; boxes below `det_conf` dropped, then greedy NMS at
`det_iou_thresh`. Tiles overlap as for segmentation and a box belongs to the tile
whose core holds its centre, so neighbouring tiles never report the same tree twice.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from rasterio.windows import Window
from shapely.geometry import Point, box

from ..errors import EngineError
from ..vector.trees import HealthThresholds, TreeRow, tree_status
from ..vector.vectorize import _polygonal, areas_m2
from .inference import AoiPixels, Tile, run_batches
from .model_package import ModelInfo

# det_type -> (layout, index of the first class score): "rows" are boxes x attributes,
# "columns" attributes x boxes. v5/v7 rank by objectness, the others by the best class score.
LAYOUTS = {"YOLO_v5_or_v7_default": ("rows", 5), "YOLO_v5": ("rows", 5), "YOLO_v7": ("rows", 5),
           "YOLO_v6": ("rows", 5), "YOLO_v8": ("columns", 4), "YOLO_v9": ("columns", 4),
           "YOLO_Ultralytics": ("columns", 4)}
OBJECTNESS = ("YOLO_v5_or_v7_default", "YOLO_v5", "YOLO_v7")


def check_detector(info: ModelInfo) -> None:
    if info.detector not in LAYOUTS:
        raise EngineError("UNSUPPORTED_MODEL", f"The detector's det_type {info.detector!r} is not one landcover "
                          f"decodes ({', '.join(LAYOUTS)}).",
                          "Export it as a YOLOv5/v7/v8/v9 or ultralytics detector (e.g. with GeoDeep's "
                          "yolo2geodeep), or run it in the tool it was made for.")


def decode(out: np.ndarray, info: ModelInfo) -> tuple[np.ndarray, np.ndarray]:
    """One tile's raw output -> (boxes x0, y0, x1, y1 in tile pixels, scores), after the
    confidence threshold and NMS."""
    layout, first = LAYOUTS[info.detector]
    width = first + len(info.class_names)
    rows = (out.T if layout == "columns" else out).astype(np.float64)  # float32 pixels -> metres lose cm
    if out.ndim != 2 or rows.shape[1] != width:
        want = f"(n, {width}, boxes)" if layout == "columns" else f"(n, boxes, {width})"
        raise EngineError("BAD_MODEL", f"The detector returns {(-1, *out.shape)}; a {info.detector} model with "
                          f"{len(info.class_names)} classes returns {want}.",
                          "Check its det_type and class_names metadata against the model.")
    scores = rows[:, 4] if info.detector in OBJECTNESS else rows[:, first:].max(axis=1)
    rows, scores = rows[scores >= info.det_conf], scores[scores >= info.det_conf]
    xy, half = rows[:, :2], rows[:, 2:4] / 2
    boxes = np.hstack([xy - half, xy + half])
    keep = nms(boxes, scores, info.det_iou)
    return boxes[keep], scores[keep]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression, the peers' variant (pixel-inclusive areas, +1):
    indices of the boxes kept, best first."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) < iou]
    return np.asarray(keep, int)


def tile_rows(boxes: np.ndarray, scores: np.ndarray, tile: Tile, ok: np.ndarray, transform,
              crs, health: HealthThresholds) -> list[TreeRow]:
    """The boxes whose centre lies in the tile's valid core -> (crown box, centre point, fields)."""
    ys, xs = tile.core
    found = []
    for (x0, y0, x1, y1), score in zip(boxes, scores):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r, c = math.floor(cy) - ys.start, math.floor(cx) - xs.start
        if 0 <= r < ok.shape[0] and 0 <= c < ok.shape[1] and ok[r, c]:
            (a, b), (e, f) = transform * (tile.col + x0, tile.row + y0), transform * (tile.col + x1, tile.row + y1)
            found.append((box(min(a, e), min(b, f), max(a, e), max(b, f)),
                          Point(transform * (tile.col + cx, tile.row + cy)), float(score)))
    areas = areas_m2([g for g, _, _ in found], crs) if found else []
    return [(_polygonal(g), p, {"area_m2": round(float(m2), 3), "diameter_m": round(2 * math.sqrt(m2 / math.pi), 3),
                                "confidence": round(s, 4), "vari": None, "ndvi": None,
                                "status": tree_status(None, None, None, health)})
            for (g, p, s), m2 in zip(found, areas)]


def detect_trees(session, src, info: ModelInfo, window: Window, aoi: AoiPixels, tiles: list[Tile],
                 batch_size: int, health: HealthThresholds, reporter) -> Iterator[list[TreeRow]]:
    """The trees found in each batch of tiles, batch by batch."""
    check_detector(info)
    transform = src.window_transform(window)
    for batch, outs, oks in run_batches(session, src, info, window, aoi, tiles, batch_size, reporter):
        rows = []
        for tile, out, ok in zip(batch, outs, oks):
            rows += tile_rows(*decode(out, info), tile, ok, transform, src.crs, health)
        yield rows
