"""Training speed on the CPU: the model, the input pipeline alone, an epoch of the demo dataset.

- train_samples_per_s: Keras training steps of the default U-Net (trees, 2 heads)
  on 256 px chips, batch 8, after a warm-up step.
- pipeline_samples_per_s: the same tf.data pipeline (shuffle, augmentation,
  batch, prefetch) with no model; pipeline_to_train_ratio says how much faster
  data comes than training takes it (must be >= 10: the model never waits).
- demo_epoch_s: one epoch (train + validation) of the demo's tree dataset
  (OSBS_029, 128 px chips, batch 4), the second epoch of a real `train` run;
  demo_first_epoch_s the first, from the "training on" log line: it includes
  tracing the train and validation steps (once each).
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np

SECTION = "training"
ROOT = Path(__file__).resolve().parents[1]
TILE, BATCH = 256, 8


def _chips(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, TILE, TILE, 3)).astype(np.float32)
    y = np.stack([rng.integers(0, 2, (n, TILE, TILE)), rng.integers(0, 256, (n, TILE, TILE))], -1).astype(np.float32)
    return x, y


def train_speed() -> float:
    import keras

    from landcover_plugin.engine.learn.losses import make_loss
    from landcover_plugin.engine.learn.unet import build_unet

    model = build_unet(TILE, 3, "trees")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=make_loss("trees"))
    x, y = _chips(BATCH)
    model.train_on_batch(x, y)  # warm-up: tracing and graph building
    steps = 4
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * BATCH / (time.perf_counter() - started)


def pipeline_speed() -> float:
    from landcover_plugin.engine.learn.fit import augmented

    x, y = _chips(32)
    data = augmented(x, y, BATCH, seed=0).repeat()
    it = iter(data)
    next(it)  # warm-up
    batches = 40
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - started)


class _Clock:
    """A Reporter stand-in that notes when each epoch ends."""

    def __init__(self) -> None:
        self.epoch_ends: list[float] = []
        self.started = 0.0

    def log(self, message: str, level: str = "info") -> None:
        if message.startswith("training on "):
            self.started = time.perf_counter()
        if message.startswith("epoch "):
            self.epoch_ends.append(time.perf_counter())

    def progress(self, *args, **kwargs) -> None:
        pass


def demo_epoch(workdir: Path) -> tuple[float, float]:
    from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset
    from landcover_plugin.engine.events import Reporter
    from landcover_plugin.engine.stages.train import TrainParams, train

    data = ROOT / "data" / "deepforest"
    build_dataset(DatasetParams(imagery=data / "OSBS_029.tif", labels=data / "OSBS_029.csv", task="trees",
                                out=workdir / "ds", chip_size=128), Reporter(json_mode=True, out=io.StringIO()))
    clock = _Clock()
    train(TrainParams(dataset=workdir / "ds", out=workdir / "model", epochs=2, batch_size=4), clock)
    return clock.epoch_ends[1] - clock.epoch_ends[0], clock.epoch_ends[0] - clock.started


def run(workdir: Path) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The demo epoch first: it writes a GeoPackage, and GDAL's SQLite must load
    # before TensorFlow's (which lacks the R*Tree module GeoPackage needs).
    epoch, first = demo_epoch(workdir)
    trained, fed = train_speed(), pipeline_speed()
    return {"train_samples_per_s": round(trained, 2), "pipeline_samples_per_s": round(fed, 1),
            "pipeline_to_train_ratio": round(fed / trained, 1), "demo_epoch_s": round(epoch, 2), "demo_first_epoch_s": round(first, 2)}
