"""Per-tree analytics: crowns split by the centre heatmap, measured, health-rated.

Works on one block of the prediction raster (with a margin around its core):
a tree belongs to the block whose core holds its centre, so a tree cut by a
block border is measured whole by exactly one block (no seams, no doubles).

Confidence: the crown's mean probability, calibrated on the model's validation crowns
(vector/confidence.py). Health (mean over the crown):
- VARI = (G - R) / (G + R - B), greenness from the crown's mean red, green, blue (bands 1-3);
- NDVI = (NIR - R) / (NIR + R) when the imagery has a NIR band (`nir_band`); the
  `ndvi` field exists only then.
Status: "dead" when the model has a dead channel and the crown's mean dead
probability reaches `dead_prob`; otherwise from NDVI (when there) or VARI: below the
dead threshold dead, below the stressed one stressed, else healthy. The thresholds are
the user's, else the stand's (health.py): those are known once every crown of the area
is, so TreeWriter.finish sets the statuses then.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes
from shapely.geometry import Point
from shapely.geometry.base import BaseGeometry

from .confidence import calibrate
from .health import HealthThresholds, stand_thresholds
from .vectorize import GpkgWriter, Layer, _polygonal, areas_m2, find_seeds, pixel_size_m, polygon, split_crowns

MIN_CROWN_M2 = 0.5  # smaller crowns are noise
SEED_DISTANCE_M = 1.0  # two tree centres are at least this far apart


@dataclass(frozen=True)
class TreeParams:
    threshold: float = 0.5  # crown probability
    min_area_m2: float = MIN_CROWN_M2
    seed_distance_m: float = SEED_DISTANCE_M
    health: HealthThresholds = HealthThresholds()
    confidence_scale: float = 1.0  # the model's calibration of the mean crown probability
    confidence_shift: float = 0.0


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
    """A crown's status by the model's dead channel and the thresholds set in `th` (a threshold
    left to the stand, None, judges nothing here: TreeWriter.finish does)."""
    if dead_p is not None and dead_p >= th.dead_prob:
        return "dead"
    kind, index = ("ndvi", ndvi_v) if ndvi_v is not None else ("vari", vari_v)
    return index_status(index, getattr(th, f"{kind}_stressed"), getattr(th, f"{kind}_dead"))


def stand_statuses(index: np.ndarray, status: np.ndarray, kind: str,
                   th: HealthThresholds) -> tuple[np.ndarray, tuple[float | None, float | None]]:
    """The statuses of a stand's crowns (health index values `index`, NaN: none; `status` as
    block_trees set it) against its thresholds, and those (stressed, dead) thresholds."""
    stressed, dead = stand_thresholds(index, kind, th)
    new = np.array([s if s == "dead" else index_status(None if np.isnan(v) else float(v), stressed, dead)
                    for v, s in zip(index, status)], object)
    return new, (stressed, dead)


def index_status(index: float | None, stressed: float | None, dead: float | None) -> str:
    if index is None:
        return "healthy"  # no colour to judge by: the model saw a live crown
    return "dead" if dead is not None and index < dead else \
        "stressed" if stressed is not None and index < stressed else "healthy"


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
    confidence = calibrate(mean(block.prob), params.confidence_scale, params.confidence_shift)
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


def tree_layers_from(rows: list[TreeRow], first_id: int = 1, nir: bool = True) -> list[Layer]:
    """`crowns` (polygon per tree) and `trees` (point per tree), numbered in order from `first_id`;
    without `nir`, no `ndvi` field (it would be empty)."""
    fields = {k: v for k, v in TREE_FIELDS.items() if nir or k != "ndvi"}
    crowns, points = Layer("crowns", "MultiPolygon", dict(fields)), Layer("trees", "Point", dict(fields))
    for n, (geom, centre, row) in enumerate(rows, start=first_id):
        row = {"tree_id": n, **{k: v for k, v in row.items() if k in fields}}
        crowns.rows.append((geom, row))
        points.rows.append((centre, dict(row)))
    return [crowns, points]


class TreeWriter:
    """Writes `crowns` and `trees` block by block as the trees are found, numbered in
    order. A tree's polygon, point and fields cost kilobytes: held for the whole area
    until the end, they made the peak RSS grow with it (2.7 GB at 270k crowns). Of each
    tree only what the summary, the stand's health thresholds and the orchard fit need
    is kept: its point, crown area, health index and status (about 40 bytes)."""

    def __init__(self, out: GpkgWriter, nir: bool = True, health: HealthThresholds = HealthThresholds()):
        self.out, self.nir, self.health = out, nir, health
        self.count = 0
        self.first_fid = _row_count(out.path, "crowns")  # rows of earlier areas (predict --per-feature)
        self._xy: list[np.ndarray] = []
        self._area: list[np.ndarray] = []
        self._index: list[np.ndarray] = []
        self._status: list[np.ndarray] = []
        self.kind = "ndvi" if nir else "vari"
        for layer in tree_layers_from([], nir=nir):  # both layers exist even where no tree is found
            out.write(layer)

    def add(self, rows: list[TreeRow]) -> None:
        if not rows:
            return
        for layer in tree_layers_from(rows, first_id=self.count + 1, nir=self.nir):
            self.out.write(layer)
        self.count += len(rows)
        self._xy.append(np.array([(p.x, p.y) for _, p, _ in rows]))
        self._area.append(np.array([row["area_m2"] for _, _, row in rows], np.float64))
        self._index.append(np.array([np.nan if row.get(self.kind) is None else row[self.kind] for _, _, row in rows]))
        self._status.append(np.array([row["status"] for _, _, row in rows], object))

    def finish(self) -> tuple[float | None, float | None]:
        """Set each crown's status against the stand's thresholds (those the user left open),
        in both layers; returns the (stressed, dead) thresholds of the health index used."""
        if not self.count:
            return None, None
        status = np.concatenate(self._status)
        new, thresholds = stand_statuses(np.concatenate(self._index), status, self.kind, self.health)
        changed = np.nonzero(new != status)[0]
        if len(changed):
            import sqlite3

            with sqlite3.connect(self.out.path) as db:
                # The GeoPackage's R-tree triggers name SpatiaLite's functions; they run only when
                # a row's fid or geometry changes, never here (a status is set): present, never called.
                for name in ("ST_IsEmpty", "ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY"):
                    db.create_function(name, 1, _never_called)
                for layer in ("crowns", "trees"):
                    db.executemany(f'UPDATE "{layer}" SET status = ? WHERE fid = ?',
                                   [(new[i], self.first_fid + 1 + int(i)) for i in changed])
            db.close()
        self._status = [new]
        return thresholds

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every tree's (x, y), crown area (m²) and whether it is dead, in tree_id order."""
        if not self.count:
            return np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool)
        return np.concatenate(self._xy), np.concatenate(self._area), np.concatenate(self._status) == "dead"


def _never_called(_geometry):
    raise RuntimeError("a GeoPackage R-tree trigger ran on a status update")


def _row_count(gpkg: Path, layer: str) -> int:
    """Rows of `layer` in the GeoPackage (0 when the file or the layer is not there yet)."""
    import sqlite3

    if not Path(gpkg).is_file():
        return 0
    db = sqlite3.connect(gpkg)
    try:
        return db.execute(f'SELECT count(*) FROM "{layer}"').fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def tree_layers(prob: np.ndarray, heat: np.ndarray, valid: np.ndarray, transform: Affine, crs: CRS,
                threshold: float = 0.5, **kw) -> list[Layer]:
    """The trees of one whole array (no blocks): `crowns` and `trees`."""
    full = (slice(0, prob.shape[0]), slice(0, prob.shape[1]))
    block = TreeBlock(prob, heat, valid, transform, full, **kw)
    rows = block_trees(block, crs, TreeParams(threshold=threshold))
    kind = "ndvi" if block.nir is not None else "vari"
    index = np.array([np.nan if r.get(kind) is None else r[kind] for _, _, r in rows])
    statuses, _ = stand_statuses(index, np.array([r["status"] for _, _, r in rows], object), kind, HealthThresholds())
    rows = [(g, c, {**r, "status": s}) for (g, c, r), s in zip(rows, statuses)]
    return tree_layers_from(rows, nir=block.nir is not None)
