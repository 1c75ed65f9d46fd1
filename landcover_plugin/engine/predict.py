"""Run a model over imagery with onnxruntime and write styled vector layers.

The AOI window of the imagery is cut into tiles of the model's tile size that
overlap by `tile_overlap` pixels on each side; only each tile's centre is kept,
so every output pixel comes from a tile that saw its neighbourhood (no seams).
No TensorFlow here: onnxruntime alone, in a process without TF (DESIGN.md).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from rasterio.features import geometry_mask
from rasterio.windows import Window, from_bounds
from shapely.geometry import box

from .aoi import AOI
from .atomic import atomic_output
from .errors import EngineError
from .events import Reporter, StageResult
from .imagery import open_raster
from .model_package import ModelInfo, onnx_path, read_info
from .styles import styles_for, write_styles
from .vectorize import landcover_layers, pixel_size_m, tree_layers, write_gpkg

BATCH_SIZE = 8
RESOLUTION_TOLERANCE = 0.25  # warn when the imagery's pixel size is off the model's by more


@dataclass(frozen=True)
class PredictParams:
    model: Path
    imagery: Path
    out: Path
    aoi: AOI | None = None


@dataclass(frozen=True)
class Tile:
    """A model tile at (row, col) of the AOI window; its centre core lands at the same place."""

    row: int
    col: int
    size: int
    overlap: int

    @property
    def core(self) -> tuple[slice, slice]:
        """The kept part, in tile coordinates."""
        keep = slice(self.overlap, self.size - self.overlap)
        return keep, keep


def tile_origins(length: int, size: int, overlap: int) -> list[int]:
    """Tile starts along one axis so that the tiles' cores (size - 2*overlap) exactly tile 0..length."""
    stride = size - 2 * overlap
    return [k * stride - overlap for k in range(math.ceil(length / stride))]


def plan_tiles(height: int, width: int, size: int, overlap: int, aoi_mask: np.ndarray) -> list[Tile]:
    """All tiles over a window, minus those whose core has no pixel in the AOI."""
    stride = size - 2 * overlap
    tiles = []
    for r in tile_origins(height, size, overlap):
        for c in tile_origins(width, size, overlap):
            r0, c0 = r + overlap, c + overlap
            if aoi_mask[r0:r0 + stride, c0:c0 + stride].any():
                tiles.append(Tile(r, c, size, overlap))
    return tiles


# --- model -----------------------------------------------------------------

def open_session(model_file: Path, reporter: Reporter):
    """An onnxruntime session on CUDA when it is there, else the CPU; returns (session, provider)."""
    import onnxruntime as ort

    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    try:
        session = ort.InferenceSession(str(model_file), options, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise EngineError("BAD_MODEL", f"onnxruntime cannot load {model_file}: {exc}",
                          "Give an ONNX model made by `landcover train` (or a Deepness model).") from None
    provider = session.get_providers()[0]  # what actually runs: onnxruntime-gpu falls back silently
    reporter.log(f"onnxruntime runs the model on {provider}")
    if "CUDAExecutionProvider" in wanted and provider != "CUDAExecutionProvider":
        reporter.log("CUDA is installed but unusable; running on the CPU (slower).", level="warning")
    return session, provider


def normalise(raw: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Raw band values (bands, h, w) -> the model's input scale: ((raw / scale) - mean) / std."""
    x = raw.astype(np.float32) / np.float32(info.input_scale)
    bands = raw.shape[0]
    mean = np.asarray(info.mean or [0.0] * bands, np.float32)[:, None, None]
    std = np.asarray(info.std or [1.0] * bands, np.float32)[:, None, None]
    return (x - mean) / std


def check_output(shape: tuple[int, ...], info: ModelInfo) -> None:
    """The output must be (n, C, tile, tile) with C matching the task."""
    channels = 2 if info.task == "trees" else len(info.class_names)
    if len(shape) != 4 or shape[1] != channels or shape[2:] != (info.tile_size, info.tile_size):
        raise EngineError("BAD_MODEL", f"The model returns {tuple(shape)} for {info.tile_size} px tiles; "
                          f"a {info.task} model must return (n, {channels}, {info.tile_size}, {info.tile_size}).",
                          "Use a model made by `landcover train`, or fix its class_names metadata.")


def _reduce(probs: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Model output (n, C, h, w) -> what we keep: the class index (landcover) or
    crown probability and centre heatmap (trees)."""
    if info.task == "trees":
        return probs[:, :2].astype(np.float32)
    return np.argmax(probs, axis=1)[:, None].astype(np.int16)


# --- imagery ---------------------------------------------------------------

def check_imagery(src, info: ModelInfo, reporter: Reporter) -> None:
    """Bands and resolution against what the model was trained on."""
    if src.crs is None:
        raise EngineError("BAD_IMAGERY", f"{src.name} has no coordinate reference system.",
                          "Give a georeferenced raster (GeoTIFF with a CRS, or add a .prj/.aux.xml).")
    if src.count < info.band_count:
        raise EngineError("BAD_IMAGERY_BANDS",
                          f"The model reads {info.band_count} bands but {src.name} has {src.count}.",
                          f"Give imagery with at least {info.band_count} bands in the model's order, "
                          "or a model trained on this imagery.")
    if src.count > info.band_count:
        reporter.log(f"Using bands 1-{info.band_count} of {src.count}, as the model was trained.")
    size = pixel_size_m(src.transform, src.crs, src.height, src.width)
    if abs(size / info.resolution_m - 1) > RESOLUTION_TOLERANCE:
        reporter.log(f"The imagery's pixels are {size:.3g} m but the model was trained at "
                     f"{info.resolution_m:.3g} m; results may be poor. Fetch imagery at "
                     f"{info.resolution_m:.3g} m (--gsd) or use a model for this resolution.", level="warning")


def aoi_window(src, aoi: AOI | None) -> tuple[Window, np.ndarray]:
    """The imagery window covering the AOI and the mask of its pixels inside the AOI polygon."""
    full = Window(0, 0, src.width, src.height)
    if aoi is None:
        return full, np.ones((src.height, src.width), bool)
    geom = aoi.to_crs(src.crs.to_wkt()).geometry
    inside = geom.intersection(box(*src.bounds))
    if inside.is_empty or inside.area == 0:
        raise EngineError("AOI_OUTSIDE_IMAGERY", f"The AOI {aoi.bounds} ({aoi.crs}) does not overlap {src.name}.",
                          "Draw the AOI over the imagery, or check the AOI's CRS (--aoi-crs).")
    w = from_bounds(*inside.bounds, transform=src.transform)
    col0, row0 = max(0, math.floor(w.col_off + 1e-6)), max(0, math.floor(w.row_off + 1e-6))
    col1 = min(src.width, math.ceil(w.col_off + w.width - 1e-6))
    row1 = min(src.height, math.ceil(w.row_off + w.height - 1e-6))
    window = Window(col0, row0, max(col1 - col0, 1), max(row1 - row0, 1))
    mask = geometry_mask([geom], out_shape=(int(window.height), int(window.width)),
                         transform=src.window_transform(window), invert=True)
    if not mask.any():
        raise EngineError("AOI_OUTSIDE_IMAGERY", f"The AOI covers no whole pixel of {src.name}.",
                          "Draw a larger AOI over the imagery.")
    return window, mask


def read_tile(src, window: Window, tile: Tile, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw bands (bands, size, size) and their validity, read around the tile.
    Beyond the AOI window the real imagery is read (context); beyond the raster, padding."""
    row, col = int(window.row_off) + tile.row, int(window.col_off) + tile.col
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + tile.size, src.height), min(col + tile.size, src.width)
    raw = np.zeros((bands, tile.size, tile.size), src.dtypes[0])
    ok = np.zeros((tile.size, tile.size), bool)
    if r1 > r0 and c1 > c0:
        part = Window(c0, r0, c1 - c0, r1 - r0)
        indexes = list(range(1, bands + 1))
        at = np.s_[r0 - row:r1 - row, c0 - col:c1 - col]
        raw[(slice(None), *at)] = src.read(indexes, window=part)
        ok[at] = (src.read_masks(indexes, window=part) > 0).all(axis=0)  # nodata in any band
    return raw, ok


def _batches(tiles: list[Tile], size: int) -> Iterator[list[Tile]]:
    for i in range(0, len(tiles), size):
        yield tiles[i:i + size]


def predict_window(session, src, info: ModelInfo, window: Window, aoi_mask: np.ndarray,
                   reporter: Reporter) -> tuple[np.ndarray, np.ndarray, int]:
    """Run the model over the window, tile by tile; returns (values, valid, tiles run).
    values: (1, h, w) class indices (landcover) or (2, h, w) crown prob + heatmap (trees);
    valid: pixels inside the AOI with imagery data."""
    if info.tile_size - 2 * info.tile_overlap <= 0:
        raise EngineError("BAD_MODEL", f"Tile overlap {info.tile_overlap} leaves nothing of a {info.tile_size} px tile.",
                          "Fix tile_overlap in the model's metadata (less than a quarter of the tile).")
    height, width = aoi_mask.shape
    channels, dtype = (2, np.float32) if info.task == "trees" else (1, np.int16)
    values = np.zeros((channels, height, width), dtype)
    valid = np.zeros((height, width), bool)
    model_input = session.get_inputs()[0]
    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    tiles = plan_tiles(height, width, info.tile_size, info.tile_overlap, aoi_mask)
    done = 0
    reporter.progress("predict", 0, len(tiles), "tiles")
    for batch in _batches(tiles, fixed_batch or BATCH_SIZE):
        reads = [read_tile(src, window, t, info.band_count) for t in batch]
        x = np.stack([np.where(ok, normalise(raw, info), 0.0) for raw, ok in reads]).astype(np.float32)
        if fixed_batch and len(batch) < fixed_batch:  # a model exported with a fixed batch size
            x = np.concatenate([x, np.zeros((fixed_batch - len(batch), *x.shape[1:]), np.float32)])
        probs = session.run(None, {model_input.name: x})[0][:len(batch)]
        check_output(probs.shape, info)
        out = _reduce(probs, info)
        for tile, result, (_, ok) in zip(batch, out, reads):
            write_core(values, valid, aoi_mask, tile, result, ok)
        done += len(batch)
        reporter.progress("predict", done, len(tiles), "tiles")
    return values, valid, len(tiles)


def write_core(values: np.ndarray, valid: np.ndarray, aoi_mask: np.ndarray, tile: Tile,
               result: np.ndarray, ok: np.ndarray) -> None:
    """Write a tile's centre into the output window (clipped at the window's edges)."""
    height, width = valid.shape
    ys, xs = tile.core
    r0, c0 = tile.row + ys.start, tile.col + xs.start
    r1, c1 = min(tile.row + ys.stop, height), min(tile.col + xs.stop, width)
    src = np.s_[ys.start:ys.start + r1 - r0, xs.start:xs.start + c1 - c0]
    values[:, r0:r1, c0:c1] = result[(slice(None), *src)]
    valid[r0:r1, c0:c1] = ok[src] & aoi_mask[r0:r1, c0:c1]


# --- the stage -------------------------------------------------------------

def predict(params: PredictParams, reporter: Reporter) -> StageResult:
    """Predict over the imagery (or its AOI) and write the result GeoPackage with styles."""
    started = time.monotonic()
    info = read_info(params.model)
    session, provider = open_session(onnx_path(params.model), reporter)
    with open_raster(params.imagery) as src:
        check_imagery(src, info, reporter)
        window, aoi_mask = aoi_window(src, params.aoi)
        values, valid, tiles = predict_window(session, src, info, window, aoi_mask, reporter)
        transform, crs = src.window_transform(window), src.crs
    reporter.log("Vectorizing the predictions")
    if info.task == "trees":
        layers = tree_layers(values[0], values[1], valid, transform, crs, info.threshold)
        crowns = layers[0].rows
        summary = {"crowns": len(crowns), "canopy_m2": round(sum(r["area_m2"] for _, r in crowns), 2)}
    else:
        layers = landcover_layers(values[0], valid, transform, crs, info.class_names)
        summary = {"hectares": {r["class"]: r["hectares"] for _, r in layers[1].rows},
                   "polygons": len(layers[0].rows)}
    with atomic_output(params.out) as tmp:
        write_gpkg(tmp, layers, crs)
        write_styles(tmp, styles_for(info))
    summary |= {"provider": provider, "tiles": tiles, "seconds": round(time.monotonic() - started, 2)}
    return StageResult(outputs={"gpkg": str(params.out)}, summary=summary)
