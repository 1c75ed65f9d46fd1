"""Fine-tuning from an ONNX file alone: the shipped trees-base on a fresh clone (no
model.keras), and any model of ours whose folder lost its Keras file."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from rasterio.windows import Window

from landcover_plugin.contract.protocol import parse_event
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.learn.model_package import onnx_path, read_info
from landcover_plugin.engine.learn.onnx_weights import calibrate_batchnorm, keras_from_onnx
from landcover_plugin.engine.stages.train import FEW_SHOT, TrainParams, train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def quiet() -> Reporter:
    return Reporter(json_mode=True, out=io.StringIO())


def dataset(*args: str) -> None:
    """`landcover dataset` in its own process: GDAL's SQLite must not meet TensorFlow's
    in one process (GeoPackage writes then fail with "no such module: rtree")."""
    done = subprocess.run([sys.executable, "-m", "landcover_plugin.engine", "dataset", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def trees_128(osbs_tif, osbs_csv, tmp_path_factory, crop) -> Path:
    """Chips of trees-base's tile size."""
    tmp = tmp_path_factory.mktemp("ft")
    imagery = crop(osbs_tif, Window(0, 0, 384, 384), tmp / "crop.tif")
    dataset("--imagery", str(imagery), "--labels", str(osbs_csv), "--task", "trees", "--chip-size", "128",
            "--out", str(tmp / "ds"))
    return tmp / "ds"


def test_trees_base_rebuilt_from_its_onnx_computes_the_same():
    path = onnx_path("trees-base")
    info = read_info(path)
    model = keras_from_onnx(path, info)
    x = np.random.default_rng(1).normal(size=(3, 128, 128, 3)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})[0]
    assert np.abs(np.asarray(model(x, training=False)).transpose(0, 3, 1, 2) - expected).max() < 1e-4


def test_calibrated_batchnorm_keeps_the_map_and_trains_from_where_it_stands(trees_128):
    from landcover_plugin.engine.learn.dataset_folder import Manifest, load_chips

    path = onnx_path("trees-base")
    info = read_info(path)
    model = keras_from_onnx(path, info)
    manifest = Manifest.read(trees_128)
    from dataclasses import replace
    chips, _ = load_chips(trees_128, replace(manifest, input_scale=info.input_scale, mean=info.mean, std=info.std),
                          "train")
    before = np.asarray(model(chips, training=False))
    calibrate_batchnorm(model, chips)
    after = np.asarray(model(chips, training=False))
    assert np.abs(after - before).max() < 1e-3  # the function is unchanged
    # A training step normalises by the batch's statistics (and moves the stored ones):
    # calibrated, it computes nearly what inference does; uncalibrated, something else.
    calibrated = np.abs(np.asarray(model(chips, training=True)) - after).mean()
    uncalibrated = np.abs(np.asarray(keras_from_onnx(path, info)(chips, training=True)) - before).mean()
    assert calibrated < 0.2 * uncalibrated, (calibrated, uncalibrated)


def test_fine_tune_trees_base_by_name_and_from_an_onnx_file_alone(trees_128, tmp_path):
    """`--base trees-base` on a fresh clone, and `--base model.onnx` copied on its own."""
    alone = tmp_path / "given" / "trees.onnx"
    alone.parent.mkdir()
    shutil.copy(onnx_path("trees-base"), alone)
    for base in ("trees-base", str(alone)):
        out = tmp_path / f"tuned-{Path(base).stem}"
        done = subprocess.run([sys.executable, "-m", "landcover_plugin.engine", "--json", "train", "--dataset",
                               str(trees_128), "--base", base, "--out", str(out), "--epochs", "1",
                               "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        events = [e for e in map(parse_event, done.stdout.splitlines()) if e]
        assert done.returncode == 0, events[-3:]
        if not (onnx_path("trees-base").parent / "model.keras").exists() or base != "trees-base":
            assert any("weights taken from its ONNX file" in e["message"] for e in events if e["event"] == "log")
        assert read_info(out).task == "trees" and (out / "model.keras").is_file()  # fine-tunable again
        # fine-tuning trees runs the few-shot recipe (stages/train.py FEW_SHOT) where options are left open
        assert events[-1]["summary"]["learning_rate"] == pytest.approx(FEW_SHOT["learning_rate"])
        assert any(e["message"].startswith("copy-paste: ") for e in events if e["event"] == "log")


def test_a_landcover_model_without_its_keras_file_fine_tunes(landsat_stack, landsat_polygons, tmp_path, crop):
    imagery = crop(landsat_stack, Window(64, 64, 256, 256), tmp_path / "crop.tif")
    ds = tmp_path / "ds"
    dataset("--imagery", str(imagery), "--labels", str(landsat_polygons), "--class-field", "label",
            "--chip-size", "64", "--out", str(ds))
    base = tmp_path / "base"
    train(TrainParams(dataset=ds, out=base, epochs=1, batch_size=4, **_unet()), quiet())
    (base / "model.keras").unlink()
    info = read_info(base)
    model = keras_from_onnx(base / "model.onnx", info)  # softmax head: the same function
    assert model.output_shape[-1] == len(info.class_names)
    result = train(TrainParams(dataset=ds, out=tmp_path / "tuned", base=base, epochs=1, batch_size=4, **_unet()),
                   quiet())
    assert result.summary["epochs"] == 1


def _unet() -> dict:
    """The U-Net family where training offers a choice of families."""
    return {"family": "unet"} if "family" in TrainParams.__dataclass_fields__ else {}


def test_an_onnx_that_is_not_our_unet_is_refused_clearly(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Sigmoid", ["input"], ["output"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 128, 128])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 3, 128, 128])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(EngineError) as err:
        keras_from_onnx(path, read_info(onnx_path("trees-base")))
    assert err.value.code == "BASE_NOT_RESTORABLE" and "model.keras" in err.value.hint
