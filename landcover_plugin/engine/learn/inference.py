"""A model over imagery, tile by tile, with onnxruntime: the prediction raster.

The AOI window of the imagery is cut into tiles of the model's tile size that
overlap by `tile_overlap` pixels on each side; only each tile's centre is kept,
so every output pixel comes from a tile that saw its neighbourhood (no seams).
The result is a uint8 GeoTIFF (class index, or probabilities x 250; 255 outside
the AOI or without data), written one row of tiles at a time. No TensorFlow
here: onnxruntime alone, in a process without TF (docs/DESIGN.md).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.windows import Window, from_bounds
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from ...contract.names import NODATA, RESOLUTION_TOLERANCE
from ..errors import EngineError
from ..events import Reporter
from ..imagery.aoi import AOI
from ..imagery.raster import common_dtype, read_bands, reading
from ..vector.vectorize import Layer, areas_m2, pixel_size_m
from .model_package import ModelInfo


BATCH_SIZE = 8


RANGE_TOLERANCE = 1.5  # imagery values up to this much beyond the model's input scale are still its range


PROB_SCALE = 250.0  # trees: probabilities are stored as round(p * 250) in uint8 (255 = outside)


CHIP_MIN_VALID = 0.5  # classification: chips with less valid imagery are not classified (as dataset.py)


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


@dataclass(frozen=True)
class AoiPixels:
    """The AOI polygon in the window's pixel coordinates (x = column, y = row):
    masks are rasterized per tile, never for the whole window (memory)."""

    geometry: BaseGeometry | None  # None: the whole window

    def covers(self, r0: int, c0: int, r1: int, c1: int) -> bool:
        return self.geometry is None or self.geometry.intersects(box(c0, r0, c1, r1))

    def mask(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """Pixels of rows r0..r1, columns c0..c1 whose centre is inside the AOI."""
        if self.geometry is None:
            return np.ones((r1 - r0, c1 - c0), bool)
        return geometry_mask([self.geometry], out_shape=(r1 - r0, c1 - c0),
                             transform=Affine.translation(c0, r0), invert=True)


def plan_tiles(height: int, width: int, size: int, overlap: int, aoi: AoiPixels) -> list[Tile]:
    """All tiles over a window, row by row, minus those whose core misses the AOI."""
    stride = size - 2 * overlap
    tiles = []
    for r in tile_origins(height, size, overlap):
        for c in tile_origins(width, size, overlap):
            if aoi.covers(r + overlap, c + overlap, r + overlap + stride, c + overlap + stride):
                tiles.append(Tile(r, c, size, overlap))
    return tiles


def session_options(threads: int = 0):
    """onnxruntime's options as predict runs a model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    # Threads sleep rather than spin between ops: on a machine doing other work too (a
    # laptop, a shared server) spinning threads steal the cores the busy ones need;
    # measured 10-25% more tiles/s on the bench's U-Net with the cores shared.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(model_file: Path | bytes, reporter: Reporter, threads: int = 0):
    """An onnxruntime session (on a model file, or a model's bytes) on CUDA when it is there,
    else the CPU; returns (session, provider)."""
    import onnxruntime as ort

    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    options = session_options(threads)
    try:
        session = ort.InferenceSession(model_file if isinstance(model_file, bytes) else str(model_file), options,
                                       providers=wanted)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        name = model_file if isinstance(model_file, Path) else "the model"
        raise EngineError("BAD_MODEL", f"onnxruntime cannot load {name}: {exc}",
                          "Give an ONNX model made by `landcover train` (or a Deepness model).") from None
    provider = session.get_providers()[0]  # what actually runs: onnxruntime-gpu falls back silently
    reporter.log(f"onnxruntime runs the model on {provider}")
    if "CUDAExecutionProvider" in wanted and provider != "CUDAExecutionProvider":
        reporter.log("CUDA is installed but unusable; running on the CPU (slower).", level="warning")
    return session, provider


def tiled_model(model_file: Path, info: ModelInfo, threads: int = 0,
                tile_size: int = 0) -> tuple[Path | bytes, ModelInfo]:
    """The model (its file, or a copy's bytes) at the tile size predict runs, and its info with
    that size. `tile_size` 0: THROUGHPUT_TILE where the model's own is smaller and it runs
    larger tiles (segmentation models; learn/tile_size.py), else its own. The overlap stays."""
    import onnxruntime as ort

    from .tile_size import THROUGHPUT_TILE, resized_model

    size = tile_size or max(info.tile_size, THROUGHPUT_TILE)
    if size == info.tile_size:
        return model_file, info
    resizable = info.task in ("landcover", "buildings", "trees") and not info.detector
    check = lambda b: ort.InferenceSession(b, session_options(threads), providers=["CPUExecutionProvider"])  # noqa: E731
    freed = resized_model(model_file, info.tile_size, size, info.band_count, check) if resizable else None
    if freed is None and tile_size:
        raise EngineError("BAD_PARAMS", f"--tile-size {tile_size}: this model runs only its own "
                          f"{info.tile_size} px tiles.", f"Leave out --tile-size, or give {info.tile_size}.")
    return (freed, replace(info, tile_size=size)) if freed is not None else (model_file, info)


def normalise(raw: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Raw band values (bands, h, w) -> the model's input scale: ((raw / scale) - mean) / std."""
    x = raw.astype(np.float32) / np.float32(info.input_scale)
    bands = raw.shape[0]
    mean = np.asarray(info.mean or [0.0] * bands, np.float32)[:, None, None]
    std = np.asarray(info.std or [1.0] * bands, np.float32)[:, None, None]
    return (x - mean) / std


def output_channels(info: ModelInfo) -> int:
    """Landcover, buildings, classification: one per class. Trees: crown probability,
    centre heatmap, and a third channel (probability that a crown pixel is dead) when
    the classes include "dead"."""
    if info.task == "trees":
        return 3 if "dead" in info.class_names else 2
    return len(info.class_names)


def check_output(shape: tuple[int, ...], info: ModelInfo) -> None:
    """The output must be (n, C, tile, tile) with C matching the task ((n, C) for classification;
    a peer's one sigmoid channel for [background, class])."""
    channels = output_channels(info)
    if info.task == "classification":
        if len(shape) != 2 or shape[1] != channels:
            raise EngineError("BAD_MODEL", f"The model returns {tuple(shape)}; a classification model must "
                              f"return (n, {channels}): one probability per class and chip.",
                              "Use a model made by `landcover train --task classification`.")
        return
    sigmoid = info.task != "trees" and channels == 2 and len(shape) == 4 and shape[1] == 1
    if len(shape) != 4 or (shape[1] != channels and not sigmoid) or shape[2:] != (info.tile_size, info.tile_size):
        raise EngineError("BAD_MODEL", f"The model returns {tuple(shape)} for {info.tile_size} px tiles; "
                          f"a {info.task} model must return (n, {channels}, {info.tile_size}, {info.tile_size}).",
                          "Use a model made by `landcover train`, or fix its class_names metadata.")


def encode(probs: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Model output (n, C, h, w) -> the uint8 prediction raster's bands: the class index
    (landcover) or probabilities x PROB_SCALE (trees); NODATA is left for outside."""
    if info.task == "trees":
        return np.rint(np.clip(probs, 0.0, 1.0) * PROB_SCALE).astype(np.uint8)
    if probs.shape[1] == 1:  # a peer's sigmoid: the class where it reaches seg_thresh (Deepness's rule)
        return ((probs >= info.seg_thresh) & (probs > 0)).astype(np.uint8)
    if info.seg_thresh > 0:  # the peers' rule: a probability below it counts as 0 (all 0: class 0)
        probs = np.where(probs < info.seg_thresh, 0.0, probs)
    return np.argmax(probs, axis=1)[:, None].astype(np.uint8)


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


def sample_max(src, bands: int, grid: int = 4, size: int = 256) -> float:
    """The largest valid value in grid x grid windows spread over the raster: enough to
    tell 0..1 from 0..255 from 0..65535 without reading the whole raster (NaN: no data)."""
    rows = sorted({int(r) for r in np.linspace(0, max(src.height - size, 0), grid)})
    cols = sorted({int(c) for c in np.linspace(0, max(src.width - size, 0), grid)})
    tops = []
    for r in rows:
        for c in cols:
            window = Window(c, r, min(size, src.width - c), min(size, src.height - r))
            with reading(src.name):
                data = np.ma.masked_invalid(read_bands(src, list(range(1, bands + 1)), window=window, masked=True))
            if data.count():
                tops.append(float(data.max()))
    return max(tops, default=float("nan"))


def value_range(top: float, integer: bool = False) -> str:
    """Which kind of values reach `top`: "0..1" (reflectance-like floats), "0..255"
    (8-bit) or "wider" (10- to 16-bit sensors, physical units). Integers are never 0..1."""
    if top <= 1.0 * RANGE_TOLERANCE and not integer:
        return "0..1"
    return "0..255" if top <= 255.0 else "wider"


def input_factor(dtype: str, top: float, scale: float) -> float:
    """What the imagery's raw values are multiplied by to be in the model's input range
    0..`scale` (1: they are); `top` is the imagery's largest value. Rescales only
    between 0..1 floats and 8-bit values, where the mapping is unambiguous; raises
    IMAGERY_RANGE for any other mismatch: the model would run on values it never
    saw and give plausible-looking garbage (1 crown instead of 70)."""
    if not top > 0:  # no valid data, or all zero: nothing to judge by
        return 1.0
    imagery, model = value_range(top, np.dtype(dtype).kind in "iu"), value_range(scale)
    if imagery == model:
        return 1.0
    if imagery == "0..1" and scale == 255.0:
        return 255.0
    if imagery == "0..255" and model == "0..1":
        return 1.0 / 255.0
    raise EngineError("IMAGERY_RANGE", f"The imagery holds {dtype} values up to {top:g}, but the model was trained "
                      f"on values 0..{scale:g}: its results would be wrong.",
                      f"Convert the imagery to the model's range, e.g. gdal_translate -ot "
                      f"{'Byte' if model == '0..255' else 'Float32'} -scale 0 {top:g} 0 {scale:g} IN.tif OUT.tif, "
                      "or use a model trained on imagery like this.")


def fit_input_scale(src, info: ModelInfo, reporter: Reporter) -> ModelInfo:
    """The model's info with its input scale adapted to the imagery's value range (see input_factor)."""
    dtype = common_dtype(src, list(range(1, info.band_count + 1)))
    top = 255.0 if dtype == "uint8" else sample_max(src, info.band_count)  # 8-bit: no need to read
    factor = input_factor(dtype, top, info.input_scale)
    if factor != 1.0:
        reporter.log(f"The imagery is {dtype} with values up to {top:g}; the model was trained on values "
                     f"0..{info.input_scale:g}: the imagery's values are multiplied by {factor:.6g} for it.")
    elif top > info.input_scale * RANGE_TOLERANCE:
        reporter.log(f"The imagery's values reach {top:g}, beyond the 0..{info.input_scale:g} the model was "
                     "trained on: results may be poor.", level="warning")
    return replace(info, input_scale=info.input_scale / factor)


def aoi_window(src, aoi: AOI | None) -> tuple[Window, AoiPixels]:
    """The imagery window covering the AOI and the AOI polygon in that window's pixels."""
    full = Window(0, 0, src.width, src.height)
    if aoi is None:
        return full, AoiPixels(None)
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
    inverse = ~src.window_transform(window)
    pixels = shapely.transform(geom, lambda xy: np.column_stack(inverse * (xy[:, 0], xy[:, 1])))
    shapely.prepare(pixels)
    aoi_px = AoiPixels(pixels)
    # Rasterized only when tiny (a big AOI holds pixel centres; its mask would cost memory).
    if pixels.area < 16 and not aoi_px.mask(0, 0, int(window.height), int(window.width)).any():
        raise EngineError("AOI_OUTSIDE_IMAGERY", f"The AOI covers no whole pixel of {src.name}.",
                          "Draw a larger AOI over the imagery.")
    return window, aoi_px


def read_tile(src, window: Window, tile: Tile, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw bands (bands, size, size) and their validity, read around the tile.
    Beyond the AOI window the real imagery is read (context); beyond the raster, padding."""
    row, col = int(window.row_off) + tile.row, int(window.col_off) + tile.col
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + tile.size, src.height), min(col + tile.size, src.width)
    raw = np.zeros((bands, tile.size, tile.size), common_dtype(src, list(range(1, bands + 1))))
    ok = np.zeros((tile.size, tile.size), bool)
    if r1 > r0 and c1 > c0:
        part = Window(c0, r0, c1 - c0, r1 - r0)
        indexes = list(range(1, bands + 1))
        at = np.s_[r0 - row:r1 - row, c0 - col:c1 - col]
        with reading(src.name):
            raw[(slice(None), *at)] = read_bands(src, indexes, window=part)
            ok[at] = (src.read_masks(indexes, window=part) > 0).all(axis=0)  # nodata in any band
    return raw, ok


def read_batch(src, window: Window, batch: list[Tile], info: ModelInfo,
               aoi: AoiPixels) -> tuple[np.ndarray, list[np.ndarray]]:
    """The model input (n, bands, size, size) of a batch and each tile's valid core
    (imagery data inside the AOI). Runs in the prefetch thread."""
    xs, oks = [], []
    for t in batch:
        raw, ok = read_tile(src, window, t, info.band_count)
        xs.append(np.where(ok, normalise(raw, info), 0.0))
        ys, cs = t.core
        core = ok[ys, cs] & aoi.mask(t.row + ys.start, t.col + cs.start, t.row + ys.stop, t.col + cs.stop)
        oks.append(core)
    return np.stack(xs).astype(np.float32), oks


def predict_strips(session, src, info: ModelInfo, window: Window, aoi: AoiPixels, tiles: list[Tile],
                   reporter: Reporter, batch_size: int = BATCH_SIZE) -> Iterator[tuple[int, np.ndarray]]:
    """The uint8 prediction (see `encode`) one row of tiles at a time: (first row, strip of
    (channels, stride or fewer rows, window width)), top to bottom. A row of tiles that
    misses the AOI yields no strip; the raster is never held whole."""
    height, width = int(window.height), int(window.width)
    stride, overlap = info.tile_size - 2 * info.tile_overlap, info.tile_overlap
    channels = output_channels(info) if info.task == "trees" else 1
    row, strip = None, np.empty(0, np.uint8)
    for batch, probs, oks in run_batches(session, src, info, window, aoi, tiles, batch_size, reporter):
        for tile, values, ok in zip(batch, encode(probs, info), oks):
            if tile.row != row:
                if row is not None:
                    yield row + overlap, strip
                row = tile.row
                strip = np.full((channels, min(stride, height - (row + overlap)), width), NODATA, np.uint8)
            ys, xs = tile.core
            c0 = tile.col + overlap
            h, w = strip.shape[1], min(stride, width - c0)
            strip[:, :, c0:c0 + w] = np.where(ok[:h, :w], values[:, ys, xs][:, :h, :w], NODATA)
    if row is not None:
        yield row + overlap, strip


def prediction_profile(height: int, width: int, channels: int, stride: int, crs, transform) -> dict:
    """A tiled uint8 GeoTIFF whose blocks align with the tile cores when they can."""
    block = next((b for b in (256, 128, 64, 32, 16) if stride % b == 0), 256)
    return {"driver": "GTiff", "height": height, "width": width, "count": channels, "dtype": "uint8",
            "nodata": NODATA, "crs": crs, "transform": transform, "tiled": True, "blockxsize": block,
            "blockysize": block, "compress": "deflate", "zlevel": 1}


def run_model(session, name: str, x: np.ndarray) -> np.ndarray:
    """The model's first output on a batch. Some exports (Deepness's test models among them)
    run one tile at a time whatever their input shape says: a batch they fail on is run
    tile by tile before the model is called broken."""
    try:
        return session.run(None, {name: x})[0]
    except Exception as exc:  # onnxruntime raises its own untyped errors
        if len(x) > 1:
            return np.concatenate([run_model(session, name, x[i:i + 1]) for i in range(len(x))])
        raise EngineError("BAD_MODEL", f"onnxruntime cannot run the model on a tile: {exc}",
                          "Check that the model takes (batch, bands, tile, tile) float32 input, "
                          "as Deepness and landcover feed it.") from None


def run_batches(session, src, info: ModelInfo, window: Window, aoi: AoiPixels, tiles: list[Tile],
                batch_size: int, reporter: Reporter):
    """Yield (tiles, model output, valid cores) batch by batch; the next batch is read
    in a thread while the model runs on the current one."""
    model_input = session.get_inputs()[0]
    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    step = fixed_batch or batch_size
    batches = [tiles[i:i + step] for i in range(0, len(tiles), step)]
    reporter.progress("predict", 0, len(tiles), "tiles")
    done = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(read_batch, src, window, batches[0], info, aoi) if batches else None
        for k, batch in enumerate(batches):
            x, oks = ahead.result()
            if k + 1 < len(batches):
                ahead = pool.submit(read_batch, src, window, batches[k + 1], info, aoi)
            if fixed_batch and len(batch) < fixed_batch:  # a model exported with a fixed batch size
                x = np.concatenate([x, np.zeros((fixed_batch - len(batch), *x.shape[1:]), np.float32)])
            probs = run_model(session, model_input.name, x)[:len(batch)]
            if not info.detector:  # a detector's outputs are checked as they are decoded
                probs = probs[:, None] if probs.ndim == 3 else probs  # a peer's (n, h, w) sigmoid
                check_output(probs.shape, info)
            yield batch, probs, oks
            done += len(batch)
            reporter.progress("predict", done, len(tiles), "tiles")


def classify_chips(session, src, info: ModelInfo, window: Window, aoi: AoiPixels, reporter: Reporter,
                   batch_size: int = BATCH_SIZE) -> tuple[list[Layer], int]:
    """Classification: the window cut into the model's chips (side by side, no overlap);
    each chip with enough valid imagery becomes a polygon (clipped to the window) with
    its class and probability: layer `chip_classes`, and `class_stats` (hectares)."""
    size = info.tile_size
    height, width = int(window.height), int(window.width)
    transform = src.window_transform(window)
    tiles = plan_tiles(height, width, size, 0, aoi)
    chips = Layer("chip_classes", "Polygon", {"class": "str", "probability": "float"})
    for batch, probs, oks in run_batches(session, src, info, window, aoi, tiles, batch_size, reporter):
        for tile, p, ok in zip(batch, probs, oks):
            if ok.mean() < CHIP_MIN_VALID:
                continue
            r1, c1 = min(tile.row + size, height), min(tile.col + size, width)
            (x0, y0), (x1, y1) = transform * (tile.col, tile.row), transform * (c1, r1)
            k = int(np.argmax(p))
            chips.rows.append((box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)),
                               {"class": info.class_names[k], "probability": round(float(p[k]), 4)}))
    m2 = areas_m2([g for g, _ in chips.rows], src.crs) if chips.rows else np.zeros(0)
    hectares = {n: 0.0 for n in info.class_names}
    for (_, row), area in zip(chips.rows, m2):
        hectares[row["class"]] += float(area) / 1e4
    total = sum(hectares.values())
    stats = Layer("class_stats", None, {"class": "str", "hectares": "float", "share_pct": "float"},
                  [(None, {"class": n, "hectares": round(h, 6), "share_pct": round(100 * h / total, 3) if total else 0.0})
                   for n, h in hectares.items()])
    return [chips, stats], len(tiles)


def model_tiles(info: ModelInfo, window: Window, aoi: AoiPixels) -> list[Tile]:
    """The model's tiles over the window (see plan_tiles), or BAD_MODEL when its overlap leaves no core."""
    if info.tile_size - 2 * info.tile_overlap <= 0:
        raise EngineError("BAD_MODEL", f"Tile overlap {info.tile_overlap} leaves nothing of a {info.tile_size} px tile.",
                          "Fix tile_overlap in the model's metadata (less than a quarter of the tile).")
    return plan_tiles(int(window.height), int(window.width), info.tile_size, info.tile_overlap, aoi)


def predict_to_raster(session, src, info: ModelInfo, window: Window, aoi: AoiPixels, path: Path,
                      reporter: Reporter, batch_size: int = BATCH_SIZE) -> int:
    """Run the model over the window tile by tile and write the uint8 prediction raster
    at `path` (see `encode`) one row of tiles at a time; returns the number of tiles run.
    The next batch is read in a thread while the model runs on the current one."""
    height, width = int(window.height), int(window.width)
    stride = info.tile_size - 2 * info.tile_overlap
    channels = output_channels(info) if info.task == "trees" else 1
    tiles = model_tiles(info, window, aoi)
    profile = prediction_profile(height, width, channels, stride, src.crs, src.window_transform(window))
    with rasterio.open(path, "w", **profile) as dst:
        for r0, strip in predict_strips(session, src, info, window, aoi, tiles, reporter, batch_size):
            dst.write(strip, window=Window(0, r0, width, strip.shape[1]))
    return len(tiles)
