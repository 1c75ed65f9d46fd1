"""Labels -> chip masks: class priority, ignore where no label says anything, imagery offset.

Masks (uint8, the chip's grid):
- landcover: class index per pixel, IGNORE (255) where no label covers it (OSM is
  incomplete: "nothing mapped" is not "background") unless the area is declared
  completely mapped, where uncovered pixels take the background class. Where
  labels overlap, the higher priority wins (drawn last).
- trees: band 1 crown (0 background, 1.. crown classes, IGNORE), band 2 centre heatmap.
"""
from __future__ import annotations

import math

import numpy as np
from shapely import affinity

IGNORE = 255


def offset_in_crs(dx_m: float, dy_m: float, crs, lat: float) -> tuple[float, float]:
    """An offset in metres as CRS units (degrees for a geographic CRS, at latitude `lat`)."""
    if crs is not None and crs.is_geographic:
        return dx_m / (111_320 * math.cos(math.radians(lat))), dy_m / 110_540
    return dx_m, dy_m


def shift(geoms: list, dx: float, dy: float) -> list:
    """Labels moved by (dx, dy) CRS units onto the imagery (misaligned OSM, imagery offset)."""
    if not dx and not dy:
        return geoms
    return [affinity.translate(g, dx, dy) for g in geoms]


def draw_order(priorities: list[int]) -> list[int]:
    """Indices low priority first, so higher priorities are burnt last and win overlaps."""
    return sorted(range(len(priorities)), key=lambda i: priorities[i])


def landcover_mask(geoms: list, values: list[int], transform, size: int, valid: np.ndarray,
                   background: int | None = None) -> np.ndarray:
    """(1, size, size) class indices in the given (priority) order; uncovered pixels are
    `background` when the area is completely mapped, else IGNORE; invalid imagery is IGNORE."""
    from rasterio.features import rasterize

    fill = IGNORE if background is None else background
    if geoms:
        mask = rasterize(zip(geoms, values), out_shape=(size, size), transform=transform, fill=fill, dtype="uint8")
    else:
        mask = np.full((size, size), fill, np.uint8)
    mask[~valid] = IGNORE
    return mask[None]


def trees_mask(crowns: list, transform, size: int, valid: np.ndarray, footprint,
               values: list[int] | None = None) -> np.ndarray:
    """(2, size, size): crown class (1 by default, e.g. 2 for dead) / 0 / IGNORE, and the
    centre heatmap 0..255 for these ellipses."""
    from rasterio.features import rasterize

    crown = np.zeros((size, size), np.uint8)
    if crowns:
        crown = rasterize(zip(crowns, values or [1] * len(crowns)), out_shape=(size, size), transform=transform,
                          fill=0, dtype="uint8")
    if footprint is not None:
        inside = rasterize([(footprint, 1)], out_shape=(size, size), transform=transform, fill=0, dtype="uint8")
        crown[inside == 0] = IGNORE
    crown[~valid] = IGNORE
    heat = np.zeros((size, size), np.float64)
    rows, cols = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    pixel = abs(transform.a)
    for g in crowns:
        col, row = ~transform @ (g.centroid.x, g.centroid.y)
        sigma = max(math.sqrt(g.area / math.pi) / pixel / 3, 1.0)
        heat = np.maximum(heat, np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2)))
    return np.stack([crown, np.round(heat * 255).astype(np.uint8)])


def class_fractions(mask: np.ndarray, n_classes: int, trees: bool) -> tuple[list[float], float]:
    """Share of the chip's pixels per class, and the ignored share.
    Land cover: class i is value i; trees: class i is crown value i + 1 (band 1)."""
    counts = np.bincount(mask[0].ravel(), minlength=256).astype(np.float64) / mask[0].size
    first = 1 if trees else 0
    return [float(counts[first + i]) for i in range(n_classes)], float(counts[IGNORE])
