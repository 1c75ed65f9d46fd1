"""Issue 17's speed-ups keep the results: larger tiles (the same crowns at their seams as one
tile over the whole image), the trees' pipeline (the same crowns whatever rows of tiles an AOI
skips), int8 where `quantize --dataset` found it holds the accuracy, fp32 on request."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import rasterio
import shapely
from shapely.geometry import box

from landcover_plugin.engine.cli import main
from landcover_plugin.engine.imagery.aoi import AOI
from landcover_plugin.engine.learn.model_package import INT8_ONNX_NAME, onnx_path, read_info
from landcover_plugin.engine.learn.tile_size import free_spatial_dims, resized_model
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset
from landcover_plugin.engine.stages.predict import PredictParams, predict

from test_predict import json_reporter, tree_scene, trees_model, write_raster
from test_trees import read_layer

TREES_BASE = onnx_path("trees-base")


def session(model_bytes: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def test_the_shipped_model_runs_larger_tiles_with_the_same_output():
    freed = resized_model(TREES_BASE, 128, 256, 3, session)
    assert freed is not None
    x = np.random.default_rng(2).standard_normal((1, 3, 256, 256)).astype(np.float32)
    out = session(freed).run(None, {"input": x})[0]
    assert out.shape == (1, 2, 256, 256)
    # its original's output on the middle 128 px, away from the larger tile's borders (context)
    middle = session(TREES_BASE.read_bytes()).run(None, {"input": x[:, :, 64:192, 64:192]})[0]
    np.testing.assert_allclose(out[:, :, 96:160, 96:160], middle[:, :, 32:96, 32:96], atol=0.02)


def test_a_model_whose_graph_ties_its_tile_size_keeps_it(tmp_path):
    """A Reshape that flattens the tile cannot be freed: the model runs its own tiles."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "flat"], ["f"]), helper.make_node("Reshape", ["f", "back"], ["output"])],
        "tied", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, 64, 64])],
        initializer=[numpy_helper.from_array(np.array([-1, 64 * 64], np.int64), "flat"),
                     numpy_helper.from_array(np.array([-1, 1, 64, 64], np.int64), "back")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tied.onnx"
    onnx.save(model, str(path))
    assert free_spatial_dims(path.read_bytes(), 64) is not None  # the shapes are freed ...
    assert resized_model(path, 64, 128, 1, session) is None  # ... but the tiles no longer come out right


def crowns(gpkg) -> list:
    return [g for g, _ in read_layer(gpkg, "crowns")]


def best_iou(crown, found: list) -> float:
    return max((g.intersection(crown).area / g.union(crown).area for g in found if g.intersects(crown)), default=0.0)


def test_crowns_across_tile_seams_are_neither_cut_nor_doubled(osbs_tif, tmp_path):
    """256 px tiles (cores of 224 px: seams at 224 px) against one tile over the whole 400 px
    image: each crown across a seam has one counterpart, and they agree better with it than
    the model's own 128 px tiles (their many seams see 16 px of context) do."""
    outs = {tile: tmp_path / f"{tile}.gpkg" for tile in (432, 256, 128)}
    tiles = {tile: predict(PredictParams(model="trees-base", imagery=osbs_tif, out=out, tile_size=tile,
                                         precision="fp32"), json_reporter()).summary["tiles"]
             for tile, out in outs.items()}
    assert tiles == {432: 1, 256: 4, 128: 25}
    with rasterio.open(osbs_tif) as src:
        x, y = src.transform * (224, 224)
        seams = [shapely.LineString([(x, src.bounds.bottom), (x, src.bounds.top)]),
                 shapely.LineString([(src.bounds.left, y), (src.bounds.right, y)])]
    whole, found = crowns(outs[432]), crowns(outs[256])
    across = [c for c in whole if any(c.intersects(s) for s in seams)]
    assert len(across) >= 5
    for crown in across:  # not cut in two, not doubled
        assert len([g for g in found if g.intersection(crown).area > 0.1 * crown.area]) == 1
    assert np.mean([best_iou(c, found) for c in across]) > 0.85
    assert abs(len(found) - len(whole)) <= 1
    agreement = {tile: np.mean([best_iou(c, crowns(outs[tile])) for c in whole]) for tile in (256, 128)}
    assert agreement[256] > agreement[128]


def test_trees_stream_past_rows_of_tiles_that_an_aoi_skips(tmp_path):
    """An AOI of two bands with a gap of several rows of tiles between them: the blocks that
    straddle the gap get no-data rows, the same crowns as in one block."""
    from rasterio.transform import from_origin

    transform = from_origin(400000, 3300000, 0.1, 0.1)
    raster = write_raster(tmp_path / "scene.tif", tree_scene(), transform)
    model = trees_model(tmp_path / "t.onnx")
    x0, y0, x1, y1 = 400000, 3300000 - 32, 400032, 3300000
    aoi = AOI(box(x0, y1 - 9, x1, y1).union(box(x0, y0, x1, y0 + 10)), "EPSG:32617")
    one, blocks = tmp_path / "one.gpkg", tmp_path / "blocks.gpkg"
    predict(PredictParams(model=model, imagery=raster, out=one, aoi=aoi), json_reporter())
    predict(PredictParams(model=model, imagery=raster, out=blocks, aoi=aoi, block_size=48), json_reporter())
    key = lambda rows: sorted((round(g.centroid.x, 2), round(g.centroid.y, 2), p["area_m2"]) for g, p in rows)  # noqa: E731
    a = read_layer(one, "crowns")
    assert len(a) >= 2 and key(a) == key(read_layer(blocks, "crowns"))


def cli(*args) -> tuple[int, list[dict]]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--json", *map(str, args)])
    return code, [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def validation(osbs_tif, osbs_csv, tmp_path_factory):
    """A trees dataset of the orthophoto (its val chips: the model's check) and a copy of trees-base."""
    tmp = tmp_path_factory.mktemp("int8")
    build_dataset(DatasetParams(imagery=osbs_tif, labels=osbs_csv, task="trees", out=tmp / "ds", chip_size=128),
            json_reporter())
    model = tmp / "trees"
    shutil.copytree(TREES_BASE.parent, model, ignore=shutil.ignore_patterns(INT8_ONNX_NAME))
    return tmp / "ds", model


def test_int8_runs_by_default_only_where_it_holds_the_accuracy(validation, osbs_tif, tmp_path):
    ds, model = validation
    code, events = cli("predict", "--model", model, "--imagery", osbs_tif, "--out", tmp_path / "a.gpkg",
                       "--precision", "int8")
    assert code == 2 and events[-1]["code"] == "NO_INT8_MODEL"
    code, events = cli("quantize", "--model", model, "--imagery", osbs_tif, "--dataset", ds,
                       "--out", model / INT8_ONNX_NAME)
    assert code == 0, events[-1]
    s = events[-1]["summary"]
    assert s["int8_accuracy_holds"] == float(s["int8_crown_f1"] >= s["fp32_crown_f1"] - 0.01)
    assert read_info(model / INT8_ONNX_NAME).metrics["int8_accuracy_holds"] == s["int8_accuracy_holds"]
    proto = onnx.load(str(model / INT8_ONNX_NAME))
    scales = [i for i in proto.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1]
    assert scales, "weights quantized per output channel"

    def runs_int8(*extra) -> bool:
        code, events = cli("predict", "--model", model, "--imagery", osbs_tif, "--out", tmp_path / "p.gpkg", *extra)
        assert code == 0, events[-1]
        return any("int8 model" in e.get("message", "") for e in events if e["event"] == "log")

    assert runs_int8() == bool(s["int8_accuracy_holds"])
    assert not runs_int8("--precision", "fp32")
    assert runs_int8("--precision", "int8")
