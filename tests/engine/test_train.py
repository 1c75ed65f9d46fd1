"""Training on tiny chips of the real sample data, ONNX export, fine-tuning, cancellation."""
from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
from rasterio.windows import Window

from landcover_plugin.contract.protocol import parse_event
from landcover_plugin.engine.atomic import MARKER
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.learn.model_package import read_info
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset
from landcover_plugin.engine.stages.train import TrainParams, train

ROOT = Path(__file__).resolve().parents[2]
CHIP = 64


def quiet() -> Reporter:
    return Reporter(json_mode=True, out=io.StringIO())


def events_of(reporter: Reporter) -> list[dict]:
    return [parse_event(line) for line in reporter.out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def trees_dataset(osbs_tif, osbs_csv, tmp_path_factory, crop) -> Path:
    tmp = tmp_path_factory.mktemp("trees")
    imagery = crop(osbs_tif, Window(0, 0, 192, 192), tmp / "crop.tif")
    build_dataset(DatasetParams(imagery=imagery, labels=osbs_csv, task="trees", out=tmp / "ds",
                                chip_size=CHIP), quiet())
    return tmp / "ds"


@pytest.fixture(scope="module")
def landcover_dataset(landsat_stack, landsat_polygons, tmp_path_factory, crop) -> Path:
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
    result = train(TrainParams(dataset=landcover_dataset, out=out, epochs=2, batch_size=4, family="unet"), reporter)
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
    assert {p.name for p in model_dir.iterdir()} == {"model.onnx", "model-peers.onnx", "model.keras",
                                                     "MODEL_CARD.md", "training_curves.png", "train_config.json",
                                                     MARKER}
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
    # model-peers.onnx: the same model fed as Deepness and GeoDeep feed it (values / 255)
    peers = ort.InferenceSession(str(model_dir / "model-peers.onnx"), providers=["CPUExecutionProvider"])
    raw = x * np.float32(info.std)[:, None, None] + np.float32(info.mean)[:, None, None]
    theirs = peers.run(None, {"image": (raw * np.float32(info.input_scale / 255)).astype(np.float32)})[0]
    if info.task == "trees":  # [background, crown]
        theirs, got_crown = theirs[:, 1], got[:, 0]
        assert np.max(np.abs(theirs - got_crown)) <= 1e-4
    else:
        assert np.max(np.abs(theirs - got)) <= 1e-4

    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "train"]
    assert progress and progress[0]["message"].startswith("epoch 1/")
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
    # The crown post-processing chosen on the validation crowns travels in the model.
    from landcover_plugin.engine.vector.crown_metrics import POST_GRID

    assert (info.threshold, info.seed_distance_m, info.min_crown_m2) == \
        (result.summary["threshold"], result.summary["seed_distance_m"], result.summary["min_crown_m2"])
    assert info.threshold in POST_GRID["threshold"] and 0 <= result.summary["val_crown_f1_tuned"] <= 1


def test_landcover_model_package(landcover_model, landcover_dataset):
    out, result, events = landcover_model
    manifest = json.loads((landcover_dataset / "dataset.json").read_text())
    got, info = check_package(out, landcover_dataset, result, events, channels=len(manifest["class_names"]))
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-4)  # softmax over classes
    assert 0 <= result.summary["val_accuracy"] <= 1 and "val_miou" in result.summary


def test_fine_tune_from_a_base_model(trees_model, osbs_tif, osbs_csv, landcover_dataset, tmp_path, crop):
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


def copy_dataset(src: Path, dst: Path, **manifest_changes) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "dataset.json").read_text()) | manifest_changes
    (dst / "dataset.json").write_text(json.dumps(manifest))
    return dst


def test_sigterm_keeps_the_last_checkpoint_and_resume_finishes(trees_dataset, tmp_path):
    """Cancel after the first epoch's checkpoint: no model package, the checkpoint
    survives whole; --resume goes on from it to the last epoch."""
    out = tmp_path / "model"
    command = [sys.executable, "-m", "landcover_plugin.engine", "--json", "train", "--dataset", str(trees_dataset),
               "--out", str(out), "--epochs", "3", "--batch-size", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            event = parse_event(line)
            if event and event["event"] == "progress" and event["message"].startswith("epoch 2/"):
                break
        else:
            pytest.fail(f"no second epoch before exit {proc.wait()}")
        assert re.search(r"epoch \d+/\d+, \d+m\d\ds left", event["message"])
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=10)  # generous: the contract is 2 s
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [e for e in map(parse_event, rest.splitlines()) if e]
    assert proc.returncode == 130
    assert [e["code"] for e in events if e["event"] == "error"] == ["CANCELLED"]
    assert any("--resume" in e["message"] for e in events if e["event"] == "log")
    assert not out.exists()
    ckpt = tmp_path / ".model.checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.checkpoint"]  # no partial folder either
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1
    from landcover_plugin.engine.stages.train import can_resume  # what `landcover run` checks to pass --resume

    assert can_resume(TrainParams(dataset=trees_dataset, out=out, epochs=3, batch_size=1))
    assert not can_resume(TrainParams(dataset=trees_dataset, out=out, epochs=3, batch_size=2))

    done = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    events = [e for e in map(parse_event, done.stdout.splitlines()) if e]
    assert done.returncode == 0, done.stdout[-2000:]
    epochs = [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("epoch ")]
    assert [m.split(":")[0] for m in epochs] == ["epoch 2/3", "epoch 3/3"]
    assert events[-1]["summary"]["epochs"] == 3
    assert (out / "training_curves.png").stat().st_size > 1000
    assert not ckpt.exists()  # the package is whole: the checkpoint is gone


def test_pipeline_resumes_an_interrupted_training(osbs_tif, osbs_csv, tmp_path, crop, monkeypatch):
    """`landcover run` again after an interrupted training: the train stage gets --resume
    when the checkpoint is of the same options; with other options it starts over."""
    from landcover_plugin.engine.stages import pipeline
    from landcover_plugin.engine.learn.checkpoint import RunState, checkpoint_dir
    from landcover_plugin.engine.learn.dataset_folder import dataset_hash
    from landcover_plugin.engine.stages.train import _fingerprint, resolved

    imagery = crop(osbs_tif, Window(0, 0, 128, 128), tmp_path / "crop.tif")
    work = tmp_path / "work"
    calls = []

    def child(args, reporter):  # stands in for the training child process
        calls.append(args)
        raise EngineError("STOPPED", "stopped here", "")

    def run(batch_size: int) -> list[str]:
        spec = {"task": "trees", "imagery": str(imagery), "labels": str(osbs_csv), "out": str(tmp_path / "t.gpkg"),
                "workdir": str(work), "train": {"epochs": 2, "chip_size": 64, "batch_size": batch_size}}
        (tmp_path / "p.yaml").write_text(json.dumps(spec))
        with pytest.raises(EngineError, match="stopped here"):
            pipeline.run_pipeline(pipeline.load_pipeline(tmp_path / "p.yaml"), quiet())
        return calls[-1]

    monkeypatch.setattr(pipeline, "run_in_child", child)
    assert "--resume" not in run(4)  # no checkpoint
    interrupted = TrainParams(dataset=work / "dataset", out=work / "model", task="trees", epochs=2, batch_size=4)
    ckpt = checkpoint_dir(interrupted.out)
    ckpt.mkdir()
    # what training writes: the options as it resolved them
    state = RunState(epoch=1, fingerprint=_fingerprint(resolved(interrupted, "trees"), dataset_hash(interrupted.dataset)))
    (ckpt / "state.json").write_text(json.dumps(state.__dict__))
    assert run(4)[-1] == "--resume"
    assert "--resume" not in run(8)  # another batch size: train would refuse the checkpoint


def test_disk_full_during_a_checkpoint(trees_dataset, tmp_path, monkeypatch):
    """The second checkpoint write fails with ENOSPC: a clear error, the first checkpoint
    kept whole, no model package."""
    import errno

    from landcover_plugin.engine.learn import checkpoint

    calls = []
    real = checkpoint.np.savez

    def savez(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.np, "savez", savez)
    with pytest.raises(EngineError) as err:
        train(TrainParams(dataset=trees_dataset, out=tmp_path / "m", epochs=3, batch_size=4), quiet())
    assert err.value.code == "DISK_FULL" and "--resume" in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.checkpoint"]
    state = json.loads((tmp_path / ".m.checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and (tmp_path / ".m.checkpoint" / "best.weights.h5").is_file()


def test_bad_inputs_each_get_a_clear_error(trees_dataset, landcover_dataset, trees_model, tmp_path):
    def code_of(dataset: Path, **kw) -> str:
        with pytest.raises(EngineError) as err:
            train(TrainParams(dataset=dataset, out=tmp_path / "m", epochs=1, batch_size=4, **kw), quiet())
        assert not (tmp_path / "m").exists() and not (tmp_path / ".m.checkpoint").exists()
        return err.value.code

    manifest = json.loads((landcover_dataset / "dataset.json").read_text())
    one = copy_dataset(landcover_dataset, tmp_path / "one", class_names=manifest["class_names"][:1],
                       class_colors=manifest["class_colors"][:1])
    for chip in manifest["chips"]:  # every labelled pixel becomes class 0
        with rasterio.open(one / chip["mask"], "r+") as dst:
            mask = dst.read()
            dst.write(np.where(mask == 255, 255, 0).astype(mask.dtype))
    assert code_of(one) == "ONE_CLASS"

    chips = [c | {"split": "train" if c["split"] == "val" else c["split"]} for c in manifest["chips"]]
    assert code_of(copy_dataset(landcover_dataset, tmp_path / "noval", chips=chips)) == "EMPTY_VAL_SPLIT"

    four = copy_dataset(trees_dataset, tmp_path / "four", band_count=4)
    assert code_of(four, base=trees_model[0]) == "BASE_MISMATCH"
    coarse = copy_dataset(trees_dataset, tmp_path / "coarse", resolution_m=0.3)  # crowns a third of the size
    assert code_of(coarse, base=trees_model[0]) == "BASE_MISMATCH"

    corrupt = copy_dataset(trees_dataset, tmp_path / "corrupt")
    first_train = next(c for c in json.loads((corrupt / "dataset.json").read_text())["chips"] if c["split"] == "train")
    (corrupt / first_train["image"]).write_bytes(b"II*\x00 not a tiff")
    assert code_of(corrupt) == "CORRUPT_CHIP"


def test_config_file_freeze_encoder_and_dead_channel(trees_dataset, trees_model, tmp_path):
    """A YAML config + CLI override; a frozen encoder stays as it was; a crown/dead
    dataset gets the third output channel."""
    import keras
    from landcover_plugin.engine.stages.train import FEW_SHOT, params_from_config

    config = tmp_path / "train.yaml"
    config.write_text(f"dataset: {trees_dataset}\nbase: {trees_model[0]}\nepochs: 5\nfreeze_encoder: true\n"
                      f"out: {tmp_path / 'tuned'}\n")
    params = params_from_config(config, epochs=1, batch_size=4, learning_rate=None)
    assert (params.epochs, params.freeze_encoder, params.learning_rate) == (1, True, None)
    result = train(params, quiet())
    assert result.summary["learning_rate"] == pytest.approx(FEW_SHOT["learning_rate"])  # fine-tuning trees
    base = keras.saving.load_model(trees_model[0] / "model.keras", compile=False)
    tuned = keras.saving.load_model(tmp_path / "tuned" / "model.keras", compile=False)
    assert np.array_equal(base.layers[1].get_weights()[0], tuned.layers[1].get_weights()[0])  # encoder conv
    assert not np.array_equal(base.layers[-2].get_weights()[0], tuned.layers[-2].get_weights()[0])
    assert "encoder frozen" in (tmp_path / "tuned" / "MODEL_CARD.md").read_text()
    assert json.loads((tmp_path / "tuned" / "train_config.json").read_text())["freeze_encoder"] is True

    dead = copy_dataset(trees_dataset, tmp_path / "dead", class_names=["crown", "dead"],
                        class_colors=["#2ca02c", "#8c564b"])
    for chip in json.loads((dead / "dataset.json").read_text())["chips"]:
        with rasterio.open(dead / chip["mask"], "r+") as dst:
            mask = dst.read()
            mask[0, :, : mask.shape[2] // 2][mask[0, :, : mask.shape[2] // 2] == 1] = 2  # left half: dead
            dst.write(mask)
    result = train(TrainParams(dataset=dead, out=tmp_path / "deadm", epochs=1, batch_size=4), quiet())
    assert "val_dead_accuracy" in result.summary
    session = ort.InferenceSession(str(tmp_path / "deadm" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, CHIP, CHIP), np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 3, CHIP, CHIP)
    assert read_info(tmp_path / "deadm").class_names == ["crown", "dead"]


def test_eval_reports(trees_model, trees_dataset, landcover_model, landcover_dataset, tmp_path):
    """`landcover eval`: report.md + report.html with metrics and plots; mIoU matches the confusion matrix."""
    from landcover_plugin.engine.stages.evaluate import EvalParams, evaluate

    out = tmp_path / "lc_report"
    result = evaluate(EvalParams(model=landcover_model[0], dataset=landcover_dataset, out=out), quiet())
    names = {p.name for p in out.iterdir()}
    assert names == {"report.md", "report.html", "metrics.json", "confusion_matrix.png", "training_curves.png",
                     "examples.png", MARKER}
    metrics = json.loads((out / "metrics.json").read_text())
    ious = [v for k, v in metrics.items() if k.startswith("iou_")]
    assert metrics["miou"] == pytest.approx(np.mean(ious)) and 0 <= metrics["miou"] <= 1
    assert result.summary["miou"] == metrics["miou"]
    assert "mIoU" in (out / "report.md").read_text() or "miou" in (out / "report.md").read_text()
    assert "<img src='confusion_matrix.png'" in (out / "report.html").read_text()

    cli = subprocess.run([sys.executable, "-m", "landcover_plugin.engine", "--json", "eval", "--model",
                          str(trees_model[0]), "--dataset", str(trees_dataset), "--out", str(tmp_path / "t")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stdout[-2000:]
    summary = parse_event(cli.stdout.splitlines()[-1])["summary"]
    assert {"crown_precision", "crown_recall", "crown_f1", "iou_crown", "miou"} <= set(summary)
    assert "IoU >= 0.4" in (tmp_path / "t" / "report.md").read_text()
    with pytest.raises(EngineError) as err:
        evaluate(EvalParams(model=trees_model[0], dataset=landcover_dataset, out=tmp_path / "bad"), quiet())
    assert err.value.code == "MODEL_DATASET_MISMATCH" and not (tmp_path / "bad").exists()


def test_shipped_model_resolves_by_name(trees_model, tmp_path, monkeypatch):
    from landcover_plugin.engine.learn import model_package

    shutil.copytree(trees_model[0], tmp_path / "trees-mine")
    monkeypatch.setattr(model_package, "MODELS_DIR", tmp_path)
    assert model_package.onnx_path("trees-mine") == tmp_path / "trees-mine" / "model.onnx"
    assert read_info("trees-mine").task == "trees"


def test_shipped_trees_base_runs_by_name():
    """`--model trees-base` resolves to resources/models/trees-base: a trees model at 0.1 m
    whose ONNX output has the contract's 2 channels, with its leave-one-image-out scores."""
    from landcover_plugin.engine.learn.model_package import onnx_path

    info = read_info("trees-base")
    assert (info.task, info.class_names, info.band_count, info.resolution_m) == ("trees", ["crown"], 3, 0.1)
    session = ort.InferenceSession(str(onnx_path("trees-base")), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, info.tile_size, info.tile_size), np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 2, info.tile_size, info.tile_size)
    card = (onnx_path("trees-base").parent / "MODEL_CARD.md").read_text()
    assert "Leave-one-image-out" in card and "SOAP_061" in card


def test_channel_softmax_written_as_ops_gives_the_same_output():
    import onnx
    from onnx import TensorProto, helper

    from landcover_plugin.engine.learn.export import channel_softmax_as_ops

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(0).normal(0, 30, (2, 4, 8, 8)).astype(np.float32)  # large logits: exp must not overflow
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    want = run(model)
    rewritten = channel_softmax_as_ops(model)
    onnx.checker.check_model(rewritten)
    assert "Softmax" not in {n.op_type for n in rewritten.graph.node}
    assert np.allclose(run(rewritten), want, atol=1e-6)


def test_concat_then_conv_written_as_a_sum_gives_the_same_output():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from landcover_plugin.engine.learn.export import concat_conv_as_sum

    rng = np.random.default_rng(0)
    w, b = rng.normal(0, 1, (5, 7, 3, 3)).astype(np.float32), rng.normal(0, 1, 5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Concat", ["r", "s"], ["c"], axis=1),
         helper.make_node("Conv", ["c", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Concat", ["y", "s"], ["z"], axis=1)],  # a graph output: stays
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8]),
              helper.make_tensor_value_info("s", TensorProto.FLOAT, [None, 4, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 9, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feed = {"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32), "s": rng.normal(0, 1, (2, 4, 8, 8)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    want = run(model)
    rewritten = concat_conv_as_sum(model)
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Conv", "Conv", "Add", "Concat"]
    assert np.allclose(run(rewritten), want, atol=1e-5)
