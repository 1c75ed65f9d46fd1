"""The `fetch` stage: imagery for an AOI, as one GeoTIFF in a projected CRS.

Sources:
- an XYZ/TMS URL template (`{z}` `{x}` `{y}`, `{-y}`, `{q}` quadkey, `{s}`
  subdomains, `@2x`/512-px tiles);
- a WMS GetMap URL (1.1.1 or 1.3.0), asked for in CHUNK-px images;
- a local raster of any CRS, band count and data type.

Remote sources: the pieces are estimated (count, bytes, time) and refused
above a cap, downloaded concurrently and politely (`http_client`), validated
and cached (`tile_cache`), and written one by one into a temporary mosaic on
the source's grid (`mosaic.SourceMosaic`); meanwhile the output is warped
window by window to the UTM zone of the AOI's centre (`ProgressiveWarp`), each
window as soon as its pieces are in, so the CPU work overlaps the downloads.
Memory stays flat whatever the AOI's size. Output: 3-band RGB uint8, tiled,
deflate, overviews, and an internal mask band (0 where no imagery): a mask
rather than nodata 0, so that truly black pixels stay valid.
"""
from __future__ import annotations

import math
import queue
import re
import tempfile
import threading
import time
import warnings
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import rasterio
import requests
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioDeprecationWarning, RasterioIOError
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ...contract.names import HEADERS_ENV, RESOLUTION_TOLERANCE
from ..atomic import check_out_path, partial_path, partial_prefix, remove_stale_partials, replace_with
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..imagery import http_client, mosaic, wms
from ..imagery.aoi import AOI, check_crs, utm_crs
from ..imagery.http_client import host_of
from ..imagery.mbtiles import MBTilesWriter
from ..imagery.mosaic import Grid, SourceMosaic, Writer, aligned_grid, windowed_output, windows, write_windowed
from ..imagery.raster import open_raster, reading
from ..imagery.tile_cache import (DEFAULT_MAX_AGE_DAYS, MosaicCache, TileCache, default_cache_dir,  # noqa: F401 (re-exported)
                         tile_key)
from ..imagery.tiles import (ORIGIN_SHIFT, Tile, count_tiles, expand_template, ground_resolution, nearest_zoom,
                             template_tile_size, tile_bounds_mercator, tile_range, tiles_covering)

STAGE = "fetch"
MAX_TILES = 20_000  # default cap: beyond this the user has probably mis-sized the AOI or the zoom
MAX_BYTES = 2_000_000_000  # default cap on the estimated download
EST_TILE_BYTES = 25_000  # a typical 256-px aerial tile (JPEG/PNG), for the estimate
EST_TILE_SECONDS = 0.3  # a typical tile request, for the time estimate
MAX_PIXELS = 4_000_000_000  # output grid limit (catches a --gsd typo); the mosaic is written in windows
MAX_ZOOM = 24
# Bump when the warp, the output format or the tile checks change: older finished mosaics are not reused.
# 2: tiles cut short are refused (mosaics made from such tiles before must be made again).
MOSAIC_VERSION = 2
FAIL_FAST = 16  # this many failed tiles before any success: the server is broken, stop asking
LISTED_FAILURES = 50  # failed tiles named in the result summary (all are counted); the warning names fewer
TILE_SIZES = (256, 512)
DEFAULT_RATE = 100.0  # requests per second per host: polite, yet no brake for 16 workers at ~200 ms a tile
# warnings.catch_warnings swaps process-wide filters: threads decoding at once would
# leave them scrambled, so tile decoding (about a millisecond) takes turns.
_DECODE_LOCK = threading.Lock()


@dataclass(frozen=True)
class FetchParams:
    aoi: AOI
    source: str  # XYZ URL template, WMS GetMap URL, or a local raster path
    out: Path
    zoom: int | None = None
    gsd: float | None = None  # metres/pixel: picks the nearest zoom (XYZ) and the output resolution
    cache_dir: Path | None = None  # default: $XDG_CACHE_HOME/landcover/tiles
    workers: int = 4
    headers: dict[str, str] = field(default_factory=dict)
    max_tiles: int = MAX_TILES  # refuse larger fetches (tiles or WMS images)
    max_bytes: int = MAX_BYTES  # refuse larger estimated downloads
    rate: float = DEFAULT_RATE  # requests per second per host (0: no limit)
    cache_days: float | None = DEFAULT_MAX_AGE_DAYS  # cached tiles older than this are downloaded again
    subdomains: str = "abc"  # for {s}
    mbtiles: Path | None = None  # also write the XYZ tiles as MBTiles
    wms_crs: str = wms.DEFAULT_CRS  # the CRS WMS images are requested in
    # Metres per pixel the model that will read the imagery expects (its package's resolution_m):
    # the default --gsd of a remote source, and a warning when the imagery's differs too much.
    model_gsd: float | None = None
    tile_deadline: float = http_client.DEADLINE  # seconds a tile's answers may take over all its tries


def fetch(params: FetchParams, reporter: Reporter) -> StageResult:
    """Write imagery covering `params.aoi` from `params.source` to `params.out`."""
    check_out_path(params.out, inputs=[params.source])
    if params.mbtiles is not None:
        check_out_path(params.mbtiles, inputs=[params.source, params.out])
    check_params(params)
    if urlsplit(params.source).scheme in ("http", "https"):
        if params.model_gsd and params.gsd is None and params.zoom is None:
            params = replace(params, gsd=params.model_gsd)  # the model's resolution, unless told otherwise
        if wms.is_wms(params.source):
            return fetch_wms(params, reporter)
        return fetch_xyz(params, reporter)
    if Path(params.source).is_file():
        return fetch_local(params, reporter)
    raise EngineError("BAD_SOURCE", f"Source '{params.source}' is neither an http(s) XYZ or WMS URL nor an existing "
                      "file.", "Give an XYZ template like https://host/{z}/{x}/{y}.png, a WMS URL with "
                      "SERVICE=WMS&LAYERS=..., or the path of a raster file.")


def check_params(params: FetchParams) -> None:
    """Numbers a fetch cannot work with, refused before any request."""
    if params.gsd is not None and not 0 < params.gsd < math.inf:
        raise EngineError("BAD_GSD", f"Ground resolution {params.gsd} m is not positive.",
                          "Give --gsd in metres per pixel, e.g. --gsd 0.1")
    limits = {"--workers": (params.workers, 1, "e.g. --workers 4"),
              "--max-tiles": (params.max_tiles, 1, "e.g. --max-tiles 20000"),
              "--max-bytes": (params.max_bytes, 1, "e.g. --max-bytes 2e9"),
              "--rate": (params.rate, 0, "requests per second, e.g. --rate 100 (0: no limit)"),
              "--cache-days": (params.cache_days if params.cache_days is not None else 0, 0, "e.g. --cache-days 30")}
    for option, (value, least, example) in limits.items():
        if not least <= value < math.inf:
            raise EngineError("BAD_PARAMS", f"{option} {value} is out of range (at least {least}).", f"Give {example}.")
    check_crs(params.wms_crs, "--wms-crs")


def check_model_resolution(actual: float, params: FetchParams, reporter: Reporter, hint: str) -> None:
    """Warn when the imagery's ground resolution (at the AOI's latitude) is too far from the model's."""
    wanted = params.model_gsd
    if wanted and abs(actual / wanted - 1) > RESOLUTION_TOLERANCE:
        reporter.log(f"The imagery is {actual:.3g} m/px at the AOI, {actual / wanted - 1:+.0%} from the "
                     f"{wanted:g} m/px the model expects: its results may be poor. {hint}", level="warning")


def env_headers() -> dict[str, str]:
    """Extra HTTP headers from the environment (a JSON object): how the plugin hands
    over credentials from QGIS's authentication database without a file or a command line."""
    import json
    import os

    text = os.environ.get(HEADERS_ENV, "")
    if not text:
        return {}
    try:
        headers = json.loads(text)
    except ValueError:
        headers = None
    if not isinstance(headers, dict):
        raise EngineError("BAD_HEADERS", f"{HEADERS_ENV} is not a JSON object of header names and values.",
                          'Set it like {"Authorization": "Basic ..."}.')
    return {str(k): str(v) for k, v in headers.items()}


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than tab


def request_headers(params: FetchParams) -> dict[str, str]:
    """The user's headers (--header or a pipeline's imagery.headers, then $LANDCOVER_HTTP_HEADERS),
    checked before any request: one a request cannot carry used to fail every tile, reported as
    a server failure, or crash. Messages name the header, never its value (often a secret)."""
    headers = {str(k): str(v).strip(" \t") for k, v in {**params.headers, **env_headers()}.items()}
    hint = f"Correct it where it was given: --header, the pipeline's imagery.headers or {HEADERS_ENV}."
    for name, value in headers.items():
        if not HEADER_NAME.fullmatch(name):
            raise EngineError("BAD_HEADERS", f"HTTP header name {name!r} is not a valid header name "
                              "(letters, digits and - only, as a rule).", hint)
        if HEADER_VALUE_BAD.search(value):
            raise EngineError("BAD_HEADERS", f"The value of HTTP header {name} holds a line break or another "
                              "control character (the value is not shown: it may be a secret).",
                              "Give the value on one line. " + hint)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise EngineError("BAD_HEADERS", f"The value of HTTP header {name} holds characters HTTP headers "
                              "cannot carry (the value is not shown: it may be a secret).",
                              "Use the value's ASCII form (e.g. Base64 or percent-encoded, as the server "
                              "expects). " + hint) from None
    return headers


def check_template(template: str) -> str:
    if not urlsplit(template).hostname:
        raise EngineError("BAD_SOURCE", f"XYZ source has no host: {template.split('?')[0]}",
                          "Give an XYZ template like https://host/{z}/{x}/{y}.png")
    xyz = all(key in template for key in ("{x}", "{z}")) and ("{y}" in template or "{-y}" in template)
    if not (xyz or "{q}" in template):
        raise EngineError("BAD_SOURCE", f"XYZ source {template.split('?')[0]} lacks {{x}}, {{y}} or {{z}} "
                          "(or a {q} quadkey).", "Give an XYZ template with the {z}, {x} and {y} placeholders.")
    return template


# --- decoding ---------------------------------------------------------------------------------------

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


# --- remote pieces: one job per tile or WMS image ----------------------------------------------------


@dataclass(frozen=True)
class Job:
    key: str  # cache key
    url: str
    cell: tuple[int, int]  # (row, col) of the piece in the source mosaic, in pieces
    tile: Tile | None = None  # XYZ only: for MBTiles


@dataclass
class Outcome:
    job: Job
    rgba: np.ndarray | None  # None: missing or failed
    status: str  # "cache", "downloaded", "missing" (404/204) or "failed"
    body: bytes = b""
    retries: int = 0
    requests: int = 0
    nbytes: int = 0
    error: str = ""
    broken: bool = False  # failed on bodies that do not validate (cut short, not an image)


@dataclass(frozen=True)
class Remote:
    """Everything a worker needs to get one piece."""

    session: requests.Session
    cache: TileCache
    limiter: http_client.RateLimiter
    stop: threading.Event
    decode: Callable[[bytes], np.ndarray]
    host: str
    deadline: float = http_client.DEADLINE


def get_piece(remote: Remote, job: Job) -> Outcome:
    """One piece: from the cache if fresh, else downloaded, validated and cached
    (a stale cached piece still serves when the server fails or cannot be reached)."""
    data, fresh = remote.cache.get(job.key)
    stale = None
    if data is not None:
        try:
            stale = remote.decode(data)
        except ValueError:
            data = None  # a damaged cache file: download it again
        if stale is not None and fresh:
            return Outcome(job, stale, "cache", data)
    try:
        got = http_client.get(remote.session, job.url, remote.decode, remote.limiter, remote.stop, remote.deadline)
    except http_client.Unreachable:
        if stale is not None:
            return Outcome(job, stale, "cache", data)
        raise EngineError("TILE_SERVER_UNREACHABLE", f"Cannot connect to the tile server {remote.host}.",
                          "Check the URL and your network connection, or that the server is running.") from None
    requests_sent = got.retries + (got.error != "stopped")
    if got.status == "ok":
        remote.cache.put(job.key, got.body)
        return Outcome(job, got.value, "downloaded", got.body, got.retries, requests_sent, len(got.body))
    if got.status == "failed" and stale is not None:
        return Outcome(job, stale, "cache", data, got.retries, requests_sent)
    return Outcome(job, None, got.status, retries=got.retries, requests=requests_sent, error=got.error,
                   broken=got.broken)


def run_pool(fn: Callable[[Any], Any], items: list, workers: int, stop: threading.Event,
             on_result: Callable[[Any], None], on_idle: Callable[[], bool] = lambda: False) -> None:
    """Call fn on every item in `workers` threads; on_result(result) in the
    calling thread as each finishes, and on_idle() whenever no result is
    waiting (it returns whether it did some work). An exception in a worker
    stops the others and is raised here.

    The results queue is bounded: workers wait while the caller writes, so
    decoded pieces never pile up in memory. Daemon threads rather than a
    ThreadPoolExecutor, whose threads are joined at exit: an in-flight download
    would keep a cancelled engine alive. Waiting on the queue is interruptible,
    so Cancelled (SIGTERM) is raised here at once."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    done: queue.Queue = queue.Queue(maxsize=2 * max(1, workers))

    def hand_over(result: tuple) -> None:
        while not stop.is_set():
            try:
                return done.put(result, timeout=0.1)
            except queue.Full:
                continue

    def work() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                hand_over((fn(item), None))
            except BaseException as exc:  # handed to the calling thread
                hand_over((None, exc))

    for _ in range(max(1, min(workers, len(items)))):
        threading.Thread(target=work, daemon=True, name="fetch-tile").start()
    try:
        for _ in items:
            try:
                result, exc = done.get_nowait()
            except queue.Empty:
                while on_idle() and done.empty():
                    pass
                result, exc = done.get()
            if exc is not None:
                raise exc
            on_result(result)
    finally:
        stop.set()


def server_error(host: str, which: str, error: str, broken: bool = False) -> EngineError:
    """`broken`: every failure was a body that did not validate: the server answers, with broken tiles."""
    if broken:
        return EngineError("TILE_SERVER_ERROR", f"The tile server {host} sent broken tiles for {which}, "
                           f"each time it was asked ({error}).", "The server or a proxy on the way cuts or "
                           "damages its answers: try again later, or use another imagery source.")
    return EngineError("TILE_SERVER_ERROR", f"The tile server {host} failed on {which} ({error}).",
                       "The server may be down or refusing us: try again later, check the URL, "
                       "or add the headers it needs (--header).")


def estimate(jobs: int, piece_bytes: int, workers: int, rate: float) -> tuple[int, float]:
    """(bytes, seconds) a download of `jobs` pieces will take, roughly."""
    per_second = max(1, workers) / EST_TILE_SECONDS
    if rate and rate > 0:
        per_second = min(per_second, rate)
    return jobs * piece_bytes, jobs / per_second


def check_caps(count: int, what: str, piece_bytes: int, params: FetchParams, reporter: Reporter) -> None:
    """Refuse a fetch above the caps, saying how to proceed; else log the estimate."""
    nbytes, seconds = estimate(count, piece_bytes, params.workers, params.rate)
    how = ("Use a coarser resolution (a lower --zoom or a larger --gsd), draw a smaller area, "
           "or raise the cap ({})." )
    if count > params.max_tiles:
        raise EngineError("TOO_MANY_TILES", f"The AOI needs {count:,} {what}, more than the cap of "
                          f"{params.max_tiles:,} (about {nbytes / 1e6:,.0f} MB, {seconds / 60:,.0f} min).",
                          how.format(f"--max-tiles {count}"))
    if nbytes > params.max_bytes:
        raise EngineError("TOO_MANY_BYTES", f"The AOI needs about {nbytes / 1e6:,.0f} MB of {what} ({count:,}), "
                          f"more than the cap of {params.max_bytes / 1e6:,.0f} MB.",
                          how.format(f"--max-bytes {nbytes}"))
    reporter.log(f"fetch: {count:,} {what}, at most about {nbytes / 1e6:,.1f} MB and {seconds:,.0f} s "
                 "(less for what the cache holds)")


@dataclass(frozen=True)
class Layout:
    """Where the pieces of a remote source go: the source mosaic's grid for a piece size."""

    crs: str
    origin: tuple[float, float]  # map x of the first column's left edge, y of the first row's top edge
    span: float  # a piece's side in map units
    rows: int
    cols: int

    def grid(self, size: int) -> Grid:
        res = self.span / size
        return Grid(self.crs, Affine(res, 0, self.origin[0], 0, -res, self.origin[1]), self.cols * size,
                    self.rows * size)


def download_to_mosaic(jobs: list[Job], layout: Layout, remote: Remote, params: FetchParams, tmp_dir: Path,
                       reporter: Reporter, mbtiles: MBTilesWriter | None, warp: ProgressiveWarp) -> Counter:
    """Get every piece and write it into a temporary source mosaic as it arrives; `warp`
    (which owns the mosaic) warps the output windows whose pieces are all in meanwhile."""
    counts: Counter = Counter()
    state: dict[str, Any] = {"first_error": "", "failed_keys": []}

    def on_result(o: Outcome) -> None:
        counts[o.status] += 1
        counts["retried"] += o.retries
        counts["requests"] += o.requests
        counts["bytes"] += o.nbytes
        counts["broken"] += o.broken
        state["first_error"] = state["first_error"] or o.error
        if o.status == "failed":
            state["failed_keys"].append(o.job.key)
        if counts["failed"] >= FAIL_FAST and counts["cache"] + counts["downloaded"] == 0:
            raise server_error(remote.host, f"the first {counts['failed']} tiles", o.error,
                               broken=counts["broken"] == counts["failed"])
        if o.rgba is not None:
            if not o.rgba[3].any():
                counts["blank"] += 1  # fully transparent: nodata, nothing to write
            else:
                if warp.mosaic is None:  # the first piece fixes the piece size (a server may send 512 px)
                    state["size"] = o.rgba.shape[1]
                    warp.attach(SourceMosaic(tmp_dir / "source.tif", layout.grid(state["size"]),
                                             block=min(state["size"], 512)))
                rgba, size = o.rgba, state["size"]
                if rgba.shape[1] != size or rgba.shape[2] != size:  # mixed sizes: nearest-neighbour resize
                    rows, cols = np.arange(size) * rgba.shape[1] // size, np.arange(size) * rgba.shape[2] // size
                    rgba = rgba[:, rows][:, :, cols]
                warp.mosaic.write(rgba, o.job.cell[0] * size, o.job.cell[1] * size)
            if mbtiles is not None and o.job.tile is not None and o.body:
                mbtiles.add(o.job.tile, o.body)
        warp.piece_done(o.job.cell[0])
        reporter.progress(STAGE, sum(counts[k] for k in ("cache", "downloaded", "missing", "failed")), len(jobs))

    try:  # `stop` also ends a piece's retries early once the run is over (failed or cancelled)
        run_pool(lambda job: get_piece(remote, job), jobs, params.workers, remote.stop, on_result, warp.step)
    finally:
        remote.session.close()
    counts["first_error"] = state["first_error"]  # type: ignore[assignment]
    counts["failed_keys"] = sorted(state["failed_keys"])  # type: ignore[assignment]
    return counts


def check_counts(counts: Counter, total: int, host: str, where: str, reporter: Reporter) -> None:
    """Raise when no piece has imagery; warn about pieces that failed."""
    if counts["cache"] + counts["downloaded"] == 0:
        if counts["failed"]:
            raise server_error(host, f"all {total} tiles", counts["first_error"],
                               broken=counts["broken"] == counts["failed"])
        raise EngineError("AOI_OUTSIDE_IMAGERY", f"The tile server {host} has no tiles for this AOI {where} "
                          f"(all {total} were missing).", "Check that the AOI lies inside the imagery, or use a "
                          "lower --zoom: the server may not go this deep.")
    if counts["failed"]:
        keys = counts["failed_keys"]
        named = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        reporter.log(f"{counts['failed']} of {total} tiles could not be fetched ({counts['first_error']}): {named}. "
                     "They are left empty in the mosaic. Run again to retry them (the others come from the cache).",
                     level="warning")


def aoi_grid(bounds: tuple[float, float, float, float], crs: str, res: float) -> Grid:
    return aligned_grid(bounds, crs, res, MAX_PIXELS)


class ProgressiveWarp:
    """Warps the source mosaic onto the output grid window by window, while pieces are
    still downloading: a window is warped as soon as every piece row it reads from is
    done (jobs go row by row), so the CPU work overlaps the wait on the network
    instead of following it. The source's alpha band weights the resampling, so
    gaps do not bleed dark edges."""

    def __init__(self, grid: Grid, layout: Layout, resampling: Resampling, write: Writer) -> None:
        self.grid, self.layout, self.resampling, self.write = grid, layout, resampling, write
        # A quarter as many rows as columns: the rows left to warp after the last piece are few,
        # while a window as wide as before keeps GDAL on its fast path (measured: narrower costs 3x).
        rows = max(1, mosaic.WINDOW // 4)
        self.todo = deque((w, self._last_row(w)) for w in windows(grid.width, grid.height, rows=rows))
        self.total = len(self.todo)
        self.pending = [layout.cols] * layout.rows  # pieces not done yet, per piece row
        self.rows_done = 0  # piece rows 0 .. rows_done - 1 are all done
        self.mosaic: SourceMosaic | None = None
        self.vrt: WarpedVRT | None = None

    def _last_row(self, window: Window) -> int:
        """The last piece row the warp of `window` reads from."""
        bounds = rasterio.windows.bounds(window, self.grid.transform)
        _, south, _, north = transform_bounds(self.grid.crs, self.layout.crs, *bounds, densify_pts=21)
        # The resampling kernel reaches past the window: two output and four source pixels are ample.
        margin = 2 * (north - south) / window.height + 4 * self.layout.span / min(TILE_SIZES)
        return min(self.layout.rows - 1, int((self.layout.origin[1] - (south - margin)) // self.layout.span))

    def attach(self, mosaic: SourceMosaic) -> None:
        self.mosaic = mosaic
        # Reading the mosaic while it is written is the point; rasterio warns against
        # it in general. The lock: decoding threads swap the warning filters too.
        with _DECODE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", RasterioDeprecationWarning)
            self.vrt = WarpedVRT(mosaic.dataset, crs=self.grid.crs, transform=self.grid.transform,
                                 width=self.grid.width, height=self.grid.height, resampling=self.resampling,
                                 warp_extras={"NUM_THREADS": "ALL_CPUS"})

    def piece_done(self, row: int) -> None:
        self.pending[row] -= 1
        while self.rows_done < len(self.pending) and self.pending[self.rows_done] == 0:
            self.rows_done += 1

    def step(self) -> bool:
        """Warp the next window if its pieces are all in (while waiting for downloads); whether it did."""
        if self.vrt is None or not self.todo or self.todo[0][1] >= self.rows_done:
            return False
        self._warp(self.todo.popleft()[0])
        return True

    def finish(self, progress: Callable[[int, int], None]) -> None:
        """Warp the windows left once every piece is in."""
        while self.todo:
            self._warp(self.todo.popleft()[0])
            progress(self.total - len(self.todo), self.total)

    def _warp(self, window: Window) -> None:
        rgba = self.vrt.read(window=window)
        self.write(window, rgba[:3], rgba[3])

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()
        if self.mosaic is not None:
            self.mosaic.close()


def report(reporter: Reporter, counts: Counter, total: int, seconds: float) -> dict[str, Any]:
    """The run report: summary fields for the result event, and one summary line."""
    summary = {"tiles": total, "requested": counts["requests"], "from_cache": counts["cache"],
               "downloaded": counts["downloaded"], "missing": counts["missing"], "blank": counts["blank"],
               "failed": counts["failed"], "retried": counts["retried"], "bytes": counts["bytes"],
               "seconds": round(seconds, 2), "failed_tiles": list(counts["failed_keys"] or [])[:LISTED_FAILURES]}
    reporter.log(f"fetch: {total} tiles, {counts['requests']} requests, {counts['cache']} from cache, "
                 f"{counts['downloaded']} downloaded, {counts['retried']} retried, {counts['failed']} failed, "
                 f"{counts['missing'] + counts['blank']} empty, {counts['bytes'] / 1e6:.1f} MB in {seconds:.1f} s")
    return summary


def release_freed_memory() -> None:
    """Large buffers (decoded tiles, windows) straight from and back to the OS.

    glibc raises its mmap threshold after the first large free, after which
    each download thread's tile-sized buffers come from its own malloc arena
    and fragment it: peak memory then grows with the download speed, not the
    work in flight. A fixed threshold keeps it flat (Linux/glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def fetch_remote(params: FetchParams, reporter: Reporter, jobs: list[Job], layout: Layout, remote: Remote,
                 out_grid: Grid, native: float, where: str, mbtiles: MBTilesWriter | None,
                 started: float) -> dict[str, Any]:
    """Shared by XYZ and WMS: download into a temporary source mosaic beside the output, then warp."""
    params.out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(params.out)  # e.g. the source mosaic of a killed run (tens of MB)
    # Bilinear when enlarging or keeping the size; averaging when shrinking, to avoid aliasing.
    resampling = Resampling.bilinear if out_grid.transform.a <= native * 1.5 else Resampling.average
    made = MosaicCache(remote.cache)
    key = mosaic_key(out_grid, layout, resampling)
    tile_keys = [job.key for job in jobs]
    if mbtiles is None:  # MBTiles need the tiles' bodies: the whole way
        info = reuse_mosaic(made, key, tile_keys, params.out)
        if info is not None:
            reporter.log("fetch: the same tiles, unchanged in the cache, made this mosaic before: reused")
            remote.session.close()
            seconds = time.monotonic() - started
            return {**report(reporter, Counter(cache=len(jobs), blank=info["blank"]), len(jobs), seconds),
                    "download_seconds": round(seconds, 2)}
    release_freed_memory()
    profile = {"crs": out_grid.crs, "transform": out_grid.transform, "width": out_grid.width,
               "height": out_grid.height, "count": 3, "dtype": "uint8"}
    empty = EngineError("AOI_OUTSIDE_IMAGERY", f"The tiles from {remote.host} hold no imagery inside the AOI.",
                        "Check that the AOI lies inside the imagery.")
    ok = False
    try:
        with tempfile.TemporaryDirectory(dir=params.out.parent, prefix=partial_prefix(params.out) + "-fetch-") as tmp, \
                windowed_output(params.out, profile, colorinterp=(ColorInterp.red, ColorInterp.green, ColorInterp.blue),
                                empty_error=empty) as write:
            warp = ProgressiveWarp(out_grid, layout, resampling, write)
            try:
                counts = download_to_mosaic(jobs, layout, remote, params, Path(tmp), reporter, mbtiles, warp)
                download_seconds = time.monotonic() - started
                check_counts(counts, len(jobs), remote.host, where, reporter)
                if warp.mosaic is None:
                    raise EngineError("AOI_OUTSIDE_IMAGERY", f"The tiles from {remote.host} hold no imagery inside "
                                      "the AOI (all were blank).", "Check that the AOI lies inside the imagery.")
                warp.finish(lambda i, n: reporter.progress(STAGE, i, n, "writing the mosaic"))
            finally:
                warp.close()
        ok = True
    finally:
        if mbtiles is not None:
            mbtiles.close(ok)
    if counts["missing"] + counts["failed"] == 0:  # a rerun would ask for those again
        made.put(key, tile_keys, params.out, {"blank": counts["blank"]})
    return {**report(reporter, counts, len(jobs), time.monotonic() - started),
            "download_seconds": round(download_seconds, 2)}


def mosaic_key(grid: Grid, layout: Layout, resampling: Resampling) -> str:
    """What a mosaic made from a source's tiles depends on (with the tiles themselves)."""
    import hashlib
    import json

    what = [MOSAIC_VERSION, grid.crs, list(grid.transform)[:6], grid.width, grid.height, layout.crs,
            list(layout.origin), layout.span, layout.rows, layout.cols, resampling.name]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


def reuse_mosaic(made: MosaicCache, key: str, tile_keys: list[str], out: Path) -> dict | None:
    """Put the mosaic made before from these tiles at `out` (atomically); its info, or None."""
    tmp = partial_path(out)
    tmp.unlink(missing_ok=True)
    try:
        info = made.get(key, tile_keys, tmp)
        if info is not None:
            replace_with(tmp, out, directory=False)
        return info
    finally:
        tmp.unlink(missing_ok=True)


def make_remote(params: FetchParams, source_key: str, url: str, decode: Callable[[bytes], np.ndarray]) -> Remote:
    return Remote(http_client.make_session(request_headers(params), params.workers),
                  TileCache.for_source(params.cache_dir, source_key, params.cache_days),
                  http_client.RateLimiter(params.rate), threading.Event(), decode, host_of(url),
                  params.tile_deadline)


# --- XYZ ----------------------------------------------------------------------------------------------


def fetch_xyz(params: FetchParams, reporter: Reporter) -> StageResult:
    started = time.monotonic()
    template = check_template(params.source)
    bounds = params.aoi.to_crs("EPSG:4326").bounds
    lon, lat = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
    size = template_tile_size(template)
    zoom = pick_zoom(params.zoom, params.gsd, lat, size)
    total = count_tiles(bounds, zoom)
    if total == 0:
        raise EngineError("NO_TILES", f"The AOI yields no tiles at zoom {zoom}: Web Mercator tiles stop at "
                          "latitude ±85.05°.", "Draw the AOI between latitudes -85 and 85, or use a local raster.")
    check_caps(total, "tiles", EST_TILE_BYTES * (size // 256) ** 2, params, reporter)
    crs = utm_crs(lon, lat)
    native = ground_resolution(lat, zoom, size)
    gsd = params.gsd or round(native, 3)
    out_grid = aoi_grid(params.aoi.to_crs(crs).bounds, crs, gsd)  # too large? ask now, before downloading
    xmin, ymin, xmax, ymax = tile_range(bounds, zoom)
    minx, _, _, maxy = tile_bounds_mercator(Tile(xmin, ymin, zoom))
    layout = Layout("EPSG:3857", (minx, maxy), 2 * ORIGIN_SHIFT / 2 ** zoom, ymax - ymin + 1, xmax - xmin + 1)
    jobs = [Job(f"{t.z}/{t.x}/{t.y}", expand_template(template, t, params.subdomains), (t.y - ymin, t.x - xmin), t)
            for t in tiles_covering(bounds, zoom)]
    remote = make_remote(params, template, template, decode_tile)
    reporter.log(f"fetch: zoom {zoom} ({native:.3g} m/px at the AOI's latitude) from {remote.host}")
    if params.gsd and params.gsd != params.model_gsd and abs(native / params.gsd - 1) > RESOLUTION_TOLERANCE:
        reporter.log(f"The tiles at zoom {zoom} are {native:.3g} m/px at the AOI, {native / params.gsd - 1:+.0%} "
                     f"from the {params.gsd:g} m asked for: they are resampled, which blurs or wastes detail.",
                     level="warning")
    check_model_resolution(native, params, reporter, f"The nearest zoom to the model's resolution is "
                           f"{nearest_zoom(params.model_gsd or native, lat, size, max_zoom=MAX_ZOOM)}; or use a "
                           "model trained at this resolution.")
    mbtiles = MBTilesWriter(params.mbtiles, params.out.stem, bounds, zoom) if params.mbtiles else None
    summary = fetch_remote(params, reporter, jobs, layout, remote, out_grid, native, f"at zoom {zoom}", mbtiles,
                           started)
    outputs = {"mosaic": str(params.out), **({"mbtiles": str(params.mbtiles)} if params.mbtiles else {})}
    return StageResult(outputs=outputs, summary={"zoom": zoom, **summary, "gsd_m": gsd, "crs": crs,
                                                 "native_gsd_m": round(native, 4)})


def pick_zoom(zoom: int | None, gsd: float | None, lat: float, tile_size: int = 256) -> int:
    if zoom is not None:
        if not 0 <= zoom <= MAX_ZOOM:
            raise EngineError("BAD_ZOOM", f"Zoom {zoom} is outside 0..{MAX_ZOOM}.", "Give --zoom between 0 and 24.")
        return zoom
    if gsd is None:
        raise EngineError("NEED_ZOOM", "An XYZ source needs a zoom level or a ground resolution.",
                          "Give --zoom Z or --gsd METRES (the nearest zoom is picked).")
    return nearest_zoom(gsd, lat, tile_size, max_zoom=MAX_ZOOM)


# --- WMS ----------------------------------------------------------------------------------------------


def fetch_wms(params: FetchParams, reporter: Reporter) -> StageResult:
    started = time.monotonic()
    source = wms.parse_wms(params.source)
    if params.gsd is None:
        raise EngineError("NEED_GSD", "A WMS source needs a ground resolution.", "Give --gsd METRES, e.g. --gsd 0.5")
    bounds = params.aoi.to_crs("EPSG:4326").bounds
    lon, lat = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
    crs = utm_crs(lon, lat)
    out_grid = aoi_grid(params.aoi.to_crs(crs).bounds, crs, params.gsd)
    req_crs = source.crs or params.wms_crs  # a CRS in the URL (e.g. from a QGIS layer) wins
    # Ask for the output grid's extent (not just the AOI's) so that its edge pixels have imagery.
    out_bounds = rasterio.transform.array_bounds(out_grid.height, out_grid.width, out_grid.transform)
    req_bounds = transform_bounds(crs, req_crs, *out_bounds)
    res = wms.request_res(req_crs, params.gsd, lat)
    span = wms.CHUNK * res
    col0, row0, col1, row1 = wms.chunk_range(req_bounds, span)
    count = (col1 - col0 + 1) * (row1 - row0 + 1)
    check_caps(count, f"WMS images of {wms.CHUNK} px", EST_TILE_BYTES * (wms.CHUNK // 256) ** 2, params, reporter)
    layout = Layout(req_crs, (col0 * span, -row0 * span), span, row1 - row0 + 1, col1 - col0 + 1)
    crs_key = req_crs.replace(":", "-")
    jobs = [Job(f"{crs_key}/{res!r}/{row}/{col}",
                wms.getmap_url(source, req_crs, wms.chunk_bounds(col, row, span), wms.CHUNK, wms.CHUNK),
                (row - row0, col - col0))
            for row in range(row0, row1 + 1) for col in range(col0, col1 + 1)]
    source_key = f"{source.base}?{sorted(source.params.items())}&VERSION={source.version}"
    remote = make_remote(params, source_key, source.base, lambda data: decode_wms(data))
    reporter.log(f"fetch: WMS {source.version} from {remote.host} in {req_crs}")
    check_model_resolution(params.gsd, params, reporter, "Give --gsd the model's resolution, or use a model "
                           "trained at this resolution.")
    summary = fetch_remote(params, reporter, jobs, layout, remote, out_grid, params.gsd, "", None, started)
    return StageResult(outputs={"mosaic": str(params.out)},
                       summary={"zoom": None, **summary, "gsd_m": params.gsd, "crs": crs,
                                "native_gsd_m": params.gsd})


def decode_wms(data: bytes) -> np.ndarray:
    """A GetMap image of CHUNK x CHUNK px; a ServiceException (XML) is a ValueError with its text."""
    if data.lstrip()[:1] == b"<":
        text = data.decode("utf-8", "replace")
        raise ValueError("WMS error: " + " ".join(text.split())[:200])
    return decode_tile(data, (wms.CHUNK, wms.CHUNK))


# --- Local raster -----------------------------------------------------------------------------------


def _outside(src: rasterio.DatasetReader) -> EngineError:
    west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    return EngineError("AOI_OUTSIDE_IMAGERY",
                       f"The AOI does not overlap the imagery {Path(src.name).name}, which covers "
                       f"lon {west:.5f}..{east:.5f}, lat {south:.5f}..{north:.5f} (WGS84).",
                       "Draw the AOI inside the imagery's extent, or give imagery that covers it.")


def crop_window(src: rasterio.DatasetReader, bounds: tuple[float, float, float, float]) -> Window:
    """The pixel window of `bounds` (in the raster's CRS), widened to whole
    pixels and clipped to the raster; AOI_OUTSIDE_IMAGERY when empty."""
    window = rasterio.windows.from_bounds(*bounds, transform=src.transform)
    col0, row0 = max(0, math.floor(window.col_off + 1e-6)), max(0, math.floor(window.row_off + 1e-6))
    col1 = min(src.width, math.ceil(window.col_off + window.width - 1e-6))
    row1 = min(src.height, math.ceil(window.row_off + window.height - 1e-6))
    if col1 <= col0 or row1 <= row0:
        raise _outside(src)
    return Window(col0, row0, col1 - col0, row1 - row0)


def _per_dataset_mask(src: rasterio.DatasetReader) -> bool:
    """True when validity comes from a mask band or alpha, not from nodata."""
    return src.nodata is None and MaskFlags.all_valid not in src.mask_flag_enums[0]


def _in_metres(crs: rasterio.crs.CRS) -> bool:
    return crs.is_projected and crs.linear_units_factor[1] == 1.0


def fetch_local(params: FetchParams, reporter: Reporter) -> StageResult:
    """Crop (and, for --gsd or a CRS not in metres, warp) a local raster of any
    band count and data type, window by window: never read whole."""
    started = time.monotonic()
    with open_raster(params.source) as src:
        if src.crs is None:
            raise EngineError("BAD_IMAGERY", f"{params.source} has no coordinate reference system.",
                              "Georeference the imagery (e.g. with QGIS's Georeferencer) first.")
        window = crop_window(src, params.aoi.to_crs(src.crs.to_string()).bounds)
        native = pixel_metres(src.crs.to_string(), src.transform)
        check_model_resolution(native, params, reporter, "Resample it to the model's resolution (--gsd) only if "
                               "it is finer; better, use imagery or a model at a matching resolution.")
        has_mask = _per_dataset_mask(src)
        profile = {"count": src.count, "dtype": src.dtypes[0], "nodata": src.nodata}
        if params.gsd is None and _in_metres(src.crs):
            crs, transform = src.crs.to_string(), src.window_transform(window)
            profile |= {"crs": crs, "transform": transform, "width": int(window.width), "height": int(window.height)}

            def read(w: Window) -> tuple[np.ndarray, np.ndarray | None]:
                at = Window(window.col_off + w.col_off, window.row_off + w.row_off, w.width, w.height)
                with reading(params.source):
                    return src.read(window=at), (src.dataset_mask(window=at) if has_mask else None)

            write_windowed(params.out, profile, read, colorinterp=src.colorinterp,
                           progress=lambda i, n: reporter.progress(STAGE, i, n))
        else:
            grid, resampling = _local_target(src, params.aoi, window, params.gsd)
            crs, transform = grid.crs, grid.transform
            profile |= {"crs": crs, "transform": transform, "width": grid.width, "height": grid.height}
            with WarpedVRT(src, crs=crs, transform=transform, width=grid.width, height=grid.height,
                           resampling=resampling, add_alpha=has_mask) as vrt:
                def read(w: Window) -> tuple[np.ndarray, np.ndarray | None]:
                    with reading(params.source):
                        data = vrt.read(window=w)
                    return (data[:-1], data[-1]) if has_mask else (data, None)

                write_windowed(params.out, profile, read, colorinterp=src.colorinterp,
                               progress=lambda i, n: reporter.progress(STAGE, i, n))
    summary = {"zoom": None, "tiles": 0, "requested": 0, "from_cache": 0, "downloaded": 0, "missing": 0,
               "blank": 0, "failed": 0, "failed_tiles": [], "retried": 0, "bytes": 0,
               "seconds": round(time.monotonic() - started, 2),
               "gsd_m": round(pixel_metres(crs, transform), 6), "crs": crs, "native_gsd_m": round(native, 6)}
    return StageResult(outputs={"mosaic": str(params.out)}, summary=summary)


def pixel_metres(crs: str, transform: Affine) -> float:
    """The pixel height in metres (degrees converted at about 111 km per degree of latitude)."""
    crs_ = rasterio.crs.CRS.from_user_input(crs)
    if crs_.is_geographic:
        return abs(transform.e) * 111_320
    return abs(transform.e) * (crs_.linear_units_factor[1] if crs_.is_projected else 1.0)


def _local_target(src: rasterio.DatasetReader, aoi: AOI, window: Window,
                  gsd: float | None) -> tuple[Grid, Resampling]:
    """The output grid: in the raster's CRS when it is in metres, else (degrees,
    feet) in the UTM zone of the AOI's centre; at `gsd`, or the native pixel size in metres."""
    if _in_metres(src.crs):
        crs = src.crs.to_string()
    else:
        west, south, east, north = aoi.to_crs("EPSG:4326").bounds
        crs = utm_crs((west + east) / 2, (south + north) / 2)
    native = pixel_metres(src.crs.to_string(), src.transform)
    gsd = gsd or round(native, 6)
    # Only the part of the AOI the imagery covers.
    covered = transform_bounds(src.crs, crs, *rasterio.windows.bounds(window, src.transform))
    aoi_bounds = aoi.to_crs(crs).bounds
    grid = aoi_grid((max(covered[0], aoi_bounds[0]), max(covered[1], aoi_bounds[1]),
                     min(covered[2], aoi_bounds[2]), min(covered[3], aoi_bounds[3])), crs, gsd)
    return grid, Resampling.bilinear if gsd <= native * 1.5 else Resampling.average
