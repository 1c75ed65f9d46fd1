"""Keras training mechanics: the tf.data pipeline, progress and checkpoint callbacks,
early stopping, batch size and precision for the device, a base model to fine-tune."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..events import Reporter
from .dataset_folder import Manifest
from .model_package import KERAS_NAME, read_info


PATIENCE = 10  # epochs without a better val loss before stopping
MAX_RESOLUTION_RATIO = 1.5  # a base model fine-tunes on imagery at most this much finer or coarser than its own


WARMUP_EPOCHS = 10  # tiny datasets: val loss is noisy at first, never stop before this


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
    """A Keras callback reporting each batch as progress ("epoch 3/300, 2m05s left (loss ...)":
    the time left from this run's pace) and each epoch as a log line."""
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
                              f"epoch {self.epoch + 1}/{epochs}, {eta_text(left)} left (loss {logs['loss']:.3f}{metric})")

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


def load_base(base: Path, manifest: Manifest, task: str):
    """The Keras model to fine-tune, its ModelInfo, and whether it was rebuilt from the ONNX
    file alone (no model.keras beside it: then its BatchNorm statistics need calibrating);
    it must read and write what this dataset has."""
    import keras

    from ..learn.model_package import onnx_path

    onnx_file = onnx_path(base)  # a folder, an .onnx (beside model.keras or alone), or a shipped model's name
    path = onnx_file.parent / KERAS_NAME
    info = read_info(onnx_file)
    if info.band_count != manifest.band_count:
        raise EngineError("BASE_MISMATCH", f"The base model reads {info.band_count} bands; the dataset's imagery "
                          f"has {manifest.band_count}.",
                          "Fine-tune on imagery with the same bands (in the same order), or train from scratch.")
    if not 1 / MAX_RESOLUTION_RATIO <= manifest.resolution_m / info.resolution_m <= MAX_RESOLUTION_RATIO:
        raise EngineError("BASE_MISMATCH", f"The base model was trained on imagery of {info.resolution_m:g} m per "
                          f"pixel; the dataset's is {manifest.resolution_m:g} m: objects would be "
                          f"{info.resolution_m / manifest.resolution_m:.2g} times the size the model knows.",
                          f"Fetch or resample the imagery at {info.resolution_m:g} m (`landcover fetch --gsd "
                          f"{info.resolution_m:g}`) and rebuild the dataset, or train from scratch.")
    wanted = (task, manifest.class_names, manifest.chip_size)
    if (info.task, info.class_names, info.tile_size) != wanted:
        raise EngineError("BASE_MISMATCH",
                          f"Base model ({info.task}, classes {info.class_names}, tile {info.tile_size}) does not fit "
                          f"the dataset ({task}, classes {manifest.class_names}, chip {manifest.chip_size}).",
                          "Fine-tune on a dataset with the same classes and chip size, or train from scratch.")
    if not path.is_file():
        from .onnx_weights import keras_from_onnx

        return keras_from_onnx(onnx_file, info), info, True
    model = keras.saving.load_model(path, compile=False)
    unfreeze(model)  # a base trained with a frozen encoder saves it frozen: --freeze-encoder decides here
    return model, info, False


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


def predict_eagerly(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's outputs batch by batch, run eagerly: model.predict would first trace
    a predict function (seconds of CPU for a large network) for a single pass."""
    return np.concatenate([model(x[i:i + batch_size], training=False).numpy() for i in range(0, len(x), batch_size)])


def fit_keeping_checkpoint(model, ckpt: Path, reporter: Reporter, state, *args, **kwargs) -> None:
    """model.fit; on cancel, say which checkpoint survives (atomic_output keeps it whole)."""
    from ..errors import Cancelled

    try:
        model.fit(*args, **kwargs)
    except Cancelled:
        if state.epoch:
            reporter.log(f"the checkpoint of epoch {state.epoch} is kept in {ckpt}: run the same command "
                         "with --resume to go on from it")
        raise


def checkpointer(folder: Path, optimizer, state, patience: int, reporter: Reporter, save):
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


def batched(x: np.ndarray, y: np.ndarray, batch_size: int):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
