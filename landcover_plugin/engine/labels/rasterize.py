"""Labels -> chip masks: class priority, ignore where no label says anything, imagery offset.

Masks (uint8, the chip's grid):
- landcover: class index per pixel, IGNORE (255) where no label covers it (OSM is
  incomplete: "nothing mapped" is not "background") unless the area is declared
  completely mapped, where uncovered pixels take the background class. Where
  labels overlap, the higher priority wins (drawn last).
- trees: band 1 crown (0 background, 1.. crown classes, IGNORE), band 2 centre heatmap.
  From tree positions (points) only the heatmap is known: band 1 is IGNORE throughout,
  so the unannotated crown is not taught as background.
"""
from __future__ import annotations

import math

import numpy as np
from shapely import affinity

from ...contract.names import IGNORE



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
    centres = [(g.centroid.x, g.centroid.y) for g in crowns]
    radii = [math.sqrt(g.area / math.pi) for g in crowns]
    return np.stack([crown, centre_heatmap(centres, radii, transform, size)])


def centre_heatmap(centres: list[tuple[float, float]], radii: list[float], transform, size: int) -> np.ndarray:
    """(size, size) uint8: max of gaussians (0..255) at the tree centres (map x, y),
    sigma = crown radius (CRS units) / 3, at least one pixel."""
    heat = np.zeros((size, size), np.float64)
    rows, cols = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    pixel = abs(transform.a)
    for (x, y), radius in zip(centres, radii):
        col, row = ~transform @ (x, y)
        sigma = max(radius / pixel / 3, 1.0)
        heat = np.maximum(heat, np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2)))
    return np.round(heat * 255).astype(np.uint8)


def centres_mask(points: list, radius: float, transform, size: int) -> np.ndarray:
    """(2, size, size) from tree positions: crown all IGNORE (not known), and the centre
    heatmap as for crowns of `radius` (CRS units)."""
    crown = np.full((size, size), IGNORE, np.uint8)
    heat = centre_heatmap([(p.x, p.y) for p in points], [radius] * len(points), transform, size)
    return np.stack([crown, heat])


def class_fractions(mask: np.ndarray, n_classes: int, trees: bool) -> tuple[list[float], float]:
    """Share of the chip's pixels per class, and the ignored share.
    Land cover: class i is value i; trees: class i is crown value i + 1 (band 1)."""
    counts = np.bincount(mask[0].ravel(), minlength=256).astype(np.float64) / mask[0].size
    first = 1 if trees else 0
    return [float(counts[first + i]) for i in range(n_classes)], float(counts[IGNORE])
