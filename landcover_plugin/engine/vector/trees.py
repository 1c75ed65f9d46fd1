"""Per-tree analytics: crowns split by the centre heatmap, measured, health-rated.

Works on one block of the prediction raster (with a margin around its core):
a tree belongs to the block whose core holds its centre, so a tree cut by a
block border is measured whole by exactly one block (no seams, no doubles).

Health (mean over the crown):
- VARI = (G - R) / (G + R - B), from the crown's mean red, green, blue (bands 1-3);
- NDVI = (NIR - R) / (NIR + R) when the imagery has a NIR band (`nir_band`).
Status: "dead" when the model has a dead channel and the crown's mean dead
probability reaches `dead_prob`; otherwise from NDVI (when there) or VARI:
below `*_dead` dead, below `*_stressed` stressed, else healthy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes
from shapely.geometry import Point
from shapely.geometry.base import BaseGeometry

from .health import HealthThresholds
from .vectorize import GpkgWriter, Layer, _polygonal, areas_m2, find_seeds, pixel_size_m, polygon, split_crowns

MIN_CROWN_M2 = 0.5  # smaller crowns are noise
SEED_DISTANCE_M = 1.0  # two tree centres are at least this far apart
STATUSES = ("healthy", "stressed", "dead")


@dataclass(frozen=True)
class TreeParams:
    threshold: float = 0.5  # crown probability
    min_area_m2: float = MIN_CROWN_M2
    seed_distance_m: float = SEED_DISTANCE_M
    health: HealthThresholds = HealthThresholds()


TreeRow = tuple[BaseGeometry, Point, dict]  # crown polygon, centre point, fields
TREE_FIELDS = {"tree_id": "int", "area_m2": "float", "diameter_m": "float", "confidence": "float",
               "vari": "float", "ndvi": "float", "status": "str"}


def vari(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Visible Atmospherically Resistant Index, clipped to [-1, 1] (its denominator can vanish)."""
    den = g + r - b
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(np.abs(den) > 1e-6, (g - r) / den, 0.0)
    return np.clip(v, -1.0, 1.0)


def ndvi(nir: np.ndarray, r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nir + r > 0, (nir - r) / (nir + r), 0.0)


def tree_status(vari_v: float | None, ndvi_v: float | None, dead_p: float | None, th: HealthThresholds) -> str:
    if dead_p is not None and dead_p >= th.dead_prob:
        return "dead"
    if ndvi_v is not None:
        index, stressed, dead = ndvi_v, th.ndvi_stressed, th.ndvi_dead
    elif vari_v is not None:
        index, stressed, dead = vari_v, th.vari_stressed, th.vari_dead
    else:
        return "healthy"  # no colour to judge by: the model saw a live crown
    return "dead" if index < dead else "stressed" if index < stressed else "healthy"


@dataclass
class TreeBlock:
    """One block's model outputs and imagery, all (h, w) arrays over core + margin."""

    prob: np.ndarray
    heat: np.ndarray
    valid: np.ndarray
    transform: Affine  # of the block's top-left pixel
    core: tuple[slice, slice]  # the block's own pixels
    dead: np.ndarray | None = None
    rgb: np.ndarray | None = None  # (3, h, w) raw
    nir: np.ndarray | None = None


def block_trees(block: TreeBlock, crs: CRS, params: TreeParams) -> list[TreeRow]:
    """(crown polygon, centre point, fields) for each tree whose centre lies in the block's core."""
    from scipy import ndimage  # here: a land-cover run does not pay scipy's import

    crown = (block.prob > params.threshold) & block.valid
    if not crown.any():
        return []
    radius_px = max(1, round(params.seed_distance_m / pixel_size_m(block.transform, crs, *crown.shape)))
    labels, tree_seeds = split_crowns(crown, find_seeds(block.heat, crown, radius_px))
    ids = np.arange(1, len(tree_seeds) + 1)
    # Where each tree is anchored: its seed, else its centre of mass (nearest crown pixel of it).
    anchors = {i: s for i, s in tree_seeds.items() if s is not None}
    unseeded = [i for i, s in tree_seeds.items() if s is None]
    if unseeded:
        for i, (r, c) in zip(unseeded, ndimage.center_of_mass(crown, labels, unseeded)):
            anchors[i] = (int(round(r)), int(round(c)))
    rows, cols = block.core
    own = [i for i in ids if rows.start <= anchors[i][0] < rows.stop and cols.start <= anchors[i][1] < cols.stop]
    if not own:
        return []
    keep = np.zeros(len(ids) + 1, bool)
    keep[own] = True
    labels = np.where(keep[labels], labels, 0)

    parts: dict[int, list[BaseGeometry]] = {}
    for g, v in shapes(labels, mask=labels > 0, transform=block.transform, connectivity=4):
        parts.setdefault(int(v), []).append(polygon(g))
    own = sorted(parts)
    geoms = [_polygonal(shapely.union_all(parts[i])) for i in own]
    areas = areas_m2(geoms, crs)
    mean = lambda band: np.asarray(ndimage.mean(band.astype(np.float64), labels, own))  # noqa: E731
    confidence = mean(block.prob)
    dead_p = mean(block.dead) if block.dead is not None else None
    vari_v = vari(*(mean(b) for b in block.rgb)) if block.rgb is not None else None
    ndvi_v = ndvi(mean(block.nir), mean(block.rgb[0])) if block.nir is not None and block.rgb is not None else None

    out = []
    for k, (i, geom, area) in enumerate(zip(own, geoms, areas)):
        if area < params.min_area_m2:
            continue
        seed = tree_seeds[i]
        centre = Point(block.transform @ (seed[1] + 0.5, seed[0] + 0.5)) if seed else geom.centroid
        if seed is None and not geom.contains(centre):
            centre = geom.representative_point()  # a crescent's centroid lies outside it
        v = None if vari_v is None else round(float(vari_v[k]), 4)
        n = None if ndvi_v is None else round(float(ndvi_v[k]), 4)
        d = None if dead_p is None else float(dead_p[k])
        row = {"area_m2": round(float(area), 3), "diameter_m": round(2 * math.sqrt(area / math.pi), 3),
               "confidence": round(float(confidence[k]), 4), "vari": v, "ndvi": n,
               "status": tree_status(v, n, d, params.health)}
        out.append((geom, centre, row))
    return out


def tree_layers_from(rows: list[TreeRow], first_id: int = 1) -> list[Layer]:
    """`crowns` (polygon per tree) and `trees` (point per tree), numbered in order from `first_id`."""
    crowns, points = Layer("crowns", "MultiPolygon", dict(TREE_FIELDS)), Layer("trees", "Point", dict(TREE_FIELDS))
    for n, (geom, centre, row) in enumerate(rows, start=first_id):
        row = {"tree_id": n, **row}
        crowns.rows.append((geom, row))
        points.rows.append((centre, dict(row)))
    return [crowns, points]


class TreeWriter:
    """Writes `crowns` and `trees` block by block as the trees are found, numbered in
    order. A tree's polygon, point and fields cost kilobytes: held for the whole area
    until the end, they made the peak RSS grow with it (2.7 GB at 270k crowns). Of each
    tree only what the summary and the orchard fit need is kept: its point, crown
    area and whether it is dead (25 bytes)."""

    def __init__(self, out: GpkgWriter):
        self.out = out
        self.count = 0
        self._xy: list[np.ndarray] = []
        self._area: list[np.ndarray] = []
        self._dead: list[np.ndarray] = []
        for layer in tree_layers_from([]):  # both layers exist even where no tree is found
            out.write(layer)

    def add(self, rows: list[TreeRow]) -> None:
        if not rows:
            return
        for layer in tree_layers_from(rows, first_id=self.count + 1):
            self.out.write(layer)
        self.count += len(rows)
        self._xy.append(np.array([(p.x, p.y) for _, p, _ in rows]))
        self._area.append(np.array([row["area_m2"] for _, _, row in rows], np.float64))
        self._dead.append(np.array([row["status"] == "dead" for _, _, row in rows]))

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every tree's (x, y), crown area (m²) and whether it is dead, in tree_id order."""
        if not self.count:
            return np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool)
        return np.concatenate(self._xy), np.concatenate(self._area), np.concatenate(self._dead)


def tree_layers(prob: np.ndarray, heat: np.ndarray, valid: np.ndarray, transform: Affine, crs: CRS,
                threshold: float = 0.5, **kw) -> list[Layer]:
    """The trees of one whole array (no blocks): `crowns` and `trees`."""
    full = (slice(0, prob.shape[0]), slice(0, prob.shape[1]))
    block = TreeBlock(prob, heat, valid, transform, full, **kw)
    return tree_layers_from(block_trees(block, crs, TreeParams(threshold=threshold)))
