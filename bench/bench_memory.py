"""Peak memory of `landcover predict` as the area grows, land cover and trees.

Land cover: a 5,000² and a 20,000² px raster (16x the area). The prediction is
streamed to a temporary GeoTIFF per row of tiles and vectorized in blocks, so the
peak RSS should hardly grow with the area (goal: ratio <= 1.10, < 1.5 GB). The
imagery is a cheap synthetic pattern (500 px squares of three colours) and the
model a 1x1-conv land-cover classifier, so the numbers measure the pipeline's
buffers, not a model's weights.

Trees: an orchard at 0.1 m (a crown every 4 m, a few missing) on 5,000² and
12,000² px (5.8x the area, ~15k and ~86k crowns), through a 1x1-conv model that
passes the crown probability and centre heatmap bands through: every crown is
outlined, measured, written and fitted to the planting grid (issue 13). Both
sizes hold whole interior vectorization blocks (2,048² px and their margins):
with fewer, the small run's blocks are smaller and its peak is lower for that.
Each run is a fresh process.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common import peak_rss_mb

SECTION = "memory"
SIZES = (5000, 20000)
TREE_SIZES = (5000, 12000)  # ~3 min for both on a 2-core machine
TREE_PITCH = 40  # px between planted trees (4 m at 0.1 m)
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


def write_orchard(path: Path, size: int) -> Path:
    """Bands: crown probability (0.9 in each crown), centre heatmap, soil, all 0-255
    (read as RGB they make every crown "dead": health is not what is measured here).
    One tree per TREE_PITCH cell, jittered, radius 1.0-1.6 m, 5% of them missing;
    a crown never leaves its cell, so each strip is drawn from its own cells alone."""
    import rasterio
    from rasterio.transform import from_origin

    cells = -(-size // TREE_PITCH)
    rng = np.random.default_rng(13)
    jitter = rng.integers(-3, 4, (2, cells, cells))
    radius = rng.uniform(10, 16, (cells, cells))
    planted = rng.random((cells, cells)) >= 0.05
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32617", "transform": from_origin(400000, 3300000, 0.1, 0.1), "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    cols = np.arange(size)
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, size, 1000):
            rows = np.arange(r0, min(r0 + 1000, size))
            ci, cj = rows[:, None] // TREE_PITCH, cols[None, :] // TREE_PITCH
            dr = rows[:, None] - (ci * TREE_PITCH + TREE_PITCH // 2 + jitter[0, ci, cj])
            dc = cols[None, :] - (cj * TREE_PITCH + TREE_PITCH // 2 + jitter[1, ci, cj])
            d2, rad = dr ** 2 + dc ** 2, radius[ci, cj]
            crown = (d2 <= rad ** 2) & planted[ci, cj]
            heat = np.exp(-d2 / (2 * (rad / 2) ** 2)) * planted[ci, cj]
            bands = np.stack([crown * 230, heat * 255, np.full(d2.shape, 60)]).astype(np.uint8)
            dst.write(bands, window=rasterio.windows.Window(0, r0, size, len(rows)))
    return path


def passthrough_trees_model(path: Path) -> Path:
    """Crown probability and heatmap = imagery bands 1 and 2 (a 1x1 Conv), 512 px tiles."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from landcover_plugin.engine.learn.model_package import ModelInfo, write_metadata

    weights = np.zeros((2, 3, 1, 1), np.float32)
    weights[0, 0] = weights[1, 1] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W", "B"], ["output"], kernel_shape=[1, 1])], "trees",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 512, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 512, 512])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.zeros(2, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    write_metadata(path, ModelInfo(task="trees", class_names=["crown"], class_colors=[], band_count=3,
                                   resolution_m=0.1, tile_size=512, tile_overlap=32, input_scale=255.0,
                                   mean=[0.0] * 3, std=[1.0] * 3))
    return path


def peak_of(model: Path, image: Path, out: Path, result: dict, key: str) -> None:
    started = time.monotonic()
    result[f"rss_mb_{key}"] = round(peak_rss_mb(["predict", "--model", str(model), "--imagery", str(image),
                                                 "--out", str(out)]), 1)
    result[f"seconds_{key}"] = round(time.monotonic() - started, 1)
    image.unlink()


def run(workdir: Path) -> dict:
    result = run_landcover(workdir)
    return result | {f"trees_{k}": v for k, v in run_trees(workdir).items()}


def run_trees(workdir: Path) -> dict:
    import fiona

    model = passthrough_trees_model(workdir / "trees.onnx")
    result = {}
    for size in TREE_SIZES:
        key, out = f"{size // 1000}k", workdir / f"trees{size}.gpkg"
        peak_of(model, write_orchard(workdir / f"orchard{size}.tif", size), out, result, key)
        with fiona.open(out, layer="crowns") as layer:
            result[f"crowns_{key}"] = len(layer)
    small, large = (f"{s // 1000}k" for s in TREE_SIZES)
    result[f"rss_ratio_{large}_vs_{small}"] = round(result[f"rss_mb_{large}"] / result[f"rss_mb_{small}"], 3)
    return result


def run_landcover(workdir: Path) -> dict:
    model = colour_model(workdir / "model.onnx")
    result = {}
    for size in SIZES:
        peak_of(model, write_pattern(workdir / f"img{size}.tif", size), workdir / f"out{size}.gpkg",
                result, f"{size // 1000}k")
    result["rss_ratio_20k_vs_5k"] = round(result["rss_mb_20k"] / result["rss_mb_5k"], 3)
    return result
