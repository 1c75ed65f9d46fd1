"""Models shared with Deepness and GeoDeep, both ways, checked against GeoDeep's own code
(the `geodeep` package from PyPI) and against Deepness's model loading (its rules,
from src/deepness/processing/models/model_base.py and segmentor.py, restated in
`deepness_reads`): ours run in theirs, theirs (built in the formats their tools write)
run in `landcover predict`, and both readings agree."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import rasterio
from onnx import TensorProto, helper, numpy_helper
from rasterio.transform import from_origin

from landcover_plugin.engine.learn.model_package import ModelInfo, onnx_path, read_info, write_metadata
from landcover_plugin.engine.learn.peer_export import write_peer_model

geodeep = pytest.importorskip("geodeep")

DEEPNESS_MODEL_TYPES = ("Segmentor", "Regressor", "Detector", "Superresolution", "Recognition")


def deepness_reads(path) -> dict:
    """What Deepness 0.6.5 takes from a model when it loads it (its ModelBase and Segmentor):
    every value json.loads'ed (class_names may also be a Python literal), the model type
    capitalised and one of its ModelType values, class ids consecutive, the tile size from
    the input shape, one name per output channel (one sigmoid channel: [background, name])."""
    import ast

    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    got = {k: json.loads(meta[k]) for k in meta if k not in ("class_names",) and not k.startswith("landcover.")}
    try:
        names = json.loads(meta["class_names"])
    except json.JSONDecodeError:
        names = ast.literal_eval(meta["class_names"])
    names = names[0] if isinstance(names, list) else names
    ids = sorted(names, key=int)
    assert [int(k) for k in ids] == list(range(len(ids))), "Deepness: class ids not consecutive"
    got["class_names"] = [names[k] for k in ids]
    got["model_type"] = str(got["model_type"]).capitalize()
    assert got["model_type"] in DEEPNESS_MODEL_TYPES, f"Deepness: unknown model type {got['model_type']}"
    shape_in, shape_out = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    got["tile"] = shape_in[-1]
    assert isinstance(got["tile"], int), "Deepness sets its tile size from the input shape"
    channels = 2 if shape_out[-3] == 1 else shape_out[-3]
    names_out = ["background", *got["class_names"]] if shape_out[-3] == 1 and len(got["class_names"]) == 1 \
        else got["class_names"]
    assert len(names_out) == channels, f"Deepness: {len(names_out)} class names for {channels} channels"
    got["overlap_px"] = int(got["tile"] * int(got["tiles_overlap"]) / 100 * 2) // 2  # its ProcessingOverlap
    return got


def write_rgb(path, data: np.ndarray, pixel: float, crs="EPSG:32617"):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3,
                       dtype="uint8", crs=crs, transform=from_origin(400000, 3300000, pixel, pixel), tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        dst.write(data)
    return path


def save(graph, path, metadata: dict[str, str]):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def landcover_cli(*args) -> tuple[int, list[dict]]:
    proc = subprocess.run([sys.executable, "-m", "landcover_plugin.engine", "--json", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def our_classes(model, imagery, tmp_path) -> np.ndarray:
    """Our prediction raster's first band (class index, or crown probability x 250) over the whole image."""
    import io

    from landcover_plugin.engine.events import Reporter
    from landcover_plugin.engine.learn.inference import aoi_window, fit_input_scale, open_session, predict_to_raster

    reporter = Reporter(json_mode=True, out=io.StringIO())
    info = read_info(model)
    session, _ = open_session(onnx_path(model), reporter)
    with rasterio.open(imagery) as src:
        info = fit_input_scale(src, info, reporter)
        window, aoi = aoi_window(src, None)
        predict_to_raster(session, src, info, window, aoi, tmp_path / "pred.tif", reporter)
    with rasterio.open(tmp_path / "pred.tif") as ds:
        return ds.read(1)


# --- ours in theirs -------------------------------------------------------------------------

def test_the_shipped_trees_model_runs_in_geodeep_and_deepness_with_our_crowns(osbs_tif, tmp_path):
    """model-peers.onnx of trees-base: a crown/background Segmentor both tools load; GeoDeep's
    crowns on OSBS_029 are ours (before the issue: one crown over the whole image)."""
    info = read_info("trees-base")
    peers = onnx_path("trees-base").parent / "model-peers.onnx"
    deepness = deepness_reads(peers)
    assert deepness["model_type"] == "Segmentor" and deepness["class_names"] == ["background", "crown"]
    assert deepness["tile"] == info.tile_size and deepness["overlap_px"] == 2 * info.tile_overlap
    assert deepness["standardization_mean"] == [0.0] * 3 and deepness["seg_thresh"] == info.threshold
    assert deepness_reads(onnx_path("trees-base"))["model_type"] == "Regressor"  # model.onnx: its probability maps

    theirs = geodeep.run(str(osbs_tif), str(peers), output_type="raw") == 1
    ours = our_classes("trees-base", osbs_tif, tmp_path)
    valid = ours != 255
    ours = (ours >= round(info.threshold * 250)) & valid
    assert 0.2 < theirs[valid].mean() < 0.6  # crowns, not the whole image
    assert (ours == theirs)[valid].mean() > 0.9
    assert theirs[valid].sum() == pytest.approx(ours.sum(), rel=0.15)


def landcover_model(path, tile=64, overlap=8, mean=(0.5, 0.55, 0.45), std=(0.2, 0.2, 0.15)):
    """A softmax land-cover model (a 7 px mean, then a 1x1 conv: a smooth map, as a U-Net's)
    with our metadata and our (non-trivial) standardisation."""
    rng = np.random.default_rng(7)
    weights, bias = rng.normal(0, 1, (3, 3, 1, 1)).astype(np.float32), np.zeros(3, np.float32)
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["input"], ["mean"], kernel_shape=[7, 7], pads=[3] * 4),
         helper.make_node("Conv", ["mean", "W", "B"], ["logits"], kernel_shape=[1, 1]),
         helper.make_node("Softmax", ["logits"], ["output"], axis=1)], "ours",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, tile, tile])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, tile, tile])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")])
    save(graph, path, {})
    info = ModelInfo(task="landcover", class_names=["forested", "water", "developed"], class_colors=[],
                     band_count=3, resolution_m=0.1, tile_size=tile, tile_overlap=overlap, mean=list(mean),
                     std=list(std))
    write_metadata(path, info)
    return info


def test_a_land_cover_export_runs_in_geodeep_and_deepness_with_our_map(osbs_tif, tmp_path):
    """Our standardisation goes into the peers' graph (GeoDeep ignores standardization_*),
    seg_thresh 0 keeps the argmax, tiles_overlap is the percent both tools split tiles by."""
    info = landcover_model(tmp_path / "model.onnx")
    peers = write_peer_model(tmp_path / "model.onnx", info, tmp_path)
    deepness = deepness_reads(peers)
    assert deepness["class_names"] == info.class_names and deepness["seg_thresh"] == 0
    assert deepness["overlap_px"] == 2 * info.tile_overlap  # 16 px of 64: 25 %
    assert deepness_reads(tmp_path / "model.onnx")["model_type"] == "Segmentor"  # model.onnx loads in Deepness too

    from rasterio.features import sieve
    from scipy.ndimage import median_filter

    assert deepness["seg_small_segment"] == 1  # GeoDeep's sieve (2 px)² = our 4 px
    ours = our_classes(tmp_path / "model.onnx", osbs_tif, tmp_path)
    theirs = geodeep.run(str(osbs_tif), str(peers), output_type="raw")
    valid = ours != 255
    ours = sieve(median_filter(ours, 5), 4)  # ours sieved, after GeoDeep's own 5 px median (no metadata turns it off)
    assert (ours == theirs)[valid].mean() > 0.97
    for k in range(3):
        assert (theirs[valid] == k).mean() == pytest.approx((ours[valid] == k).mean(), abs=0.01)
    assert read_info(peers).class_names == info.class_names  # and ours reads it back


def test_a_classification_model_gets_no_peer_export(tmp_path):
    info = ModelInfo(task="classification", class_names=["a", "b"], class_colors=[], band_count=3,
                     resolution_m=10, tile_size=32, tile_overlap=0)
    assert write_peer_model(tmp_path / "none.onnx", info, tmp_path) is None


# --- theirs in ours -------------------------------------------------------------------------

CELL = 16  # the test detector's grid: one candidate box per 16 x 16 cell


def yolo_detector(path, layout: str, det_type: str, tile=256):
    """A YOLO-style detector as GeoDeep's yolo2geodeep leaves it (fixed input 1 x 3 x tile x tile,
    metadata json.dumps'ed, no tiles_size): one 16 px box per grid cell, its confidence the
    cell's mean red. "rows": (1, cells, 6) = x, y, w, h, objectness, class (YOLOv5/v7);
    "columns": (1, 5, cells) = x, y, w, h, class score (YOLOv8/v9, ultralytics)."""
    n = tile // CELL
    centres = (np.arange(n) + 0.5) * CELL
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    xywh = np.stack([cx.ravel(), cy.ravel(), np.full(n * n, CELL), np.full(n * n, CELL)], 1)[None].astype(np.float32)
    nodes = [helper.make_node("Slice", ["images", "c0", "c1", "ax"], ["red"]),
             helper.make_node("AveragePool", ["red"], ["pooled"], kernel_shape=[CELL, CELL], strides=[CELL, CELL]),
             helper.make_node("Reshape", ["pooled", "shape"], ["conf"])]
    parts = ["xywh", "conf", "conf"] if layout == "rows" else ["xywh", "conf"]
    nodes.append(helper.make_node("Concat", parts, ["boxes"], axis=2))
    nodes.append(helper.make_node("Transpose", ["boxes"], ["output0"], perm=[0, 2, 1]) if layout == "columns"
                 else helper.make_node("Identity", ["boxes"], ["output0"]))
    width = 6 if layout == "rows" else 5
    graph = helper.make_graph(
        nodes, "yolo", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, tile, tile])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                       [1, n * n, width] if layout == "rows" else [1, width, n * n])],
        initializer=[numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                     (("c0", [0]), ("c1", [1]), ("ax", [1]), ("shape", [1, n * n, 1]))]
        + [numpy_helper.from_array(xywh, "xywh")])
    # yolo2geodeep's params, json.dumps'ed as it writes them (its defaults: iou 0.3, conf 0.3, overlap 10)
    params = {"model_type": "Detector", "det_iou_thresh": 0.3, "det_type": det_type, "resolution": 10,
              "class_names": {"0": "tree"}, "det_conf": 0.3, "tiles_overlap": 12.5}
    return save(graph, path, {k: json.dumps(v) for k, v in params.items()})


@pytest.fixture(scope="module")
def orchard_image(tmp_path_factory):
    """704 x 704 px at 0.1 m: 40 bright 16 px 'crowns' on the 16 px grid, some across tile borders
    (704: both tools' tiles then start on that grid)."""
    rng = np.random.default_rng(3)
    data = np.full((3, 704, 704), 30, np.uint8)
    cells = rng.choice(44 * 44, 40, replace=False)
    for k in cells:
        r, c = divmod(int(k), 44)
        data[:, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = 255
    return write_rgb(tmp_path_factory.mktemp("orchard") / "orchard.tif", data, 0.1), 40


@pytest.mark.parametrize("layout, det_type", [("rows", "YOLO_v7"), ("rows", "YOLO_v5_or_v7_default"),
                                              ("columns", "YOLO_v8"), ("columns", "YOLO_Ultralytics")])
def test_a_yolo_detector_runs_into_crowns_and_trees_as_geodeep_reads_it(orchard_image, tmp_path, layout, det_type):
    image, planted = orchard_image
    model = yolo_detector(tmp_path / "yolo.onnx", layout, det_type)
    code, events = landcover_cli("predict", "--model", model, "--imagery", image, "--out", tmp_path / "t.gpkg")
    assert code == 0, events[-1]
    import fiona

    with fiona.open(tmp_path / "t.gpkg", layer="crowns") as layer:
        ours = sorted((round(f["properties"]["area_m2"], 2), round(f["properties"]["confidence"], 2)) for f in layer)
    with fiona.open(tmp_path / "t.gpkg", layer="trees") as layer:
        ours_xy = sorted((round(f["geometry"]["coordinates"][0], 1), round(f["geometry"]["coordinates"][1], 1))
                         for f in layer)
    assert len(ours) == events[-1]["summary"]["crowns"] == planted
    assert set(ours) == {(2.56, 1.0)}  # 16 px boxes at 0.1 m, full confidence
    if det_type == "YOLO_Ultralytics":
        return  # GeoDeep's name for it is YOLO_v8
    boxes, scores, classes = geodeep.run(str(image), str(model))
    assert len(boxes) == planted and all(c == (0, "tree") for c in classes)
    with rasterio.open(image) as src:
        theirs_xy = sorted((round(x, 1), round(y, 1)) for x, y in
                           (src.xy((b[1] + b[3]) / 2, (b[0] + b[2]) / 2, offset="ul") for b in boxes))
    assert ours_xy == theirs_xy


def segmentor(path, kind: str, tile: int, metadata: dict[str, str]):
    """A Segmentor in Deepness's documented forms: "sigmoid" (N, 1, H, W) = sigmoid(10 (red - 0.5)),
    "softmax" (N, 2, H, W) = softmax([0, 10 (red - 0.5)]): the same class-1 probability."""
    w = np.zeros((1 if kind == "sigmoid" else 2, 3, 1, 1), np.float32)
    w[-1, 0] = 10.0
    b = np.zeros(len(w), np.float32)
    b[-1] = -5.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["z"], kernel_shape=[1, 1]),
         helper.make_node("Sigmoid", ["z"], ["y"]) if kind == "sigmoid" else
         helper.make_node("Softmax", ["z"], ["y"], axis=1)], kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, tile, tile])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, len(w), tile, tile])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return save(graph, path, metadata)


def deepness_example_metadata(**changes) -> dict[str, str]:
    """tools/add_model_metadata.py of Deepness: its example values, json.dumps'ed as it writes them."""
    values = {"model_type": "Segmentor", "class_names": {0: "not_road", 1: "road"}, "resolution": 21,
              "tiles_size": 512, "tiles_overlap": 15, "seg_thresh": 0.5, "seg_small_segment": 11} | changes
    return {k: json.dumps(v) for k, v in values.items()}


def road_image(path):
    """0.21 m (the example's resolution), 700 x 700 px: bright 'roads' 60 px wide on a dark ground."""
    data = np.full((3, 700, 700), 40, np.uint8)
    data[:, 300:360, :] = 230
    data[:, :, 100:160] = 230
    return write_rgb(path, data, 0.21)


def test_deepness_example_softmax_segmentor_runs_with_the_tile_size_of_its_input(tmp_path):
    """Metadata as Deepness's add_model_metadata.py writes it (tiles_size 512), on a model
    whose input is fixed at 256 x 256 and batch 1: the input shape decides, as in both tools
    (before: INVALID_ARGUMENT ... Got: 512 Expected: 256, reported as a bug)."""
    image = road_image(tmp_path / "roads.tif")
    model = segmentor(tmp_path / "softmax.onnx", "softmax", 256, deepness_example_metadata())
    assert read_info(model).tile_size == 256
    code, events = landcover_cli("predict", "--model", model, "--imagery", image, "--out", tmp_path / "r.gpkg")
    assert code == 0, events[-1]
    road_m2 = (60 * 700 * 2 - 60 * 60) * 0.21 ** 2
    ours = events[-1]["summary"]["hectares"]["road"] * 1e4
    theirs = (geodeep.run(str(image), str(model), output_type="raw") == 1).sum() * 0.21 ** 2
    assert ours == pytest.approx(road_m2, rel=0.01) and theirs == pytest.approx(road_m2, rel=0.01)


@pytest.mark.parametrize("class_names", [
    json.dumps({"0": "background", "1": "vegetation"}),  # as Deepness documents a sigmoid
    json.dumps({0: "vegetation"}),  # one name: Deepness makes it [background, name]
    str({0: "background", 1: "vegetation"}),  # a Python literal: Deepness reads it too
    json.dumps(["background", "vegetation"]),
    json.dumps([{"0": "background", "1": "vegetation"}]),  # one dict per output
])
def test_a_sigmoid_segmentor_is_background_and_its_class_as_geodeep_reads_the_softmax(osbs_tif, tmp_path,
                                                                                   class_names):
    """One sigmoid channel = [background, class]: ours on it agree with GeoDeep on the
    equivalent two-channel softmax (GeoDeep's argmax of one channel is always class 0)."""
    meta = deepness_example_metadata(resolution=10, tiles_overlap=10, seg_small_segment=0)
    sigmoid = segmentor(tmp_path / "sigmoid.onnx", "sigmoid", 128, meta | {"class_names": class_names})
    softmax = segmentor(tmp_path / "softmax.onnx", "softmax", 128,
                        meta | {"class_names": json.dumps({"0": "background", "1": "vegetation"})})
    from scipy.ndimage import median_filter

    assert read_info(sigmoid).class_names == ["background", "vegetation"]
    ours = our_classes(sigmoid, osbs_tif, tmp_path)
    theirs = geodeep.run(str(osbs_tif), str(softmax), output_type="raw")
    valid = ours != 255
    ours = median_filter(ours, 5)  # GeoDeep's own 5 px median
    assert 0.1 < (ours[valid] == 1).mean() < 0.9
    assert (ours == theirs)[valid].mean() > 0.97


@pytest.mark.parametrize("metadata, code", [
    ({"model_type": json.dumps("Regressor"), "class_names": json.dumps({"0": "height"})}, "UNSUPPORTED_MODEL"),
    ({"model_type": json.dumps("Detector"), "det_type": json.dumps("retinanet"),
      "class_names": json.dumps({"0": "tree"})}, "UNSUPPORTED_MODEL"),
    ({"model_type": json.dumps("Detector"), "det_type": json.dumps("YOLO_v5_or_v7_default"),
      "class_names": json.dumps({"0": "tree", "1": "shrub"})}, "BAD_MODEL"),  # 6 columns are 1 class
])
def test_a_model_landcover_cannot_run_is_refused_with_exit_2(orchard_image, tmp_path, metadata, code):
    image, _ = orchard_image
    model = yolo_detector(tmp_path / "m.onnx", "rows", "YOLO_v7")
    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(model))
    rc, events = landcover_cli("predict", "--model", model, "--imagery", image, "--out", tmp_path / "x.gpkg")
    assert rc == 2 and events[-1]["event"] == "error" and events[-1]["code"] == code, events[-1]
    assert "bug" not in events[-1]["message"] + events[-1]["hint"]
    assert not (tmp_path / "x.gpkg").exists()


def test_a_bare_deepness_sigmoid_of_batch_one_runs(osbs_tif, tmp_path):
    """As Deepness's own test models `one_output_sigmoid_bsx512x512.onnx`: no metadata, output
    (n, h, w), a Reshape that takes one tile at a time whatever the input shape says. It runs
    (tile by tile) as [background, channel_0], the same map as the documented sigmoid."""
    meta = deepness_example_metadata(resolution=10, tiles_overlap=10, seg_small_segment=0)
    documented = segmentor(tmp_path / "sigmoid.onnx", "sigmoid", 128, meta)
    proto = onnx.load(str(documented))
    del proto.metadata_props[:]
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch_size"
    proto.graph.output[0].name = "y4"
    proto.graph.node[-1].output[0] = "y4"
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1, 128, 128], np.int64), "hw"))
    proto.graph.node.append(helper.make_node("Reshape", ["y4", "hw"], ["y"]))
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 128, 128]))
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    assert read_info(tmp_path / "bare.onnx").class_names == ["background", "channel_0"]
    bare = our_classes(tmp_path / "bare.onnx", osbs_tif, tmp_path)
    assert (bare == our_classes(documented, osbs_tif, tmp_path)).all()
