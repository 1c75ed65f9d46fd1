"""Orchards: the planting grid from tree positions, missing trees, per-block summary.

1. Blocks: trees are grouped by single linkage (neighbours closer than
   `link_factor` x the median nearest-neighbour distance); each block gets its own grid.
2. Row direction: the mode of the nearest-neighbour directions (trees stand closest
   along a row). Tree spacing: the median nearest-neighbour distance along it.
3. Rows: trees sorted across the rows split where the gap exceeds half a tree spacing.
4. Grid test: in a planted block the gaps along each row are whole multiples of the
   spacing and most neighbour directions agree. A natural forest fails it: no grid,
   no missing trees (and a message says so).
5. Missing trees: a gap of k spacings inside a row holds k - 1 missing trees, placed
   evenly between its two neighbours (so slightly curved rows work). Rows may have
   any length; a tree missing at a row's end is not detectable and not reported.
All geometry is done in metres (a geographic CRS is measured in its UTM zone).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.warp import transform as warp_points
from shapely.geometry import Point

from ..imagery.aoi import utm_crs
from .vectorize import Layer


@dataclass(frozen=True)
class GridParams:
    min_trees: int = 12  # fewer trees in a block: no grid estimated
    link_factor: float = 2.5  # block linkage distance, x median nearest-neighbour distance
    max_residual: float = 0.25  # a gap counts as on-grid within this share of a spacing of a whole multiple
    min_on_grid: float = 0.8  # share of on-grid gaps in a planted block
    min_aligned: float = 0.5  # share of neighbour directions along or across the rows
    angle_tolerance_deg: float = 10.0


@dataclass
class Grid:
    direction_deg: float  # row bearing, degrees clockwise from north, 0-180
    tree_spacing_m: float
    row_spacing_m: float
    missing: list[tuple[float, float]] = field(default_factory=list)  # metres


@dataclass
class OrchardResult:
    layers: list[Layer]
    missing: int
    grids: int
    message: str


def _axial_mode(angles: np.ndarray, tolerance: float) -> tuple[float, float]:
    """Dominant direction (radians, mod pi) of undirected angles and the share within tolerance."""
    hist, _ = np.histogram(np.mod(angles, np.pi), bins=180, range=(0, np.pi))
    width = max(1, int(np.degrees(tolerance) / 2))
    smooth = sum(np.roll(hist, k) for k in range(-width, width + 1))  # circular: 0 and 180 are one direction
    mode = (np.argmax(smooth) + 0.5) * np.pi / 180
    near = np.abs(np.angle(np.exp(2j * (angles - mode)))) / 2 <= tolerance
    mode = np.angle(np.exp(2j * angles[near]).mean()) / 2  # refine: axial mean of the near ones
    return float(mode), float(near.mean())


def fit_grid(xy: np.ndarray, params: GridParams) -> Grid | None:
    """The planting grid of one block's tree positions (metres), or None when it has none."""
    from scipy.spatial import cKDTree  # here, not at the top: scipy.spatial costs every `landcover` run 0.4 s

    tree = cKDTree(xy)
    dist, idx = tree.query(xy, k=min(5, len(xy)))
    nn = xy[idx[:, 1]] - xy
    tol = np.radians(params.angle_tolerance_deg)
    theta, _ = _axial_mode(np.arctan2(nn[:, 1], nn[:, 0]), tol)
    u, v = np.array([np.cos(theta), np.sin(theta)]), np.array([-np.sin(theta), np.cos(theta)])
    # How many neighbour directions (4 nearest) run along or across the rows.
    vecs = (xy[idx[:, 1:]] - xy[:, None]).reshape(-1, 2)
    rel = np.abs(np.angle(np.exp(2j * (np.arctan2(vecs[:, 1], vecs[:, 0]) - theta)))) / 2  # 0..pi/2
    aligned = float(((rel <= tol) | (rel >= np.pi / 2 - tol)).mean())
    along = np.abs(nn @ u)[np.abs(np.angle(np.exp(2j * (np.arctan2(nn[:, 1], nn[:, 0]) - theta)))) / 2 <= tol]
    if aligned < params.min_aligned or len(along) < 3:
        return None
    spacing = float(np.median(along))
    a, b = xy @ u, xy @ v
    order = np.argsort(b)
    breaks = np.nonzero(np.diff(b[order]) > spacing / 2)[0] + 1
    rows = np.split(order, breaks)
    row_b = np.array([b[r].mean() for r in rows])
    row_spacing = float(np.median(np.diff(row_b))) if len(rows) > 1 else 0.0
    gaps_ok, gaps, missing = 0, 0, []
    for r in rows:
        r = r[np.argsort(a[r])]
        for i, j in zip(r[:-1], r[1:]):
            ratio = (a[j] - a[i]) / spacing
            k = int(round(ratio))
            gaps += 1
            if k >= 1 and abs(ratio - k) <= params.max_residual:
                gaps_ok += 1
                missing += [tuple(xy[i] + (xy[j] - xy[i]) * s / k) for s in range(1, k)]
    if gaps == 0 or gaps_ok / gaps < params.min_on_grid:
        return None
    bearing = (90.0 - np.degrees(theta)) % 180.0
    return Grid(round(bearing, 2), round(spacing, 3), round(row_spacing, 3), missing)


def link_blocks(xy: np.ndarray, params: GridParams) -> list[np.ndarray]:
    """Indices of the trees of each block (single linkage), biggest first; blocks of
    the same size in the order of their first tree."""
    if len(xy) < 2:
        return [np.arange(len(xy))] if len(xy) else []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=2)
    eps = params.link_factor * float(np.median(d[:, 1]))
    # the pairs as an array, not a set of tuples: ~10 per tree, 400 MB as tuples at 270k trees
    pairs = tree.query_pairs(eps, output_type="ndarray")
    links = coo_matrix((np.ones(len(pairs), bool), (pairs[:, 0], pairs[:, 1])), shape=(len(xy), len(xy)))
    _, labels = connected_components(links, directed=False)  # numbered in the order of their first tree
    members = np.argsort(labels, kind="stable")  # by block, each block's trees in index order
    groups = np.split(members, np.cumsum(np.bincount(labels))[:-1])
    return sorted(groups, key=len, reverse=True)  # stable: equal sizes keep their order


def _to_metres(xy: np.ndarray, crs: CRS) -> tuple[np.ndarray, CRS]:
    if not crs.is_geographic or not len(xy):
        return xy * crs.linear_units_factor[1] if len(xy) else xy, crs
    lon, lat = xy.mean(axis=0)
    utm = CRS.from_string(utm_crs(float(lon), float(lat)))
    x, y = warp_points(crs, utm, xy[:, 0].tolist(), xy[:, 1].tolist())
    return np.column_stack([x, y]), utm


def _from_metres(xy: np.ndarray, crs: CRS, metric: CRS) -> np.ndarray:
    if metric == crs:
        return xy / crs.linear_units_factor[1]
    x, y = warp_points(metric, crs, xy[:, 0].tolist(), xy[:, 1].tolist())
    return np.column_stack([x, y])


BLOCK_FIELDS = {"block_id": "int", "trees": "int", "dead": "int", "missing": "int", "mean_crown_m2": "float",
                "canopy_cover_pct": "float", "grid": "int", "row_bearing_deg": "float",
                "tree_spacing_m": "float", "row_spacing_m": "float"}


def orchard_layers(tree_rows: list[tuple[Point, dict]], crs: CRS, params: GridParams = GridParams()) -> OrchardResult:
    """`missing_trees` and `orchard_blocks` of trees given as (point, fields) rows."""
    xy = np.array([[p.x, p.y] for p, _ in tree_rows]).reshape(-1, 2)
    area_m2 = np.array([row["area_m2"] for _, row in tree_rows], np.float64)
    dead = np.array([row["status"] == "dead" for _, row in tree_rows], bool)
    return orchard_from_points(xy, area_m2, dead, crs, params)


def orchard_from_points(xy: np.ndarray, area_m2: np.ndarray, dead: np.ndarray, crs: CRS,
                        params: GridParams = GridParams()) -> OrchardResult:
    """`missing_trees` (points) and `orchard_blocks` (polygons with the per-block summary)
    from each tree's position (n, 2) in `crs`, crown area and whether it is dead: arrays,
    so that the trees of a large area cost a few bytes each here, not their crowns. Only
    blocks with a planting grid are orchards: without one, neither layer is made."""
    missing_layer = Layer("missing_trees", "Point", {"block_id": "int"})
    blocks_layer = Layer("orchard_blocks", "Polygon", dict(BLOCK_FIELDS))
    metres, metric = _to_metres(xy, crs)
    stands = 0
    for idx in (b for b in link_blocks(metres, params) if len(b) >= params.min_trees):
        stands += 1
        grid = fit_grid(metres[idx], params)
        if grid is None:  # a natural stand (or too irregular to tell): not an orchard
            continue
        n = len(blocks_layer.rows) + 1
        hull = shapely.multipoints(metres[idx]).convex_hull.buffer(grid.tree_spacing_m / 2)
        crown_m2 = area_m2[idx].tolist()
        missing = np.array(grid.missing).reshape(-1, 2)
        if len(missing):
            for x, y in _from_metres(missing, crs, metric):
                missing_layer.rows.append((Point(x, y), {"block_id": n}))
        outline = shapely.transform(hull, lambda pts: _from_metres(pts, crs, metric))
        blocks_layer.rows.append((outline, {
            "block_id": n, "trees": len(idx), "dead": int(dead[idx].sum()),
            "missing": len(missing), "mean_crown_m2": round(float(np.mean(crown_m2)), 3),
            "canopy_cover_pct": round(100.0 * min(1.0, sum(crown_m2) / hull.area), 2), "grid": 1,
            "row_bearing_deg": grid.direction_deg, "tree_spacing_m": grid.tree_spacing_m,
            "row_spacing_m": grid.row_spacing_m}))
    grids = len(blocks_layer.rows)
    if grids:
        message = f"Planting grid found in {grids} of {stands} blocks; {len(missing_layer.rows)} missing trees."
    else:
        message = "No planting grid found (natural stand or too few trees): no orchard layers, no missing trees."
    layers = [missing_layer, blocks_layer] if grids else []
    return OrchardResult(layers, len(missing_layer.rows), grids, message)
