"""The other tasks end to end: buildings (binary segmentation) on synthetic imagery,
chip classification on the Landsat sample."""
from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import fiona
import numpy as np
import onnxruntime as ort
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window
from shapely.geometry import box, shape
from shapely.ops import unary_union

from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.learn.model_package import read_info
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset
from landcover_plugin.engine.stages.evaluate import EvalParams, evaluate
from landcover_plugin.engine.stages.predict import PredictParams, predict
from landcover_plugin.engine.stages.train import TrainParams, train

CHIP = 32
RES = 0.5  # m per pixel of the synthetic imagery
ORIGIN = (500_000.0, 3_300_000.0)


def quiet() -> Reporter:
    return Reporter(json_mode=True, out=io.StringIO())


def onnx_matches_keras(model_dir: Path, x_nchw: np.ndarray) -> np.ndarray:
    """The ONNX output, checked against model.keras within 1e-4."""
    import keras

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x_nchw})[0]
    want = keras.saving.load_model(model_dir / "model.keras", compile=False)(
        x_nchw.transpose(0, 2, 3, 1), training=False).numpy()
    want = want.transpose(0, 3, 1, 2) if want.ndim == 4 else want
    assert got.shape == want.shape and np.max(np.abs(got - want)) <= 1e-4
    return got


def styled_layers(gpkg: Path) -> set[str]:
    with sqlite3.connect(gpkg) as db:
        return {r[0] for r in db.execute("SELECT f_table_name FROM layer_styles WHERE useAsDefault")}


# --- buildings ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def town(tmp_path_factory) -> tuple[Path, Path, list]:
    """A 160x160 px RGB raster: noisy dark ground with bright rectangular roofs, and
    the roofs as polygons in a GeoPackage without any class field."""
    tmp = tmp_path_factory.mktemp("town")
    rng = np.random.default_rng(1)
    image = rng.normal(60, 12, (3, 160, 160))
    roofs = []
    for r in range(6, 150, 26):
        for c in range(6, 150, 26):
            h, w = rng.integers(6, 15, 2)
            r0, c0 = r + rng.integers(0, 6), c + rng.integers(0, 6)
            image[:, r0:r0 + h, c0:c0 + w] = rng.normal(200, 10, (3, 1, 1))
            x0, y0 = ORIGIN[0] + c0 * RES, ORIGIN[1] - r0 * RES
            roofs.append(box(x0, y0 - h * RES, x0 + w * RES, y0))
    raster = tmp / "town.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=160, height=160, count=3, dtype="uint8",
                       crs="EPSG:32617", transform=from_origin(*ORIGIN, RES, RES)) as dst:
        dst.write(np.clip(image, 0, 255).astype(np.uint8))
    polygons = tmp / "roofs.gpkg"
    with fiona.open(polygons, "w", driver="GPKG", crs="EPSG:32617",
                    schema={"geometry": "Polygon", "properties": {"id": "int"}}) as dst:
        dst.writerecords({"geometry": g.__geo_interface__, "properties": {"id": i}} for i, g in enumerate(roofs))
    return raster, polygons, roofs


@pytest.fixture(scope="module")
def buildings_dataset(town, tmp_path_factory) -> Path:
    raster, polygons, _ = town
    out = tmp_path_factory.mktemp("bds") / "ds"
    build_dataset(DatasetParams(imagery=raster, labels=polygons, task="buildings", out=out, chip_size=CHIP,
                                background_ratio=0.2), quiet())
    return out


def test_buildings_dataset_is_binary(buildings_dataset):
    manifest = json.loads((buildings_dataset / "dataset.json").read_text())
    assert manifest["task"] == "buildings" and manifest["class_names"] == ["background", "building"]
    values = set()
    for chip in manifest["chips"]:
        with rasterio.open(buildings_dataset / chip["mask"]) as src:
            values |= set(np.unique(src.read(1)).tolist())
    assert values == {0, 1}  # uncovered pixels are background, not ignored


def test_buildings_train_predict_eval(buildings_dataset, town, tmp_path):
    """A few epochs find the roofs: the `buildings` layer overlaps them (IoU), styled;
    eval reports the building IoU; the package says its task."""
    raster, _, roofs = town
    model = tmp_path / "model"
    result = train(TrainParams(dataset=buildings_dataset, out=model, epochs=12, batch_size=8, width=8, depth=2,
                               learning_rate=3e-3), quiet())
    info = read_info(model)
    assert (info.task, info.class_names) == ("buildings", ["background", "building"])
    assert "val_building_iou" in result.summary and "building footprints" in (model / "MODEL_CARD.md").read_text()
    x = np.random.default_rng(0).normal(0, 1, (2, 3, CHIP, CHIP)).astype(np.float32)
    assert onnx_matches_keras(model, x).shape == (2, 2, CHIP, CHIP)

    out = tmp_path / "buildings.gpkg"
    summary = predict(PredictParams(model=model, imagery=raster, out=out), quiet()).summary
    assert {"buildings", "class_stats"} <= set(fiona.listlayers(out)) and "buildings" in styled_layers(out)
    with fiona.open(out, layer="buildings") as layer:
        found = unary_union([shape(f["geometry"]) for f in layer])
        assert {f["properties"]["class"] for f in layer} == {"building"}
    truth = unary_union(roofs)
    assert summary["buildings"] >= 1
    assert found.intersection(truth).area / found.union(truth).area > 0.6

    report = evaluate(EvalParams(model=model, dataset=buildings_dataset, out=tmp_path / "report", split="all"),
                      quiet()).summary
    assert report["iou_building"] > 0.6
    assert "iou_building" in (tmp_path / "report" / "report.md").read_text()


# --- chip classification -----------------------------------------------------------------

@pytest.fixture(scope="module")
def classification_dataset(landsat_stack, landsat_polygons, tmp_path_factory, crop) -> Path:
    tmp = tmp_path_factory.mktemp("chips")
    imagery = crop(landsat_stack, Window(64, 64, 256, 256), tmp / "crop.tif")
    build_dataset(DatasetParams(imagery=imagery, labels=landsat_polygons, task="classification", out=tmp / "ds",
                                class_field="label", chip_size=CHIP), quiet())
    return tmp / "ds"


def test_classification_dataset_labels_each_chip(classification_dataset):
    """Each chip's class is the majority class of its labelled pixels, in dataset.json and the catalog."""
    manifest = json.loads((classification_dataset / "dataset.json").read_text())
    names = manifest["class_names"]
    for chip in manifest["chips"]:
        with rasterio.open(classification_dataset / chip["mask"]) as src:
            mask = src.read(1)
        counts = np.bincount(mask[mask != 255], minlength=len(names))
        assert chip["class"] == int(np.argmax(counts))
    with sqlite3.connect(classification_dataset / "catalog.gpkg") as db:
        catalog = dict(db.execute("SELECT id, chip_class FROM chips"))
    assert catalog == {c["id"]: names[c["class"]] for c in manifest["chips"]}


def test_classification_train_predict_eval(classification_dataset, landsat_stack, tmp_path):
    manifest = json.loads((classification_dataset / "dataset.json").read_text())
    names = manifest["class_names"]
    model = tmp_path / "model"
    result = train(TrainParams(dataset=classification_dataset, out=model, epochs=2, batch_size=8, width=8), quiet())
    info = read_info(model)
    assert (info.task, info.class_names, info.tile_overlap) == ("classification", names, 0)
    assert 0 <= result.summary["val_accuracy"] <= 1 and "one class per chip" in (model / "MODEL_CARD.md").read_text()
    x = np.random.default_rng(0).normal(0, 1, (3, 6, CHIP, CHIP)).astype(np.float32)
    probs = onnx_matches_keras(model, x)
    assert probs.shape == (3, len(names)) and np.allclose(probs.sum(1), 1, atol=1e-5)

    out = tmp_path / "chips.gpkg"
    summary = predict(PredictParams(model=model, imagery=landsat_stack, out=out), quiet()).summary
    assert set(fiona.listlayers(out)) == {"chip_classes", "class_stats", "layer_styles"}
    assert "chip_classes" in styled_layers(out)
    with fiona.open(out, layer="chip_classes") as layer, rasterio.open(landsat_stack) as src:
        chips = [(shape(f["geometry"]), f["properties"]) for f in layer]
        side = CHIP * src.res[0]
        image = box(*src.bounds)
    assert len(chips) == summary["chips"] > 10
    for geom, props in chips:
        assert props["class"] in names and 0 < props["probability"] <= 1
        assert geom.within(image.buffer(1e-6)) and geom.area <= side * side + 1e-3
    assert unary_union([g for g, _ in chips]).area == pytest.approx(sum(g.area for g, _ in chips))  # no overlap

    report = evaluate(EvalParams(model=model, dataset=classification_dataset, out=tmp_path / "report"),
                      quiet()).summary
    n_val = sum(c["split"] == "val" for c in manifest["chips"])
    assert 0 <= report["accuracy"] <= 1 and report["chips"] == n_val
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Confusion matrix (chips)" in text and "balanced_accuracy" in text
