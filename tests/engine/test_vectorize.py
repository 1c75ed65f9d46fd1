"""vectorize: seeds, crown splitting, land-cover polygons and statistics, areas in m² in any CRS."""
from __future__ import annotations

import math
import sqlite3

import fiona
import numpy as np
import pytest
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin
from shapely.geometry import Point, box

from landcover_plugin.engine.vector.trees import tree_layers
from landcover_plugin.engine.vector.vectorize import (Layer, areas_m2, class_hectares, find_seeds, landcover_layers,
                                                      pixel_size_m, split_crowns, write_gpkg)

UTM = CRS.from_epsg(32617)
WGS84 = CRS.from_epsg(4326)


def disk(shape: tuple[int, int], r: float, c: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - r) ** 2 + (xx - c) ** 2 <= radius ** 2


def test_find_seeds_one_per_peak():
    heat = np.zeros((60, 60), np.float32)
    heat[10, 10], heat[10, 13] = 0.9, 0.8  # closer than the radius: only the higher one
    heat[40, 40:43] = 0.7  # a plateau: one seed, its middle
    heat[10, 45] = 0.2  # too weak
    heat[50, 10] = 0.9  # outside the crowns
    crown = np.ones((60, 60), bool)
    crown[45:, :20] = False
    assert sorted(find_seeds(heat, crown, radius_px=5)) == [(10, 10), (40, 41)]


def test_split_crowns_between_seeds():
    crown = disk((80, 80), 30, 25, 12) | disk((80, 80), 30, 46, 12) | disk((80, 80), 68, 68, 5)
    trees, seeds = split_crowns(crown, [(30, 25), (30, 46)])
    assert set(np.unique(trees)) == {0, 1, 2, 3}
    assert seeds == {1: (30, 25), 2: (30, 46), 3: None}  # the third region has no seed: one tree
    assert trees[30, 25] == 1 and trees[30, 46] == 2 and trees[68, 68] == 3
    sizes = np.bincount(trees.ravel())[1:]
    assert sizes[0] == sizes[1]  # symmetric pair, split at the middle
    assert ((trees > 0) == crown).all()


def test_tree_layers_drop_small_crowns_and_measure():
    shape = (100, 100)
    prob = np.where(disk(shape, 30, 30, 15) | disk(shape, 80, 80, 3), 0.8, 0.1).astype(np.float32)
    heat = np.zeros(shape, np.float32)
    heat[30, 30] = heat[80, 80] = 1.0
    transform = from_origin(500000, 4000000, 0.1, 0.1)
    crowns, points = tree_layers(prob, heat, np.ones(shape, bool), transform, UTM, threshold=0.5)
    assert len(crowns.rows) == len(points.rows) == 1  # the 0.28 m² crown is dropped
    geom, row = crowns.rows[0]
    assert row["area_m2"] == pytest.approx(math.pi * 1.5 ** 2, rel=0.03)
    assert row["confidence"] == pytest.approx(0.8)
    assert points.rows[0][0].equals(Point(transform @ (30.5, 30.5)))
    assert geom.is_valid


def test_tree_layers_respect_the_valid_mask():
    prob = np.ones((50, 50), np.float32)
    valid = np.zeros((50, 50), bool)
    crowns, _ = tree_layers(prob, prob, valid, from_origin(0, 0, 0.1, 0.1), UTM, threshold=0.5)
    assert crowns.rows == []


def test_landcover_polygons_tile_the_area_and_specks_merge():
    classes = np.zeros((60, 80), np.int16)
    classes[:, 40:] = 1
    classes[20:45, 10:30] = 2
    classes[5, 5:7] = 1  # a 2-pixel speck: merged into class 0 around it
    valid = np.ones(classes.shape, bool)
    valid[50:, 70:] = False
    transform = from_origin(500000, 4000000, 2.0, 2.0)
    landcover, stats = landcover_layers(classes, valid, transform, UTM, ["bare", "forest", "water"])
    assert sorted(r["class"] for _, r in landcover.rows) == ["bare", "forest", "water"]
    geoms = [g for g, _ in landcover.rows]
    assert all(g.is_valid for g in geoms)
    union = shapely.union_all(geoms)
    assert union.area == pytest.approx(sum(g.area for g in geoms))  # no overlaps
    assert union.area == pytest.approx(valid.sum() * 4.0, rel=1e-6)  # no gaps
    hectares = {r["class"]: r["hectares"] for _, r in stats.rows}
    assert hectares == pytest.approx({"bare": (40 * 60 - 25 * 20) * 4 / 1e4,
                                      "forest": (40 * 60 - 100) * 4 / 1e4, "water": 25 * 20 * 4 / 1e4})
    by_class = {r["class"]: r["area_m2"] for _, r in landcover.rows}
    assert by_class["water"] == pytest.approx(2000.0, rel=1e-6)


def test_areas_in_metres_for_degrees_and_feet():
    deg = box(0.0, 0.0, 0.001, 0.001)
    assert areas_m2([deg], WGS84)[0] == pytest.approx(111.32 * 110.57, rel=0.01)
    feet = box(0, 0, 1000, 1000)  # EPSG:2264, NC State Plane in US feet
    assert areas_m2([feet], CRS.from_epsg(2264))[0] == pytest.approx(1000 ** 2 * 0.3048006 ** 2, rel=1e-5)


def test_class_hectares_in_degrees():
    transform = from_origin(10.0, 60.0, 0.0001, 0.0001)  # 100x100 px at 60° N
    classes = np.zeros((100, 100), np.int16)
    hectares = class_hectares(classes, np.ones(classes.shape, bool), transform, WGS84, ["all"])
    whole = areas_m2([box(10.0, 59.99, 10.01, 60.0)], WGS84)[0]
    assert hectares["all"] == pytest.approx(whole / 1e4, rel=1e-3)
    assert pixel_size_m(transform, WGS84, 100, 100) == pytest.approx(math.sqrt(whole) / 100, rel=1e-3)


def test_write_gpkg_tables_and_empty_layers(tmp_path):
    out = tmp_path / "x.gpkg"
    write_gpkg(out, [Layer("crowns", "MultiPolygon", {"tree_id": "int"}),
                     Layer("class_stats", None, {"class": "str", "hectares": "float"},
                           [(None, {"class": "a", "hectares": 1.5})])], UTM)
    with fiona.open(out, layer="crowns") as layer:
        assert len(layer) == 0 and layer.crs.to_epsg() == 32617
    with fiona.open(out, layer="class_stats") as layer:
        assert [dict(f["properties"]) for f in layer] == [{"class": "a", "hectares": 1.5}]
    with sqlite3.connect(out) as db:
        kinds = dict(db.execute("SELECT table_name, data_type FROM gpkg_contents"))
    assert kinds == {"crowns": "features", "class_stats": "attributes"}
