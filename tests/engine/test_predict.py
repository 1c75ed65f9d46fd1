"""predict: onnxruntime over tiles, no seams, AOI masks, bad input; real ONNX models built with onnx.helper."""
from __future__ import annotations

import io
import json
import math

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import Point, Polygon, box, shape

from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.imagery.aoi import AOI, reproject_geometry
from landcover_plugin.engine.learn.inference import aoi_window, open_session, predict_to_raster, tile_origins
from landcover_plugin.engine.learn.model_package import ModelInfo, write_metadata
from landcover_plugin.engine.stages.predict import PredictParams, predict

PIXEL = 0.1  # metres, the tree scenes' resolution


def conv_model(path, weights: np.ndarray, bias: np.ndarray, info: ModelInfo, softmax: bool = False):
    """A one-Conv ONNX model (kernel k, 'same' padding) with fixed weights, plus our metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c_out, c_in, k, _ = weights.shape
    nodes = [helper.make_node("Conv", ["input", "W", "B"], ["conv"], kernel_shape=[k, k], pads=[k // 2] * 4),
             helper.make_node("Softmax", ["conv"], ["output"], axis=1) if softmax
             else helper.make_node("Identity", ["conv"], ["output"])]
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c_in, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", c_out, "H", "W"])],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "W"),
                     numpy_helper.from_array(bias.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime reads everywhere
    onnx.save(model, str(path))
    write_metadata(path, info)
    return path


def write_raster(path, data: np.ndarray, transform, crs="EPSG:32617", nodata=None):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


def events(reporter: Reporter) -> list[dict]:
    return [json.loads(line) for line in reporter.out.getvalue().splitlines()]


def json_reporter() -> Reporter:
    return Reporter(json_mode=True, out=io.StringIO())


def landcover_info(**kw) -> ModelInfo:
    base = dict(task="landcover", class_names=["a", "b", "c"], class_colors=["#ff0000", "#00ff00", "#0000ff"],
                band_count=3, resolution_m=1.0, tile_size=64, tile_overlap=8, input_scale=1.0,
                mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    return ModelInfo(**(base | kw))


def box_sum_model(path, info: ModelInfo):
    """Class k scores = 3x3 neighbourhood sum of band k: needs context, so bad tiling shows."""
    weights = np.zeros((3, 3, 3, 3))
    for k in range(3):
        weights[k, k] = 1.0
    return conv_model(path, weights, np.zeros(3), info, softmax=True)


def box_sum_classes(image: np.ndarray) -> np.ndarray:
    """The same function over the whole image at once (zero padding, as the Conv)."""
    padded = np.pad(image.astype(np.int64), ((0, 0), (1, 1), (1, 1)))
    h, w = image.shape[1:]
    sums = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return np.argmax(sums, axis=0)


@pytest.fixture(scope="module")
def seam_case(tmp_path_factory):
    """A 230x310 px, 3-band integer image (35 tiles of 64 px) and the box-sum model."""
    tmp = tmp_path_factory.mktemp("seams")
    image = np.random.default_rng(0).integers(0, 10, (3, 230, 310)).astype(np.uint8)
    raster = write_raster(tmp / "img.tif", image, from_origin(400000, 3300000, 1.0, 1.0))
    model = box_sum_model(tmp / "model.onnx", landcover_info())
    return image, raster, model


def test_tile_cores_cover_each_pixel_once():
    for length in (1, 47, 48, 49, 230):
        covered = np.zeros(length, int)
        for start in tile_origins(length, 64, 8):
            covered[max(start + 8, 0):start + 56] += 1
        assert (covered == 1).all()


def test_tiles_are_seam_free(seam_case, tmp_path):
    image, raster, model = seam_case
    reporter = json_reporter()
    info = landcover_info()
    session, provider = open_session(model, reporter)
    with rasterio.open(raster) as src:
        window, aoi = aoi_window(src, None)
        tiles = predict_to_raster(session, src, info, window, aoi, tmp_path / "pred.tif", reporter, batch_size=3)
    with rasterio.open(tmp_path / "pred.tif") as pred:
        values = pred.read()
        assert pred.transform == from_origin(400000, 3300000, 1.0, 1.0) and pred.crs.to_epsg() == 32617
    assert tiles == 5 * 7
    assert (values != 255).all()
    expected = box_sum_classes(image)
    assert len(np.unique(expected)) == 3
    np.testing.assert_array_equal(values[0], expected)
    progress = [e for e in events(reporter) if e["event"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 35
    assert provider == "CPUExecutionProvider"


def test_landcover_gpkg_with_nodata(seam_case, tmp_path):
    image, _, model = seam_case
    image = image.copy()
    image[:, 100:140, 150:200] = 255  # a nodata block
    raster = write_raster(tmp_path / "img.tif", image, from_origin(400000, 3300000, 1.0, 1.0), nodata=255)
    out = tmp_path / "out" / "landcover.gpkg"
    reporter = json_reporter()
    result = predict(PredictParams(model=model, imagery=raster, out=out), reporter)

    assert result.outputs == {"gpkg": str(out)}
    assert sorted(p.name for p in out.parent.iterdir()) == ["landcover.gpkg"]  # no partial file left
    assert set(fiona.listlayers(out)) >= {"landcover", "class_stats"}
    summary = result.summary
    assert summary["provider"] == "CPUExecutionProvider" and summary["tiles"] == 35
    predicted_ha = (230 * 310 - 40 * 50) / 1e4  # 1 m pixels outside the nodata block
    assert sum(summary["hectares"].values()) == pytest.approx(predicted_ha, rel=1e-6)
    with fiona.open(out, layer="class_stats") as stats:
        rows = [f["properties"] for f in stats]
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert sum(r["hectares"] for r in rows) == pytest.approx(predicted_ha, rel=1e-6)
    assert sum(r["share_pct"] for r in rows) == pytest.approx(100.0, abs=0.01)
    with fiona.open(out, layer="landcover") as layer:
        assert layer.crs.to_epsg() == 32617
        feats = [(shape(f["geometry"]), f["properties"]) for f in layer]
    assert len(feats) == summary["polygons"] > 100
    assert all(g.is_valid for g, _ in feats)
    assert {p["class"] for _, p in feats} == {"a", "b", "c"}
    hole_centre = Point(400000 + 175, 3300000 - 120)
    assert not any(g.contains(hole_centre) for g, _ in feats)
    # the polygons tile the predicted area (sieving merges specks, it does not drop them)
    assert sum(p["area_m2"] for _, p in feats) == pytest.approx(predicted_ha * 1e4, rel=1e-3)


# --- trees -----------------------------------------------------------------

# (row px, col px, radius m, has a centre peak); 0.1 m pixels
TREES = [(60, 60, 1.5, True), (60, 200, 2.0, True), (220, 80, 1.0, True),
         (220, 200, 1.5, True), (220, 227, 1.5, True),  # two overlapping crowns, centres 2.7 m apart
         (285, 280, 0.8, False),  # no heatmap peak: still one tree
         (295, 20, 0.3, True)]  # 0.28 m²: below the minimum crown area


def tree_scene(size: int = 320) -> np.ndarray:
    """Band 1: crown probability (0.9 in disks), band 2: gaussian centre heatmap."""
    yy, xx = np.mgrid[:size, :size]
    crown = np.zeros((size, size), np.float32)
    heat = np.zeros((size, size), np.float32)
    for r, c, radius, peak in TREES:
        d2 = (yy - r) ** 2 + (xx - c) ** 2
        crown[d2 <= (radius / PIXEL) ** 2] = 0.9
        if peak:
            heat = np.maximum(heat, np.exp(-d2 / (2 * (radius / PIXEL / 2) ** 2)))
    return np.stack([crown, heat])


def trees_model(path):
    info = ModelInfo(task="trees", class_names=["crown"], class_colors=["#33a02c"], band_count=2,
                     resolution_m=PIXEL, tile_size=64, tile_overlap=8, input_scale=1.0,
                     mean=[0.0, 0.0], std=[1.0, 1.0], threshold=0.5)
    return conv_model(path, np.eye(2).reshape(2, 2, 1, 1), np.zeros(2), info)  # passthrough


def check_trees(out, transform) -> None:
    with fiona.open(out, layer="crowns") as layer:
        crowns = [(shape(f["geometry"]), f["properties"]) for f in layer]
    with fiona.open(out, layer="trees") as layer:
        points = [(shape(f["geometry"]), f["properties"]) for f in layer]
    assert len(crowns) == len(points) == 6
    expected = {(r, c): math.pi * radius ** 2 for r, c, radius, _ in TREES[:6]}
    for (r, c), area in expected.items():
        x, y = transform @ (c + 0.5, r + 0.5)
        hits = [p for g, p in crowns if g.contains(Point(x, y))]
        assert len(hits) == 1, (r, c)  # the touching pair is split: each centre in its own crown
        assert hits[0]["area_m2"] == pytest.approx(area, rel=0.1)
        assert hits[0]["diameter_m"] == pytest.approx(2 * math.sqrt(hits[0]["area_m2"] / math.pi), rel=1e-3)
        assert hits[0]["confidence"] == pytest.approx(0.9, abs=1e-4)
    for (g, p), (pt, q) in zip(crowns, points):
        assert p == q and g.contains(pt)


def test_trees_scene(tmp_path):
    transform = from_origin(400000, 3300000, PIXEL, PIXEL)
    raster = write_raster(tmp_path / "scene.tif", tree_scene(), transform)
    out = tmp_path / "trees.gpkg"
    reporter = json_reporter()
    result = predict(PredictParams(model=trees_model(tmp_path / "trees.onnx"), imagery=raster, out=out), reporter)
    check_trees(out, transform)
    assert result.summary["crowns"] == 6
    expected_canopy = sum(math.pi * radius ** 2 for _, _, radius, _ in TREES[:6])
    assert result.summary["canopy_m2"] == pytest.approx(expected_canopy, rel=0.05)
    assert not [e for e in events(reporter) if e.get("level") == "warning"]  # resolution matches
    # seeded trees' points sit at their centres
    with fiona.open(out, layer="trees") as layer:
        pts = [shape(f["geometry"]) for f in layer]
    for r, c, _, peak in TREES[:5]:
        centre = Point(transform @ (c + 0.5, r + 0.5))
        assert min(p.distance(centre) for p in pts) < 0.15


def test_trees_in_geographic_crs_measure_m2(tmp_path):
    lat = 45.0
    dx, dy = PIXEL / (111_320 * math.cos(math.radians(lat))), PIXEL / 111_132
    transform = from_origin(-80.0, lat, dx, dy)
    raster = write_raster(tmp_path / "scene.tif", tree_scene(), transform, crs="EPSG:4326")
    out = tmp_path / "trees.gpkg"
    result = predict(PredictParams(model=trees_model(tmp_path / "trees.onnx"), imagery=raster, out=out),
                     json_reporter())
    assert result.summary["crowns"] == 6
    check_trees(out, transform)
    with fiona.open(out, layer="crowns") as layer:
        assert layer.crs.to_epsg() == 4326


def test_blank_image_yields_no_trees(tmp_path):
    raster = write_raster(tmp_path / "blank.tif", np.zeros((2, 100, 100), np.float32),
                          from_origin(400000, 3300000, PIXEL, PIXEL))
    out = tmp_path / "trees.gpkg"
    result = predict(PredictParams(model=trees_model(tmp_path / "t.onnx"), imagery=raster, out=out), json_reporter())
    assert result.summary["crowns"] == 0 and result.summary["canopy_m2"] == 0
    for name in ("crowns", "trees"):
        with fiona.open(out, layer=name) as layer:
            assert len(layer) == 0


# --- AOI and bad input -------------------------------------------------------

def constant_model(path, band_count: int = 3, **kw):
    """Always class 1 ("forest")."""
    info = landcover_info(class_names=["other", "forest"], class_colors=["#cccccc", "#1b7837"],
                          band_count=band_count, mean=[0.0] * band_count, std=[1.0] * band_count, **kw)
    return conv_model(path, np.zeros((2, band_count, 1, 1)), np.array([0.0, 1.0]), info, softmax=True)


@pytest.fixture()
def constant_raster(tmp_path):
    """200x200 px at 1 m in EPSG:32617, origin (400000, 3300000)."""
    return write_raster(tmp_path / "img.tif", np.full((3, 200, 200), 100, np.uint8),
                        from_origin(400000, 3300000, 1.0, 1.0))


def test_aoi_polygon_with_hole_masks_the_hole(tmp_path, constant_raster):
    x0, y1 = 400000, 3300000
    ring = box(x0 + 20, y1 - 180, x0 + 180, y1 - 20).exterior
    hole = box(x0 + 80, y1 - 120, x0 + 120, y1 - 80).exterior
    aoi_utm = Polygon(ring, [hole])
    aoi = AOI(reproject_geometry(aoi_utm, "EPSG:32617", "EPSG:4326"), "EPSG:4326")  # given in WGS84
    out = tmp_path / "lc.gpkg"
    result = predict(PredictParams(model=constant_model(tmp_path / "m.onnx"), imagery=constant_raster,
                                   out=out, aoi=aoi), json_reporter())
    assert result.summary["hectares"]["other"] == 0
    assert result.summary["hectares"]["forest"] == pytest.approx(aoi_utm.area / 1e4, rel=0.02)
    with fiona.open(out, layer="landcover") as layer:
        geoms = [shape(f["geometry"]) for f in layer]
    assert len(geoms) == 1
    assert not geoms[0].contains(Point(x0 + 100, y1 - 100))  # the hole
    assert geoms[0].contains(Point(x0 + 50, y1 - 50))
    assert not geoms[0].contains(Point(x0 + 10, y1 - 10))  # outside the AOI, inside the imagery


def test_aoi_outside_imagery(tmp_path, constant_raster):
    out = tmp_path / "lc.gpkg"
    with pytest.raises(EngineError) as err:
        predict(PredictParams(model=constant_model(tmp_path / "m.onnx"), imagery=constant_raster, out=out,
                              aoi=AOI(box(10.0, 50.0, 10.01, 50.01))), json_reporter())
    assert err.value.code == "AOI_OUTSIDE_IMAGERY"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "m.onnx"]


def test_too_few_bands(tmp_path, constant_raster):
    with pytest.raises(EngineError) as err:
        predict(PredictParams(model=constant_model(tmp_path / "m.onnx", band_count=4), imagery=constant_raster,
                              out=tmp_path / "lc.gpkg"), json_reporter())
    assert err.value.code == "BAD_IMAGERY_BANDS"
    assert "4 bands" in err.value.message and "has 3" in err.value.message
    assert not (tmp_path / "lc.gpkg").exists()


def test_resolution_mismatch_warns(tmp_path, constant_raster):
    reporter = json_reporter()
    predict(PredictParams(model=constant_model(tmp_path / "m.onnx", resolution_m=0.3), imagery=constant_raster,
                          out=tmp_path / "lc.gpkg"), reporter)
    warnings = [e["message"] for e in events(reporter) if e.get("level") == "warning"]
    assert len(warnings) == 1 and "1 m" in warnings[0] and "0.3 m" in warnings[0]
    assert any("CPUExecutionProvider" in e.get("message", "") for e in events(reporter))


def test_output_channels_must_match_the_classes(tmp_path, constant_raster):
    model = box_sum_model(tmp_path / "m.onnx", landcover_info(class_names=["a", "b"], class_colors=[]))
    with pytest.raises(EngineError) as err:
        predict(PredictParams(model=model, imagery=constant_raster, out=tmp_path / "lc.gpkg"), json_reporter())
    assert err.value.code == "BAD_MODEL" and "(n, 2, 64, 64)" in err.value.message


def test_a_deepness_model_runs_unchanged(tmp_path, constant_raster):
    """A model from outside the project: only Deepness's metadata keys, its normalisation
    (raw / 255, then mean/std), its class names; no `landcover.*` keys."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # class 1 ("forest") where normalised band 1 > 0: x = (100/255 - 0.2) / 0.5 = 0.38
    weights = np.zeros((2, 3, 1, 1), np.float32)
    weights[1, 0] = 10.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["logits"], kernel_shape=[1, 1]),
         helper.make_node("Softmax", ["logits"], ["y"], axis=1)], "deepness",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 128, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 128, 128])],
        initializer=[numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {"model_type": "Segmentor", "class_names": {0: "water", 1: "forest"},  # as Deepness's tool
                       "resolution": 100, "tiles_size": 128, "tiles_overlap": 25,  # writes them: json.dumps
                       "standardization_mean": [0.2, 0.2, 0.2], "standardization_std": [0.5, 0.5, 0.5]}.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    path = tmp_path / "deepness.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "lc.gpkg"
    reporter = json_reporter()
    result = predict(PredictParams(model=path, imagery=constant_raster, out=out), reporter)
    assert result.summary["hectares"] == {"water": 0.0, "forest": pytest.approx(4.0)}
    assert not [e for e in events(reporter) if e.get("level") == "warning"]  # 1 m model on 1 m imagery
    with fiona.open(out, layer="landcover") as layer:
        assert [f["properties"]["class"] for f in layer] == ["forest"]


def test_buildings_layer(tmp_path, constant_raster):
    """A buildings model: its non-background polygons go to layer `buildings`, styled."""
    import sqlite3

    info = landcover_info(task="buildings", class_names=["background", "building"], class_colors=[])
    model = conv_model(tmp_path / "b.onnx", np.zeros((2, 3, 1, 1)), np.array([0.0, 1.0]), info, softmax=True)
    out = tmp_path / "b.gpkg"
    result = predict(PredictParams(model=model, imagery=constant_raster, out=out), json_reporter())
    assert result.summary["buildings"] == 1
    assert set(fiona.listlayers(out)) == {"buildings", "class_stats", "layer_styles"}
    with sqlite3.connect(out) as db:
        styled = {r[0] for r in db.execute("SELECT f_table_name FROM layer_styles")}
    assert styled == {"buildings"}


def landcover_cli(*args) -> tuple[int, list[dict]]:
    """The real `landcover --json` command; its exit code and events."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "landcover_plugin.engine", "--json", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def rescaled_copy(src_path, out, dtype: str, factor: float):
    """The same image in another data type and value range (nodata mapped along)."""
    with rasterio.open(src_path) as src:
        data, nodata = src.read().astype(np.float64) * factor, src.nodata * factor
        with rasterio.open(out, "w", **(src.profile | {"dtype": dtype, "nodata": nodata})) as dst:
            dst.write(data.astype(dtype))
    return out


def test_the_same_image_in_another_value_range_gives_the_same_crowns_or_a_clear_refusal(osbs_tif, tmp_path):
    """The shipped model reads 0..255: float 0..1 is rescaled (and said so), 16-bit is refused
    with a conversion hint. Before, the same image gave 33 crowns as uint8, 0 as float and uint16."""
    code, events_8bit = landcover_cli("predict", "--model", "trees-base", "--imagery", osbs_tif,
                                      "--out", tmp_path / "u8.gpkg")
    assert code == 0, events_8bit[-1]
    crowns = events_8bit[-1]["summary"]["crowns"]
    assert crowns > 20

    unit = rescaled_copy(osbs_tif, tmp_path / "unit.tif", "float32", 1 / 255)
    code, events_unit = landcover_cli("predict", "--model", "trees-base", "--imagery", unit,
                                      "--out", tmp_path / "unit.gpkg")
    assert code == 0, events_unit[-1]
    assert events_unit[-1]["summary"]["crowns"] == pytest.approx(crowns, abs=2)
    assert any("multiplied by 255" in e.get("message", "") for e in events_unit)

    wide = rescaled_copy(osbs_tif, tmp_path / "u16.tif", "uint16", 257)
    code, events_wide = landcover_cli("predict", "--model", "trees-base", "--imagery", wide,
                                      "--out", tmp_path / "u16.gpkg")
    assert code == 2, events_wide[-1]
    assert events_wide[-1]["code"] == "IMAGERY_RANGE" and "gdal_translate" in events_wide[-1]["hint"]
    assert not (tmp_path / "u16.gpkg").exists()


@pytest.mark.parametrize("dtype, top, scale, factor", [
    ("uint8", 255, 255.0, 1.0),
    ("uint16", 200, 255.0, 1.0),  # 8-bit values in a 16-bit file
    ("float32", 254, 255.0, 1.0),
    ("float32", 1.0, 255.0, 255.0),  # reflectance-like 0..1 for a model of 8-bit imagery
    ("uint8", 255, 1.0, 1 / 255),  # 8-bit imagery for a model of 0..1 floats
    ("float32", 0.9, 0.8, 1.0),
    ("uint16", 9000, 4000.0, 1.0),  # the same kind of values: a warning at most
    ("float32", float("nan"), 255.0, 1.0),  # no valid pixel sampled
])
def test_input_factor(dtype, top, scale, factor):
    from landcover_plugin.engine.learn.inference import input_factor

    assert input_factor(dtype, top, scale) == pytest.approx(factor)


@pytest.mark.parametrize("dtype, top, scale", [
    ("uint16", 65535, 255.0), ("uint16", 4095, 1.0), ("uint8", 255, 4000.0), ("float32", 1.0, 4000.0),
    ("float32", 0.5, 200.0)])
def test_input_factor_refuses_what_is_ambiguous(dtype, top, scale):
    from landcover_plugin.engine.learn.inference import input_factor

    with pytest.raises(EngineError) as err:
        input_factor(dtype, top, scale)
    assert err.value.code == "IMAGERY_RANGE" and err.value.hint
