"""orchard: planting grid, missing trees and block summary on synthetic orchards with known gaps."""
from __future__ import annotations

import numpy as np
import pytest
from rasterio.crs import CRS
from shapely.geometry import Point

from landcover_plugin.engine.vector.orchard import fit_grid, GridParams, orchard_layers

UTM = CRS.from_epsg(32617)


def orchard(rng, bearing_deg: float, n_rows: int, tree_m: float, row_m: float, jitter_m: float = 0.15,
            missing_share: float = 0.08, origin=(400000.0, 3300000.0)):
    """Tree positions of a rotated grid with rows of different lengths and starts;
    returns (standing xy, missing xy). Missing trees are inside rows (row ends are undetectable)."""
    theta = np.radians(90.0 - bearing_deg)  # bearing from north -> angle from east
    u, v = np.array([np.cos(theta), np.sin(theta)]), np.array([-np.sin(theta), np.cos(theta)])
    standing, missing = [], []
    for j in range(n_rows):
        start, length = rng.integers(0, 4), rng.integers(12, 25)  # uneven rows
        for i in range(start, start + length):
            p = np.array(origin) + i * tree_m * u + j * row_m * v + rng.normal(0, jitter_m, 2)
            inner = start < i < start + length - 1
            (missing if inner and rng.random() < missing_share else standing).append(p)
    return np.array(standing), np.array(missing)


def rows_of(xy: np.ndarray, dead: set[int] = frozenset()):
    return [(Point(x, y), {"area_m2": 4.0, "status": "dead" if i in dead else "healthy"})
            for i, (x, y) in enumerate(xy)]


def axial_diff(a: float, b: float) -> float:
    """Difference of two row bearings (a row at 0 deg is a row at 180 deg)."""
    d = abs(a - b) % 180
    return min(d, 180 - d)


def match(found: np.ndarray, truth: np.ndarray, radius: float) -> tuple[float, float]:
    """(share of truth found, share of found that are false) within radius metres."""
    if not len(found):
        return 0.0, 0.0
    d = np.linalg.norm(found[:, None] - truth[None], axis=2)
    return float((d.min(axis=0) <= radius).mean()), float((d.min(axis=1) > radius).mean())


@pytest.mark.parametrize("bearing, tree_m, row_m", [(0.0, 4.0, 6.0), (33.0, 3.0, 5.0), (118.0, 5.0, 5.0)])
def test_missing_trees_in_rotated_uneven_orchards(bearing, tree_m, row_m):
    rng = np.random.default_rng(int(bearing))
    standing, missing = orchard(rng, bearing, n_rows=14, tree_m=tree_m, row_m=row_m)
    assert len(missing) >= 8
    dead = {3, 40}
    result = orchard_layers(rows_of(standing, dead), UTM)
    found = np.array([[p.x, p.y] for p, _ in result.layers[0].rows]).reshape(-1, 2)
    recall, false_share = match(found, missing, radius=tree_m / 3)
    assert recall >= 0.95 and false_share <= 0.05, (recall, false_share, len(found), len(missing))
    (_, block), = result.layers[1].rows
    assert block["grid"] == 1 and block["trees"] == len(standing) and block["dead"] == 2
    assert block["missing"] == len(found) == result.missing
    assert block["tree_spacing_m"] == pytest.approx(tree_m, rel=0.05)
    if tree_m != row_m:  # a square grid's rows may run either way
        assert axial_diff(block["row_bearing_deg"], bearing) <= 2
        assert block["row_spacing_m"] == pytest.approx(row_m, rel=0.05)
    assert 0 < block["canopy_cover_pct"] < 100 and block["mean_crown_m2"] == 4.0


def test_two_blocks_with_their_own_grids():
    rng = np.random.default_rng(7)
    a, miss_a = orchard(rng, 10.0, 10, 4.0, 6.0)
    b, miss_b = orchard(rng, 75.0, 10, 3.0, 5.0, origin=(400300.0, 3300000.0))
    result = orchard_layers(rows_of(np.concatenate([a, b])), UTM)
    assert result.grids == 2
    bearings = sorted(r["row_bearing_deg"] for _, r in result.layers[1].rows)
    assert axial_diff(bearings[0], 10.0) <= 2 and axial_diff(bearings[1], 75.0) <= 2
    found = np.array([[p.x, p.y] for p, _ in result.layers[0].rows])
    recall, false_share = match(found, np.concatenate([miss_a, miss_b]), radius=1.0)
    assert recall >= 0.95 and false_share <= 0.05


def test_natural_forest_has_no_grid_and_no_missing_trees():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 120, (400, 2))  # a random stand
    pts = pts[np.linalg.norm(pts[:, None] - pts[None], axis=2).__add__(np.eye(len(pts)) * 99).min(axis=1) > 2.0]
    result = orchard_layers(rows_of(pts + [400000, 3300000]), UTM)
    assert result.missing == 0 and result.grids == 0
    assert "No planting grid" in result.message
    assert result.layers == []  # a natural stand gets no empty orchard layers


def test_only_the_planted_block_is_an_orchard():
    rng = np.random.default_rng(5)
    planted, _ = orchard(rng, 20.0, 10, 4.0, 6.0)
    wild = rng.uniform(0, 80, (150, 2))
    wild = wild[np.linalg.norm(wild[:, None] - wild[None], axis=2).__add__(np.eye(len(wild)) * 99).min(axis=1) > 2.5]
    result = orchard_layers(rows_of(np.concatenate([planted, wild + [400500, 3300000]])), UTM)
    (_, block), = result.layers[1].rows
    assert result.grids == 1 and block["trees"] == len(planted)


def test_too_few_trees_and_geographic_crs():
    assert orchard_layers([], UTM).missing == 0
    assert orchard_layers(rows_of(np.array([[0.0, 0.0], [4.0, 0.0]])), UTM).layers == []
    # a grid given in degrees: found and measured in metres
    rng = np.random.default_rng(1)
    standing, missing = orchard(rng, 45.0, 10, 4.0, 6.0, origin=(0.0, 0.0))
    lon = -80.0 + standing[:, 0] / (111_320 * np.cos(np.radians(45.0)))
    lat = 45.0 + standing[:, 1] / 111_132
    result = orchard_layers(rows_of(np.column_stack([lon, lat])), CRS.from_epsg(4326))
    (_, block), = result.layers[1].rows
    assert block["tree_spacing_m"] == pytest.approx(4.0, rel=0.05)
    assert result.missing == pytest.approx(len(missing), abs=1)
    assert all(-80.01 < p.x < -79.9 and 44.99 < p.y < 45.1 for p, _ in result.layers[0].rows)


def test_fit_grid_rejects_random_points():
    assert fit_grid(np.random.default_rng(0).uniform(0, 50, (60, 2)), GridParams()) is None
