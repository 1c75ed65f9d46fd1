"""Training on tiny chips of the real sample data, ONNX export, fine-tuning, cancellation."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
from rasterio.windows import Window

from landcover_plugin.engine.dataset import DatasetParams, build_dataset
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter, parse_event
from landcover_plugin.engine.model_package import read_info
from landcover_plugin.engine.train import TrainParams, train

ROOT = Path(__file__).resolve().parents[2]
CHIP = 64


def crop(src_path: Path, window: Window, out: Path) -> Path:
    with rasterio.open(src_path) as src:
        profile = src.profile | {"width": window.width, "height": window.height,
                                 "transform": src.window_transform(window), "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        data = src.read(window=window)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def quiet() -> Reporter:
    return Reporter(json_mode=True, out=io.StringIO())


def events_of(reporter: Reporter) -> list[dict]:
    return [parse_event(line) for line in reporter.out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def trees_dataset(osbs_tif, osbs_csv, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trees")
    imagery = crop(osbs_tif, Window(0, 0, 192, 192), tmp / "crop.tif")
    build_dataset(DatasetParams(imagery=imagery, labels=osbs_csv, task="trees", out=tmp / "ds",
                                chip_size=CHIP), quiet())
    return tmp / "ds"


@pytest.fixture(scope="module")
def landcover_dataset(landsat_stack, landsat_polygons, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("landcover")
    imagery = crop(landsat_stack, Window(64, 64, 256, 256), tmp / "crop.tif")
    build_dataset(DatasetParams(imagery=imagery, labels=landsat_polygons, task="landcover", out=tmp / "ds",
                                class_field="label", chip_size=CHIP), quiet())
    return tmp / "ds"


@pytest.fixture(scope="module")
def trees_model(trees_dataset, tmp_path_factory):
    reporter = quiet()
    out = tmp_path_factory.mktemp("models") / "trees"
    result = train(TrainParams(dataset=trees_dataset, out=out, epochs=2, batch_size=4), reporter)
    return out, result, events_of(reporter)


@pytest.fixture(scope="module")
def landcover_model(landcover_dataset, tmp_path_factory):
    reporter = quiet()
    out = tmp_path_factory.mktemp("models") / "landcover"
    result = train(TrainParams(dataset=landcover_dataset, out=out, epochs=2, batch_size=4), reporter)
    return out, result, events_of(reporter)


def val_chips(dataset: Path, info) -> np.ndarray:
    """Validation chips as NCHW float32, normalised the way the metadata says
    (as predict does: ((raw / input_scale) - mean) / std)."""
    manifest = json.loads((dataset / "dataset.json").read_text())
    chips = []
    for chip in (c for c in manifest["chips"] if c["split"] == "val"):
        with rasterio.open(dataset / chip["image"]) as src:
            raw = src.read().astype(np.float32)
            valid = (src.read_masks() > 0).all(axis=0)
        x = (raw / info.input_scale - np.array(info.mean, np.float32)[:, None, None]) / np.array(
            info.std, np.float32)[:, None, None]
        x[:, ~valid] = 0
        chips.append(x)
    return np.stack(chips).astype(np.float32)


def check_package(model_dir: Path, dataset: Path, result, events: list[dict], channels: int):
    import keras

    manifest = json.loads((dataset / "dataset.json").read_text())
    assert result.outputs == {"model": str(model_dir), "onnx": str(model_dir / "model.onnx")}
    assert {p.name for p in model_dir.iterdir()} == {"model.onnx", "model.keras", "MODEL_CARD.md"}
    info = read_info(model_dir)
    assert (info.task, info.class_names, info.class_colors) == (
        manifest["task"], manifest["class_names"], manifest["class_colors"])
    assert (info.band_count, info.tile_size, info.tile_overlap) == (manifest["band_count"], CHIP, CHIP // 8)
    assert info.resolution_m == pytest.approx(manifest["resolution_m"])
    assert (info.input_scale, info.mean, info.std) == (manifest["input_scale"], manifest["mean"], manifest["std"])
    assert info.dataset == dataset.name and info.metrics["val_loss"] == pytest.approx(result.summary["val_loss"])
    assert result.summary["epochs"] <= 2
    assert result.summary["device"].startswith(("CPU", "GPU"))

    x = val_chips(dataset, info)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [info.band_count, CHIP, CHIP]
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert got.shape == (len(x), channels, CHIP, CHIP)  # NCHW
    keras_model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    want = keras_model(x.transpose(0, 2, 3, 1), training=False).numpy().transpose(0, 3, 1, 2)
    assert np.max(np.abs(got - want)) <= 1e-4

    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "train"]
    assert progress and progress[0]["message"].startswith("epoch 1 loss ")
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    assert progress[-1]["done"] == progress[-1]["total"]
    epoch_logs = [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("epoch ")]
    assert len(epoch_logs) == result.summary["epochs"] and "val_loss" in epoch_logs[0]
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert info.task in card and "CC0" in card and "CC BY-SA" in card
    return got, info


def test_trees_model_package(trees_model, trees_dataset):
    out, result, events = trees_model
    got, info = check_package(out, trees_dataset, result, events, channels=2)
    assert info.class_names == ["crown"]
    assert ((got >= 0) & (got <= 1)).all()  # sigmoid crown and heatmap
    assert "val_crown_iou" in result.summary


def test_landcover_model_package(landcover_model, landcover_dataset):
    out, result, events = landcover_model
    manifest = json.loads((landcover_dataset / "dataset.json").read_text())
    got, info = check_package(out, landcover_dataset, result, events, channels=len(manifest["class_names"]))
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-4)  # softmax over classes
    assert 0 <= result.summary["val_accuracy"] <= 1 and "val_miou" in result.summary


def test_fine_tune_from_a_base_model(trees_model, osbs_tif, osbs_csv, landcover_dataset, tmp_path):
    """Fine-tune on another part of the orthophoto; the base's input normalisation is kept."""
    base = trees_model[0]
    imagery = crop(osbs_tif, Window(208, 208, 192, 192), tmp_path / "other.tif")
    other = tmp_path / "other_ds"
    build_dataset(DatasetParams(imagery=imagery, labels=osbs_csv, task="trees", out=other, chip_size=CHIP), quiet())
    result = train(TrainParams(dataset=other, out=tmp_path / "tuned", base=base, epochs=1, batch_size=4), quiet())
    tuned = read_info(tmp_path / "tuned")
    assert result.summary["epochs"] == 1 and tuned.task == "trees"
    assert tuned.mean == read_info(base).mean != json.loads((other / "dataset.json").read_text())["mean"]
    assert "fine-tuned from" in (tmp_path / "tuned" / "MODEL_CARD.md").read_text()
    with pytest.raises(EngineError) as err:
        train(TrainParams(dataset=landcover_dataset, out=tmp_path / "bad", base=base, epochs=1), quiet())
    assert err.value.code == "BASE_MISMATCH"
    assert not (tmp_path / "bad").exists()


def test_bad_dataset_or_task(tmp_path, landcover_dataset):
    with pytest.raises(EngineError) as err:
        train(TrainParams(dataset=tmp_path, out=tmp_path / "m"), quiet())
    assert err.value.code == "DATASET_NOT_FOUND"
    with pytest.raises(EngineError) as err:
        train(TrainParams(dataset=landcover_dataset, out=tmp_path / "m", task="trees"), quiet())
    assert err.value.code == "BAD_TASK"
    assert not (tmp_path / "m").exists()


def test_sigterm_during_training_leaves_no_model(trees_dataset, tmp_path):
    out = tmp_path / "model"
    proc = subprocess.Popen(
        [sys.executable, "-m", "landcover_plugin.engine", "--json", "train", "--dataset", str(trees_dataset),
         "--out", str(out), "--epochs", "50", "--batch-size", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            event = parse_event(line)
            if event and event["event"] == "progress" and event["stage"] == "train":
                break
        else:
            pytest.fail(f"no training progress before exit {proc.wait()}")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=10)  # generous: the contract is 2 s
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [e for e in map(parse_event, rest.splitlines()) if e and e["event"] == "error"]
    assert proc.returncode == 130
    assert [e["code"] for e in errors] == ["CANCELLED"]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder either
