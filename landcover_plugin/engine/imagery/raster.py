"""Small helpers on local rasters shared by the stages."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio

from ..atomic import atomic_output
from ..errors import EngineError


def open_raster(path: Path | str):
    """rasterio.open with a user-facing error for a missing or unreadable file."""
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise EngineError("BAD_IMAGERY", f"Cannot read imagery {path}: {exc}",
                          "Give a raster file GDAL can open (GeoTIFF, VRT, JPEG2000, ...).") from None


def common_dtype(src, indexes: list[int]) -> str:
    """The one data type that holds every band read (Float32 for a Float32 + Int16 stack)."""
    return np.result_type(*(src.dtypes[i - 1] for i in indexes)).name


def read_bands(src, indexes: list[int], **kwargs) -> np.ndarray:
    """`src.read(indexes, **kwargs)` for any stack: rasterio refuses to read bands of
    different data types together (a VRT of separate Landsat files mixes Float32 and
    Int16), so those are read one by one into their common type."""
    if len({src.dtypes[i - 1] for i in indexes}) == 1:
        return src.read(indexes, **kwargs)
    dtype = common_dtype(src, indexes)
    bands = [src.read(i, out_dtype=dtype, **kwargs) for i in indexes]
    return np.ma.stack(bands) if kwargs.get("masked") else np.stack(bands)


@contextmanager
def reading(path: Path | str) -> Iterator[None]:
    """Report GDAL's failure to read pixels (a truncated or corrupt file, which opens
    fine: only its missing blocks fail) as bad imagery, not as a bug."""
    try:
        yield
    except rasterio.errors.RasterioIOError as exc:  # "Read failed. See previous exception": GDAL's is the cause
        raise EngineError("CORRUPT_IMAGERY", f"Cannot read the pixels of {path}: {exc.__cause__ or exc}",
                          "The file is truncated or corrupt: copy, download or export it again "
                          "(gdalinfo -checksum FILE reads it whole).") from None


def stack_bands(band_files: list[Path], out: Path) -> Path:
    """Stack single-band rasters of one grid (e.g. Landsat bands) into one GeoTIFF,
    in the first band's data type and nodata value."""
    with rasterio.open(band_files[0]) as first:
        profile = first.profile | {"count": len(band_files), "driver": "GTiff", "tiled": True,
                                   "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    with atomic_output(out) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for i, path in enumerate(band_files, start=1):
            with rasterio.open(path) as src:
                if (src.width, src.height, src.transform) != (profile["width"], profile["height"], profile["transform"]):
                    raise EngineError("BAD_IMAGERY", f"{path} is not on the grid of {band_files[0]}.",
                                      "Stack only bands of the same size, resolution and extent.")
                band = src.read(1, masked=True).astype(profile["dtype"])  # bands may differ in type and nodata
                dst.write(band.filled(profile["nodata"]), i)
    return out
