"""Peak memory of `landcover predict` on a 5,000² and a 20,000² px raster (16x the area).

The prediction is streamed to a temporary GeoTIFF per row of tiles and vectorized
in blocks, so the peak RSS should hardly grow with the area (goal: ratio <= 1.10,
< 1.5 GB). Each run is a fresh process; the imagery is a cheap synthetic pattern
(500 px squares of three colours) and the model a 1x1-conv land-cover classifier,
so the numbers measure the pipeline's buffers, not a model's weights.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common import peak_rss_mb

SECTION = "memory"
SIZES = (5000, 20000)
COLOURS = np.array([[40, 120, 40], [200, 180, 120], [30, 60, 160]], np.uint8)


def write_pattern(path: Path, size: int) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32617", "transform": from_origin(400000, 3300000, 1.0, 1.0), "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    cols = np.arange(size) // 500
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, size, 1000):
            rows = np.arange(r0, min(r0 + 1000, size)) // 500
            classes = (rows[:, None] + cols[None, :] * 2) % 3
            dst.write(COLOURS[classes].transpose(2, 0, 1), window=rasterio.windows.Window(0, r0, size, len(rows)))
    return path


def colour_model(path: Path) -> Path:
    """Class k = the colour nearest COLOURS[k] (a 1x1 Conv + Softmax), 512 px tiles."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from landcover_plugin.engine.learn.model_package import ModelInfo, write_metadata

    c = COLOURS.astype(np.float32) / 255.0
    weights = (2 * c)[:, :, None, None] * 20.0  # -|x - c|² up to a constant: 2 x.c - |c|²
    bias = -(c ** 2).sum(axis=1) * 20.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W", "B"], ["logits"], kernel_shape=[1, 1]),
         helper.make_node("Softmax", ["logits"], ["output"], axis=1)], "colours",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 512, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 512, 512])],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "W"),
                     numpy_helper.from_array(bias.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    write_metadata(path, ModelInfo(task="landcover", class_names=["forest", "barren", "water"], class_colors=[],
                                   band_count=3, resolution_m=1.0, tile_size=512, tile_overlap=32))
    return path


def run(workdir: Path) -> dict:
    model = colour_model(workdir / "model.onnx")
    result = {}
    for size in SIZES:
        image = write_pattern(workdir / f"img{size}.tif", size)
        started = time.monotonic()
        rss = peak_rss_mb(["predict", "--model", str(model), "--imagery", str(image),
                           "--out", str(workdir / f"out{size}.gpkg")])
        key = f"{size // 1000}k"
        result[f"rss_mb_{key}"] = round(rss, 1)
        result[f"seconds_{key}"] = round(time.monotonic() - started, 1)
        image.unlink()
    result["rss_ratio_20k_vs_5k"] = round(result["rss_mb_20k"] / result["rss_mb_5k"], 3)
    return result
