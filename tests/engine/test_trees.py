"""Per-tree analytics through `predict`: health from RGB and NIR, status, dead channel,
trees and land cover identical whatever the vectorization block size (no seams)."""
from __future__ import annotations

import math

import fiona
import numpy as np
import pytest
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin
from shapely.geometry import Point, shape

from landcover_plugin.engine.learn.model_package import ModelInfo
from landcover_plugin.engine.stages.predict import PredictParams, predict
from landcover_plugin.engine.vector.trees import HealthThresholds, tree_status, vari
from landcover_plugin.engine.vector.vectorize import landcover_layers

from test_predict import PIXEL, conv_model, json_reporter, tree_scene, write_raster

# (row, col, (R, G, B, NIR), dead-channel) of three 1.5 m crowns; 0.1 m pixels
CROWNS = [(60, 60, (60, 140, 50, 200), 0.0),  # green: VARI 0.53, NDVI 0.54
          (60, 200, (150, 150, 60, 130), 0.0),  # yellowing: VARI 0, NDVI -0.07
          (200, 120, (140, 100, 80, 150), 0.9)]  # brown, and the model says dead


def health_scene(size: int = 260, crowns=CROWNS) -> np.ndarray:
    """Bands R, G, B, NIR, crown probability, heatmap, dead probability, all 0-255
    (one value range, as imagery has: the model divides them by 255)."""
    yy, xx = np.mgrid[:size, :size]
    bands = np.zeros((7, size, size), np.float32)
    bands[:4] = 30.0  # dark soil
    for r, c, colour, dead in crowns:
        d2 = (yy - r) ** 2 + (xx - c) ** 2
        disk = d2 <= 15 ** 2
        for b, value in enumerate(colour):
            bands[b][disk] = value
        bands[4][disk] = 0.9 * 255
        bands[5] = np.maximum(bands[5], 255 * np.exp(-d2 / (2 * 7.5 ** 2)))
        bands[6][disk] = dead * 255
    return bands


def health_model(path, dead_channel: bool, nir_band: int | None = None, **info_fields):
    """Passes bands 5-7 (or 5-6) through as the model's output."""
    c_out = 3 if dead_channel else 2
    weights = np.zeros((c_out, 7, 1, 1))
    for k in range(c_out):
        weights[k, 4 + k] = 1.0
    info = ModelInfo(task="trees", class_names=["crown", "dead"] if dead_channel else ["crown"], class_colors=[],
                     band_count=7, resolution_m=PIXEL, tile_size=64, tile_overlap=8, input_scale=255.0,
                     mean=[0.0] * 7, std=[1.0] * 7, nir_band=nir_band, **info_fields)
    return conv_model(path, weights, np.zeros(c_out), info)


def read_layer(gpkg, name):
    with fiona.open(gpkg, layer=name) as layer:
        return [(shape(f["geometry"]), dict(f["properties"])) for f in layer]


def crown_at(crowns, transform, r, c):
    (props,) = [p for g, p in crowns if g.contains(Point(transform @ (c + 0.5, r + 0.5)))]
    return props


def test_health_and_status_from_rgb_and_dead_channel(tmp_path):
    transform = from_origin(400000, 3300000, PIXEL, PIXEL)
    raster = write_raster(tmp_path / "scene.tif", health_scene(), transform)
    out = tmp_path / "trees.gpkg"
    fixed = HealthThresholds(vari_stressed=0.05, vari_dead=-0.05)  # the user's thresholds: three crowns are no stand
    result = predict(PredictParams(model=health_model(tmp_path / "m.onnx", dead_channel=True), imagery=raster,
                                   out=out, health=fixed), json_reporter())
    crowns = read_layer(out, "crowns")
    assert len(crowns) == 3 and result.summary["dead"] == 1
    green, yellow, brown = (crown_at(crowns, transform, r, c) for r, c, _, _ in CROWNS)
    assert green["vari"] == pytest.approx(80 / 150, abs=0.01) and green["status"] == "healthy"
    assert yellow["vari"] == pytest.approx(0.0, abs=0.01) and yellow["status"] == "stressed"
    assert brown["status"] == "dead" and "ndvi" not in brown  # no NIR band: no empty NDVI field
    assert green["area_m2"] == pytest.approx(math.pi * 1.5 ** 2, rel=0.05)
    assert {p["status"] for _, p in read_layer(out, "trees")} == {"healthy", "stressed", "dead"}
    # three trees are no planting grid: no empty orchard layers
    assert set(fiona.listlayers(out)) == {"crowns", "trees", "layer_styles"}


def test_confidence_is_the_mean_probability_as_the_model_calibrated_it(tmp_path):
    transform = from_origin(400000, 3300000, PIXEL, PIXEL)
    raster = write_raster(tmp_path / "scene.tif", health_scene(), transform)
    for name, fields, expected in (("raw", {}, 0.9), ("calibrated", {"confidence_scale": 0.5, "confidence_shift": -1.0},
                                                        1 / (1 + math.exp(-(0.5 * math.log(9) - 1))))):
        out = tmp_path / f"{name}.gpkg"
        predict(PredictParams(model=health_model(tmp_path / f"{name}.onnx", dead_channel=False, **fields),
                              imagery=raster, out=out), json_reporter())
        assert [p["confidence"] for _, p in read_layer(out, "crowns")] == pytest.approx([expected] * 3, abs=0.01)


def test_status_is_relative_to_the_stand_by_default(tmp_path):
    """Dark conifers (VARI 0.03-0.05, all "stressed" by a fixed 0.05) are healthy for their
    stand; the one crown much less green than its stand is not."""
    rng = np.random.default_rng(0)
    stand = [(30 + 40 * i + int(rng.integers(-4, 5)), 30 + 40 * j + int(rng.integers(-4, 5)),
              (60, 62 + (i + j) % 3, 50, 0), 0.0) for i in range(5) for j in range(5) if (i, j) != (2, 2)]
    odd = (110, 110, (80, 66, 50, 0), 0.0)  # VARI -0.15
    transform = from_origin(400000, 3300000, PIXEL, PIXEL)
    raster = write_raster(tmp_path / "stand.tif", health_scene(220, stand + [odd]), transform)
    out = tmp_path / "trees.gpkg"
    predict(PredictParams(model=health_model(tmp_path / "m.onnx", dead_channel=False), imagery=raster, out=out,
                          orchard=False), json_reporter())
    crowns, points = read_layer(out, "crowns"), read_layer(out, "trees")
    assert len(crowns) == len(stand) + 1
    assert all(0.02 < p["vari"] < 0.06 for _, p in crowns if p["tree_id"] != crown_at(crowns, transform, 110, 110)["tree_id"])
    assert crown_at(crowns, transform, 110, 110)["status"] != "healthy"
    assert sum(p["status"] == "healthy" for _, p in crowns) == len(stand)
    # one legend: the points carry the crowns' statuses
    assert sorted((p["tree_id"], p["status"]) for _, p in points) == sorted((p["tree_id"], p["status"]) for _, p in crowns)


def test_ndvi_with_a_nir_band_and_custom_thresholds(tmp_path):
    transform = from_origin(400000, 3300000, PIXEL, PIXEL)
    raster = write_raster(tmp_path / "scene.tif", health_scene(), transform)
    out = tmp_path / "trees.gpkg"
    strict = HealthThresholds(ndvi_stressed=0.6, ndvi_dead=-0.5)
    predict(PredictParams(model=health_model(tmp_path / "m.onnx", dead_channel=False), imagery=raster, out=out,
                          nir_band=4, health=strict), json_reporter())
    crowns = read_layer(out, "crowns")
    green, yellow, brown = (crown_at(crowns, transform, r, c) for r, c, _, _ in CROWNS)
    assert green["ndvi"] == pytest.approx(140 / 260, abs=0.01) and green["status"] == "stressed"  # 0.54 < 0.6
    assert yellow["ndvi"] == pytest.approx(-20 / 280, abs=0.01) and yellow["status"] == "stressed"
    assert brown["status"] == "stressed"  # no dead channel; NDVI 0.03 is above the -0.5 set here


def test_status_rules():
    th = HealthThresholds(vari_stressed=0.05, vari_dead=-0.05, ndvi_stressed=0.5, ndvi_dead=0.25)
    assert tree_status(0.3, None, None, th) == "healthy"
    assert tree_status(0.0, None, None, th) == "stressed"
    assert tree_status(-0.2, None, None, th) == "dead"
    assert tree_status(-0.2, 0.7, None, th) == "healthy"  # NDVI wins over VARI
    assert tree_status(0.3, 0.7, 0.6, th) == "dead"  # the model's dead channel wins
    assert tree_status(None, None, None, th) == "healthy"
    assert vari(np.array([10.0]), np.array([10.0]), np.array([20.0]))[0] == 0.0  # zero denominator


@pytest.mark.parametrize("block", [48, 100])
def test_trees_do_not_depend_on_the_block_size(tmp_path, block):
    """Crowns cut by vectorization block borders are measured whole, once."""
    from test_predict import trees_model

    transform = from_origin(400000, 3300000, PIXEL, PIXEL)
    raster = write_raster(tmp_path / "scene.tif", tree_scene(), transform)
    model = trees_model(tmp_path / "t.onnx")
    whole, split = tmp_path / "whole.gpkg", tmp_path / "split.gpkg"
    predict(PredictParams(model=model, imagery=raster, out=whole), json_reporter())
    predict(PredictParams(model=model, imagery=raster, out=split, block_size=block), json_reporter())
    a, b = read_layer(whole, "crowns"), read_layer(split, "crowns")
    key = lambda rows: sorted((round(g.centroid.x, 2), round(g.centroid.y, 2), p["area_m2"]) for g, p in rows)  # noqa: E731
    assert len(a) == 6 and key(a) == key(b)


def test_landcover_polygons_merge_across_blocks():
    rng = np.random.default_rng(0)
    # blobs of 3 classes, larger than the blocks
    classes = (np.add.outer(np.sin(np.arange(150) / 9.0), np.cos(np.arange(170) / 7.0)) * 1.5 + 1.5).astype(np.int16)
    classes = np.clip(classes, 0, 2)
    classes[rng.random(classes.shape) < 0.01] = 1  # specks, sieved away
    valid = np.ones(classes.shape, bool)
    valid[60:80, 30:50] = False
    transform = from_origin(500000, 4000000, 2.0, 2.0)
    crs = CRS.from_epsg(32617)
    whole, stats = landcover_layers(classes, valid, transform, crs, ["a", "b", "c"], block_size=1000)
    split, stats_split = landcover_layers(classes, valid, transform, crs, ["a", "b", "c"], block_size=40)
    assert len(split.rows) == len(whole.rows) > 5  # no region cut into pieces at the block borders
    for name in "abc":
        area = lambda layer: sum(p["area_m2"] for _, p in layer.rows if p["class"] == name)  # noqa: E731
        assert area(split) == pytest.approx(area(whole), rel=0.01)
    geoms = [g for g, _ in split.rows]
    assert all(g.is_valid for g in geoms)
    union = shapely.union_all(geoms)
    assert union.area == pytest.approx(sum(g.area for g in geoms), rel=1e-6)  # no overlaps
    assert union.area == pytest.approx(valid.sum() * 4.0, rel=2e-3)  # no gaps
    assert stats.rows == stats_split.rows


def test_cli_tree_options(tmp_path, capsys):
    import json

    from landcover_plugin.engine.cli import main

    raster = write_raster(tmp_path / "scene.tif", health_scene(), from_origin(400000, 3300000, PIXEL, PIXEL))
    model = health_model(tmp_path / "m.onnx", dead_channel=False)
    out = tmp_path / "t.gpkg"
    assert main(["--json", "predict", "--model", str(model), "--imagery", str(raster), "--out", str(out),
                 "--nir-band", "4", "--ndvi-stressed", "0.1", "--ndvi-dead", "0.25", "--no-orchard"]) == 0
    assert "missing_trees" not in fiona.listlayers(out)
    statuses = sorted(p["status"] for _, p in read_layer(out, "crowns"))
    assert statuses == ["dead", "dead", "healthy"]  # NDVI 0.54; -0.07 and 0.03 are below ndvi_dead 0.25
    capsys.readouterr()
    assert main(["--json", "predict", "--model", str(model), "--imagery", str(raster), "--out", str(out),
                 "--nir-band", "9"]) == 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["code"] == "BAD_IMAGERY_BANDS"


def orchard_scene(rows: int = 10, cols: int = 12, row_pitch: int = 60, pitch: int = 40) -> np.ndarray:
    """Crown probability and centre heatmap of a planted grid (1.2 m crowns every 4 m in
    rows 6 m apart: not square, so the rows' direction is clear) with a few trees missing."""
    missing = {(2, 5), (6, 3), (7, 8), (9, 4)}
    yy, xx = np.mgrid[:rows * row_pitch, :cols * pitch]
    crown = np.zeros(yy.shape, np.float32)
    heat = np.zeros(yy.shape, np.float32)
    for i in range(rows):
        for j in range(cols):
            if (i, j) not in missing:
                d2 = (yy - i * row_pitch - row_pitch // 2) ** 2 + (xx - j * pitch - pitch // 2) ** 2
                crown[d2 <= 12 ** 2] = 0.9
                heat = np.maximum(heat, np.exp(-d2 / (2 * 6.0 ** 2)))
    return np.stack([crown, heat])


def test_trees_written_block_by_block_match_the_whole_scene(tmp_path):
    """predict writes crowns and trees block by block (issue 13): in many blocks the four
    layers and the summary are those of the whole scene outlined and fitted in memory.
    (Blocks of 120 px: 20 of them, each read with a 150 px margin.)"""
    from test_predict import trees_model

    from landcover_plugin.engine.vector.orchard import orchard_layers
    from landcover_plugin.engine.vector.trees import tree_layers

    transform, crs = from_origin(400000, 3300000, PIXEL, PIXEL), CRS.from_epsg(32617)
    scene = orchard_scene()
    raster = write_raster(tmp_path / "orchard.tif", scene, transform)
    out = tmp_path / "trees.gpkg"
    result = predict(PredictParams(model=trees_model(tmp_path / "t.onnx"), imagery=raster, out=out, block_size=120),
                     json_reporter())

    crowns, points = tree_layers(scene[0], scene[1], np.ones(scene[0].shape, bool), transform, crs)
    orchard = orchard_layers(points.rows, crs)
    assert result.summary["crowns"] == len(crowns.rows) == 116
    assert result.summary["canopy_m2"] == pytest.approx(sum(p["area_m2"] for _, p in crowns.rows), abs=0.01)
    assert result.summary["missing_trees"] == orchard.missing == 4 and result.summary["orchard_blocks"] == 1

    got_crowns, got_points = read_layer(out, "crowns"), read_layer(out, "trees")
    assert [p["tree_id"] for _, p in got_crowns] == [p["tree_id"] for _, p in got_points] == list(range(1, 117))
    by_point = lambda rows: sorted(rows, key=lambda row: (round(row[0].y, 3), round(row[0].x, 3)))  # noqa: E731
    crown_of = {p["tree_id"]: g for g, p in got_crowns}
    want_crown_of = {p["tree_id"]: g for g, p in crowns.rows}
    fields = lambda p: {k: v for k, v in p.items() if k != "tree_id"}  # noqa: E731  (numbered in another order)
    for (pt, p), (want_pt, want) in zip(by_point(got_points), by_point(points.rows)):
        assert pt.distance(want_pt) < 1e-6 and fields(p) == fields(want)
        assert crown_of[p["tree_id"]].symmetric_difference(want_crown_of[want["tree_id"]]).area < 1e-6

    got_missing = sorted((round(g.x, 3), round(g.y, 3)) for g, _ in read_layer(out, "missing_trees"))
    assert got_missing == sorted((round(g.x, 3), round(g.y, 3)) for g, _ in orchard.layers[0].rows)
    (block, props), = read_layer(out, "orchard_blocks")
    (want_block, want_props), = orchard.layers[1].rows
    assert props == pytest.approx(want_props) and block.symmetric_difference(want_block).area < 1e-6
