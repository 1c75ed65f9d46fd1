"""Windowed raster writing: memory stays flat however large the AOI.

- `SourceMosaic`: the source's pixels on its own grid (EPSG:3857 for XYZ, the
  request CRS for WMS) in a temporary tiled GeoTIFF, each downloaded piece
  written as it arrives; blocks never written stay empty (alpha 0).
- `write_windowed`: the output GeoTIFF (tiled, deflate, internal mask,
  overviews) filled window by window from a reader function, e.g. a
  WarpedVRT over the SourceMosaic that reprojects each window on the fly.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.windows import Window

from ..atomic import atomic_output
from ..errors import EngineError

WINDOW = 1024  # output pixels per window side: 4 bands x 1024^2 = 4 MB in flight
GDAL_CACHE_MB = 64  # GDAL's block cache: bounded, so memory does not grow with the file
RGBA = (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha)


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: where a raster's pixels lie."""

    crs: str
    transform: Affine
    width: int
    height: int


def gdal_env() -> rasterio.Env:
    # An internal mask travels with the file through the atomic rename; a .msk sidecar would not.
    # No multithreaded compression: its queue of blocks waiting for a busy CPU grows memory.
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB, GDAL_TIFF_INTERNAL_MASK=True)


class SourceMosaic:
    """A temporary RGBA GeoTIFF on `grid`, written piece by piece (call from one thread).
    Opened for update, so that pieces already written can be warped while others download."""

    def __init__(self, path: Path, grid: Grid, block: int) -> None:
        self.path, self.grid = path, grid
        profile = {"driver": "GTiff", "count": 4, "dtype": "uint8", "width": grid.width, "height": grid.height,
                   "crs": grid.crs, "transform": grid.transform, "tiled": True, "blockxsize": block,
                   "blockysize": block, "compress": "deflate", "zlevel": 1, "BIGTIFF": "YES", "SPARSE_OK": True}
        self.dataset = rasterio.open(path, "w+", **profile)
        self.dataset.colorinterp = list(RGBA)  # the alpha band weights the warp: no dark seams at gaps

    def write(self, rgba: np.ndarray, row: int, col: int) -> None:
        self.dataset.write(rgba, window=Window(col, row, rgba.shape[2], rgba.shape[1]))

    def close(self) -> None:
        self.dataset.close()


def windows(width: int, height: int, size: int = 0, rows: int = 0) -> Iterator[Window]:
    """Windows of `size` (default WINDOW) columns and `rows` (default: as many) rows, row by row."""
    size = size or WINDOW
    rows = rows or size
    for row in range(0, height, rows):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(rows, height - row))


Reader = Callable[[Window], tuple[np.ndarray, "np.ndarray | None"]]
Writer = Callable[[Window, np.ndarray, "np.ndarray | None"], None]


@contextmanager
def windowed_output(out: Path, profile: dict[str, Any], *, colorinterp: Iterable[ColorInterp] | None,
                    empty_error: EngineError | None = None) -> Iterator[Writer]:
    """Open `out` for writing window by window: yields `write(window, bands, mask or None)`;
    a mask (0 = no data) becomes an internal mask band. On leaving, the overviews are
    built and the file renamed into place (atomically: nothing on an exception).
    Raises `empty_error` (writing nothing) when every mask was 0."""
    width, height = profile["width"], profile["height"]
    # Deflate level 1: several times faster than the default 6, files ~10% larger.
    profile = {**profile, "driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256,
               "compress": "deflate", "zlevel": 1, "interleave": "pixel", "BIGTIFF": "IF_SAFER"}
    profile.pop("photometric", None)  # e.g. YCbCr from a JPEG-compressed source: not valid with deflate
    factors = [2 ** i for i in range(1, 12) if max(width, height) / 2 ** i >= 128]
    any_data = [False]
    with gdal_env(), rasterio.Env(ZLEVEL_OVERVIEW=1), atomic_output(out) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            def write(window: Window, data: np.ndarray, mask: np.ndarray | None) -> None:
                dst.write(data, window=window)
                if mask is not None:
                    dst.write_mask((mask > 0).view(np.uint8) * np.uint8(255), window=window)
                    any_data[0] = any_data[0] or bool(mask.any())
                else:
                    any_data[0] = True

            yield write
            if not any_data[0] and empty_error is not None:
                raise empty_error
            if colorinterp is not None:
                dst.colorinterp = list(colorinterp)
            if factors:
                dst.build_overviews(factors, Resampling.average)
                dst.update_tags(ns="rio_overview", resampling="average")


def write_windowed(out: Path, profile: dict[str, Any], read: Reader, *, colorinterp: Iterable[ColorInterp] | None,
                   empty_error: EngineError | None = None,
                   progress: Callable[[int, int], None] | None = None) -> None:
    """Write `out` atomically (see `windowed_output`), filled by `read(window) -> (bands, mask or None)`."""
    todo = list(windows(profile["width"], profile["height"]))
    with windowed_output(out, profile, colorinterp=colorinterp, empty_error=empty_error) as write:
        for i, window in enumerate(todo, start=1):
            write(window, *read(window))
            if progress:
                progress(i, len(todo))


def aligned_grid(bounds: tuple[float, float, float, float], crs: str, res: float, max_pixels: int) -> Grid:
    """A grid of `res` covering `bounds` (in `crs`), its edges on multiples of
    `res` so that fetches of overlapping AOIs share pixel edges."""
    minx, miny, maxx, maxy = bounds
    minx, miny = round(math.floor(minx / res) * res, 9), round(math.floor(miny / res) * res, 9)  # no 0.30000000000000004
    width = max(1, math.ceil(round((maxx - minx) / res, 6)))
    height = max(1, math.ceil(round((maxy - miny) / res, 6)))
    if width * height > max_pixels:
        raise EngineError("TOO_LARGE", f"The AOI at {res:g} m per pixel is {width} x {height} pixels, more than "
                          f"{max_pixels:,}.", "Draw a smaller area or use a larger --gsd.")
    return Grid(crs, Affine(res, 0, minx, 0, -res, round(miny + height * res, 9)), width, height)
