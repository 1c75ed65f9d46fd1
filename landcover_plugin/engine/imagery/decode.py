"""Tiles and WMS images, decoded, and checked whole before they are cached: a body cut
short with a matching Content-Length decodes to a half-grey tile otherwise."""
from __future__ import annotations

import threading
import warnings
import zlib

import numpy as np
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile

from . import wms



TILE_SIZES = (256, 512)


# warnings.catch_warnings swaps process-wide filters: threads decoding at once would
# leave them scrambled, so tile decoding (about a millisecond) takes turns.
_DECODE_LOCK = threading.Lock()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_complete(data: bytes) -> bool:
    """Whether a PNG's chunks run whole up to IEND, the critical ones with a right CRC."""
    view, pos = memoryview(data), len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = int.from_bytes(view[pos:pos + 4], "big"), bytes(view[pos + 4:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return False
        critical = not kind[0] & 0x20  # IHDR, PLTE, IDAT, IEND: lowercase first letters are ancillary
        if critical and zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return False
        if kind == b"IEND":
            return True
        pos = end
    return False


def check_complete(data: bytes) -> None:
    """ValueError when a PNG, JPEG or WebP ends before its end: GDAL decodes a PNG cut
    short without an error (the missing rows come out as garbage), so a tile cut in
    transit, with a Content-Length to match, would pass as imagery and be cached."""
    if data.startswith(PNG_SIGNATURE) and not png_complete(data):
        raise ValueError("PNG tile cut short or damaged: its chunks do not run whole to IEND")
    if data.startswith(b"\xff\xd8") and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ValueError("JPEG tile cut short: no end-of-image marker")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) < 8 + int.from_bytes(data[4:8], "little"):
        raise ValueError("WebP tile cut short: shorter than its RIFF size")


def decode_tile(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (4, rows, cols) RGBA uint8. ValueError unless the
    bytes are whole and decode to an 8-bit image of `size` (width, height), or by
    default a square of 256 or 512 px."""
    check_complete(data)
    try:
        with _DECODE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # tiles carry no georeference
            with MemoryFile(data) as mem, mem.open() as img:
                if size is not None and (img.width, img.height) != size:
                    raise ValueError(f"image is {img.width}x{img.height} px, not {size[0]}x{size[1]}")
                if size is None and (img.width != img.height or img.width not in TILE_SIZES):
                    raise ValueError(f"tile is {img.width}x{img.height} px, not 256 or 512 square")
                if img.dtypes[0] != "uint8" or img.count > 4:
                    raise ValueError(f"tile is {img.count} bands of {img.dtypes[0]}, not 8-bit RGB(A)")
                bands, count = img.read(), img.count
                palette = img.colormap(1) if img.colorinterp[0] == ColorInterp.palette else None
                mask = img.dataset_mask() if img.count in (1, 3) else None
    except RasterioIOError as exc:
        raise ValueError(f"tile does not decode as an image: {exc}") from None
    if palette is not None:
        lut = np.zeros((256, 4), np.uint8)
        for index, rgba in palette.items():
            lut[index] = rgba
        return np.moveaxis(lut[bands[0]], -1, 0)
    if count in (1, 2):  # grey (+ alpha)
        bands = np.concatenate([np.repeat(bands[:1], 3, axis=0), bands[1:]])
    if mask is not None:
        bands = np.concatenate([bands, mask[None]])
    return np.ascontiguousarray(bands)


def decode_wms(data: bytes) -> np.ndarray:
    """A GetMap image of CHUNK x CHUNK px; a ServiceException (XML) is a ValueError with its text."""
    if data.lstrip()[:1] == b"<":
        text = data.decode("utf-8", "replace")
        raise ValueError("WMS error: " + " ".join(text.split())[:200])
    return decode_tile(data, (wms.CHUNK, wms.CHUNK))
