"""Child of bench_inference (TensorFlow lives only here, docs/DESIGN.md): build the U-Net with
engine/unet.build_unet, fit it briefly on synthetic colour-coded tiles (so its
predictions mean something for the int8 accuracy check), export it with
learn/export.export_onnx, and time Keras on the bench tiles, both `model.predict` and calling
the model on each batch (the faster is the baseline).

argv: WORKDIR TILE N_TILES BATCH. Writes WORKDIR/model.onnx, tiles.npy (NCHW), labels.npy;
prints one JSON line with keras_tiles_per_s (the faster way) and each way's rate.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

N_CLASSES = 4
COLOURS = np.array([[0.2, 0.5, 0.2], [0.6, 0.5, 0.3], [0.2, 0.3, 0.7], [0.8, 0.8, 0.8]], np.float32)


def synthetic(n: int, tile: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles (n, tile, tile, 3) of blobby classes, each with its colour plus noise."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    fields = ndimage.gaussian_filter(rng.random((n, N_CLASSES, tile, tile)), sigma=(0, 0, 12, 12))
    labels = np.argmax(fields, axis=1)
    x = COLOURS[labels] + rng.normal(0, 0.08, (n, tile, tile, 3)).astype(np.float32)
    return x.astype(np.float32), labels.astype(np.uint8)


def main(workdir: Path, tile: int, n_tiles: int, batch: int) -> None:
    import keras
    import tensorflow as tf

    from landcover_plugin.engine.learn.export import export_onnx
    from landcover_plugin.engine.learn.unet import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(tile, 3, "landcover", n_classes=N_CLASSES)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    x_train, y_train = synthetic(24, tile, seed=1)
    model.fit(x_train, y_train, batch_size=4, epochs=3, verbose=0)
    x, y = synthetic(n_tiles, tile, seed=2)
    export_onnx(model, workdir / "model.onnx", tile, 3)
    np.save(workdir / "tiles.npy", x.transpose(0, 3, 1, 2))
    np.save(workdir / "labels.npy", y)
    np.save(workdir / "keras_pred.npy", np.argmax(model.predict(x, batch_size=batch, verbose=0), axis=-1))
    # Two ways to run Keras: model.predict, and calling the model on each batch; the
    # faster one is the baseline.
    batches = [tf.constant(x[i:i + batch]) for i in range(0, n_tiles, batch)]
    ways = {"predict": lambda: model.predict(x, batch_size=batch, verbose=0),
            "call": lambda: [model(b, training=False).numpy() for b in batches]}
    rates = {}
    for way, run in ways.items():
        run()  # warm-up
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        rates[way] = n_tiles / best
    print(json.dumps({"keras_tiles_per_s": max(rates.values()), "keras_predict_tiles_per_s": rates["predict"],
                      "keras_call_tiles_per_s": rates["call"]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
