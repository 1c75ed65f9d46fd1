"""The `fetch` stage: imagery for an AOI, as one GeoTIFF.

Two kinds of source:
- an XYZ URL template (`https://host/{z}/{x}/{y}.png`): the tiles covering the
  AOI are downloaded (concurrently, retried, cached on disk), assembled on their
  EPSG:3857 grid and warped to the UTM zone of the AOI's centre, at `gsd` metres
  per pixel (default: the tiles' ground resolution at the AOI's latitude),
  cropped to the AOI's bounds;
- a local raster file: cropped to the AOI, in its own CRS and resolution
  (resampled when `gsd` is given).

XYZ output: 3-band RGB uint8, tiled, deflate, with overviews, and an internal
mask band (0 where no tile had imagery, from the tiles' alpha). A mask rather
than nodata 0, so that truly black pixels stay valid; rasterio's `read_masks` /
`dataset_mask` and QGIS both honour it.

Foundation scale: the mosaic is held in memory (the tile-count limit keeps it
bounded); download, assembly, warping and writing are separate functions so a
windowed, streaming mosaic can replace `assemble`/`warp_rgba` later.
"""
from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import numpy as np
import rasterio
import requests
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import reproject, transform_bounds
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.retry import Retry

from .aoi import AOI
from .atomic import atomic_output
from .errors import EngineError
from .events import Reporter, StageResult
from .imagery import open_raster
from .tiles import (ORIGIN_SHIFT, Tile, count_tiles, ground_resolution, nearest_zoom, tile_bounds_mercator, tile_range,
                    tiles_covering)

STAGE = "fetch"
USER_AGENT = "landcover-plugin/0.1"
MAX_TILES = 10_000  # ~2.6 GB of RGBA in memory at 256 px: beyond this the user surely mis-sized the AOI
MAX_PIXELS = 1_000_000_000  # output grid limit while the mosaic is held in memory (3 GB of RGB)
MAX_ZOOM = 24
TIMEOUT = (5.0, 30.0)  # seconds to connect, seconds between bytes
BODY_ATTEMPTS = 3  # tries per tile for bodies that arrive cut short or do not decode
FAIL_FAST = 16  # this many failed tiles before any success: the server is broken, stop asking
TILE_SIZES = (256, 512)
# warnings.catch_warnings swaps process-wide filters: threads decoding at once would
# leave them scrambled, so tile decoding (about a millisecond) takes turns.
_DECODE_LOCK = threading.Lock()


@dataclass(frozen=True)
class FetchParams:
    aoi: AOI
    source: str  # XYZ URL template with {x}, {y} (or {-y}), {z}; or a local raster path
    out: Path
    zoom: int | None = None
    gsd: float | None = None  # metres/pixel: picks the nearest zoom (XYZ) and the output resolution
    cache_dir: Path | None = None  # default: $XDG_CACHE_HOME/landcover/tiles
    workers: int = 4
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: where the output raster's pixels lie."""

    crs: str
    transform: Affine
    width: int
    height: int


def fetch(params: FetchParams, reporter: Reporter) -> StageResult:
    """Write imagery covering `params.aoi` from `params.source` to `params.out`."""
    if params.gsd is not None and not params.gsd > 0:
        raise EngineError("BAD_GSD", f"Ground resolution {params.gsd} m is not positive.",
                          "Give --gsd in metres per pixel, e.g. --gsd 0.1")
    if urlsplit(params.source).scheme in ("http", "https"):
        return fetch_xyz(params, reporter)
    if Path(params.source).is_file():
        return fetch_local(params, reporter)
    raise EngineError("BAD_SOURCE", f"Source '{params.source}' is neither an http(s) XYZ URL nor an existing file.",
                      "Give an XYZ template like https://host/{z}/{x}/{y}.png or the path of a raster file.")


# --- XYZ: URLs, session, cache ----------------------------------------------------------------------


def host_of(template: str) -> str:
    """host[:port] of a URL, for messages: never the path or query, which may hold API keys."""
    parts = urlsplit(template)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else "?"


def check_template(template: str) -> str:
    if not urlsplit(template).hostname:
        raise EngineError("BAD_SOURCE", f"XYZ source has no host: {template.split('?')[0]}",
                          "Give an XYZ template like https://host/{z}/{x}/{y}.png")
    if not all(key in template for key in ("{x}", "{z}")) or not ("{y}" in template or "{-y}" in template):
        raise EngineError("BAD_SOURCE", f"XYZ source {template.split('?')[0]} lacks {{x}}, {{y}} or {{z}}.",
                          "Give an XYZ template with the {z}, {x} and {y} placeholders.")
    return template


def tile_url(template: str, tile: Tile) -> str:
    # {-y}: TMS row order (counted from the south), as in QGIS's XYZ connections.
    return (template.replace("{z}", str(tile.z)).replace("{x}", str(tile.x))
            .replace("{-y}", str(2 ** tile.z - 1 - tile.y)).replace("{y}", str(tile.y)))


def make_session(headers: dict[str, str], pool_size: int) -> requests.Session:
    """A session that retries failed connections and 5xx/429 answers with back-off
    (honouring Retry-After), and names itself to the tile server."""
    retry = Retry(total=6, connect=3, read=2, status=3, backoff_factor=0.2,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=frozenset({"GET"}),
                  raise_on_status=False, respect_retry_after_header=True)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=max(pool_size, 1))
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": USER_AGENT, **headers})
    return session


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "landcover" / "tiles"


@dataclass(frozen=True)
class TileCache:
    """Validated tiles on disk: ROOT/sha256(template)/z/x/y.tile. Hashing the
    template keeps API keys out of paths and separates sources."""

    root: Path

    @classmethod
    def for_source(cls, cache_dir: Path | None, template: str) -> "TileCache":
        return cls(Path(cache_dir or default_cache_dir()) / hashlib.sha256(template.encode()).hexdigest())

    def path(self, tile: Tile) -> Path:
        return self.root / str(tile.z) / str(tile.x) / f"{tile.y}.tile"

    def get(self, tile: Tile) -> bytes | None:
        try:
            return self.path(tile).read_bytes()
        except OSError:
            return None

    def put(self, tile: Tile, data: bytes) -> None:
        with atomic_output(self.path(tile)) as tmp:  # a reader never sees half a tile
            tmp.write_bytes(data)


# --- XYZ: one tile ----------------------------------------------------------------------------------


def decode_tile(data: bytes) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (4, size, size) RGBA uint8. ValueError unless the
    bytes decode to an 8-bit square image of 256 or 512 px."""
    try:
        with _DECODE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # tiles carry no georeference
            with MemoryFile(data) as mem, mem.open() as img:
                if img.width != img.height or img.width not in TILE_SIZES:
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


@dataclass
class TileOutcome:
    tile: Tile
    rgba: np.ndarray | None  # None: missing or failed
    status: str  # "cache", "downloaded", "missing" (404/204) or "failed"
    retries: int = 0
    nbytes: int = 0
    error: str = ""


def _unreachable(exc: requests.ConnectionError) -> bool:
    """Connection refused, unknown host or connect timeout: the server is not there."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectTimeout) or isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def _urllib3_retries(response: requests.Response) -> int:
    retries = getattr(response.raw, "retries", None)
    return len(retries.history) if retries is not None else 0


def get_tile(session: requests.Session, template: str, cache: TileCache, stop: threading.Event,
             tile: Tile) -> TileOutcome:
    """One tile: from the cache, else downloaded, validated and cached.
    Raises EngineError(TILE_SERVER_UNREACHABLE) when the server cannot be reached."""
    data = cache.get(tile)
    if data is not None:
        try:
            return TileOutcome(tile, decode_tile(data), "cache")
        except ValueError:
            pass  # a damaged cache file: download it again
    url, retries, error = tile_url(template, tile), 0, ""
    for attempt in range(BODY_ATTEMPTS):
        if stop.is_set():
            return TileOutcome(tile, None, "failed", retries, error="stopped")
        retries += attempt > 0
        try:
            response = session.get(url, timeout=TIMEOUT)
        except requests.ConnectionError as exc:
            if _unreachable(exc):
                raise EngineError("TILE_SERVER_UNREACHABLE", f"Cannot connect to the tile server {host_of(template)}.",
                                  "Check the URL and your network connection, or that the server is running.") from None
            error = type(exc).__name__  # not str(exc): it holds the URL, maybe with a key
            continue
        except requests.RequestException as exc:  # read timeout, body cut short
            error = type(exc).__name__
            continue
        retries += _urllib3_retries(response)
        if response.status_code in (204, 404):
            return TileOutcome(tile, None, "missing", retries)
        if response.status_code != 200:
            return TileOutcome(tile, None, "failed", retries, error=f"HTTP {response.status_code}")
        try:
            rgba = decode_tile(response.content)
        except ValueError as exc:
            error = str(exc)
            continue
        cache.put(tile, response.content)
        return TileOutcome(tile, rgba, "downloaded", retries, len(response.content))
    return TileOutcome(tile, None, "failed", retries, error=error)


# --- XYZ: all tiles ---------------------------------------------------------------------------------


def run_pool(fn: Callable[[Any], Any], items: list, workers: int, stop: threading.Event,
             on_result: Callable[[Any], None]) -> None:
    """Call fn on every item in `workers` threads; on_result(result) in the
    calling thread as each finishes. An exception in a worker stops the others
    and is raised here.

    Daemon threads rather than a ThreadPoolExecutor, whose threads are joined
    at exit: an in-flight download (timeouts, retry back-off) would then keep a
    cancelled engine alive for seconds. Waiting on the queue is interruptible,
    so Cancelled (SIGTERM) is raised here at once."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    done: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((fn(item), None))
            except BaseException as exc:  # handed to the calling thread
                done.put((None, exc))

    for _ in range(max(1, min(workers, len(items)))):
        threading.Thread(target=work, daemon=True, name="fetch-tile").start()
    try:
        for _ in items:
            result, exc = done.get()
            if exc is not None:
                raise exc
            on_result(result)
    finally:
        stop.set()


def download_tiles(template: str, tiles: list[Tile], cache: TileCache, params: FetchParams,
                   reporter: Reporter) -> list[TileOutcome]:
    outcomes: list[TileOutcome] = []
    counts: Counter = Counter()

    def on_result(outcome: TileOutcome) -> None:
        outcomes.append(outcome)
        counts[outcome.status] += 1
        if counts["failed"] >= FAIL_FAST and counts["cache"] + counts["downloaded"] == 0:
            raise server_error(template, f"the first {counts['failed']} tiles", outcome.error)
        reporter.progress(STAGE, len(outcomes), len(tiles))

    session, stop = make_session(params.headers, params.workers), threading.Event()
    try:  # `stop` also ends a tile's retries early once the run is over (failed or cancelled)
        run_pool(partial(get_tile, session, template, cache, stop), tiles, params.workers, stop, on_result)
    finally:
        session.close()
    return outcomes


def server_error(template: str, which: str, error: str) -> EngineError:
    return EngineError("TILE_SERVER_ERROR", f"The tile server {host_of(template)} failed on {which} ({error}).",
                       "The server may be down or refusing us: try again later, check the URL, "
                       "or add the headers it needs (--header).")


def check_outcomes(outcomes: list[TileOutcome], template: str, zoom: int, reporter: Reporter) -> None:
    """Raise when no tile has imagery; warn about tiles that failed."""
    counts = Counter(o.status for o in outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    if counts["cache"] + counts["downloaded"] == 0:
        if failed:
            raise server_error(template, f"all {len(outcomes)} tiles", failed[0].error)
        raise EngineError("AOI_OUTSIDE_IMAGERY",
                          f"The tile server {host_of(template)} has no tiles for this AOI at zoom {zoom} "
                          f"(all {len(outcomes)} were missing).",
                          "Check that the AOI lies inside the imagery, or use a lower --zoom: "
                          "the server may not go this deep.")
    if failed:
        reporter.log(f"{len(failed)} of {len(outcomes)} tiles failed ({failed[0].error}); they are left empty "
                     "in the mosaic. Run again to retry them (the others come from the cache).", level="warning")


# --- XYZ: mosaic ------------------------------------------------------------------------------------


def assemble(tiles: dict[Tile, np.ndarray], rng: tuple[int, int, int, int], zoom: int) -> tuple[np.ndarray, Affine]:
    """Paste tiles into one RGBA array on the EPSG:3857 grid (alpha 0 where a
    tile is missing); returns it and its transform."""
    xmin, ymin, xmax, ymax = rng
    size = Counter(a.shape[1] for a in tiles.values()).most_common(1)[0][0]
    mosaic = np.zeros((4, (ymax - ymin + 1) * size, (xmax - xmin + 1) * size), np.uint8)
    for tile, rgba in tiles.items():
        if rgba.shape[1] != size:  # a server mixing 256 and 512 px tiles: nearest-neighbour resize
            index = np.arange(size) * rgba.shape[1] // size
            rgba = rgba[:, index][:, :, index]
        row, col = (tile.y - ymin) * size, (tile.x - xmin) * size
        mosaic[:, row:row + size, col:col + size] = rgba
    minx, _, _, maxy = tile_bounds_mercator(Tile(xmin, ymin, zoom))
    res = 2 * ORIGIN_SHIFT / 2 ** zoom / size
    return mosaic, Affine(res, 0, minx, 0, -res, maxy)


def utm_crs(lon: float, lat: float) -> str:
    """The WGS84 UTM zone holding (lon, lat), e.g. EPSG:32617."""
    zone = int((lon + 180) // 6) % 60 + 1
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def aoi_grid(bounds: tuple[float, float, float, float], crs: str, res: float) -> Grid:
    """A grid of `res` covering `bounds` (in `crs`), its edges on multiples of
    `res` so that fetches of overlapping AOIs share pixel edges."""
    minx, miny, maxx, maxy = bounds
    minx, miny = round(math.floor(minx / res) * res, 9), round(math.floor(miny / res) * res, 9)  # no 0.30000000000000004
    width = max(1, math.ceil(round((maxx - minx) / res, 6)))
    height = max(1, math.ceil(round((maxy - miny) / res, 6)))
    if width * height > MAX_PIXELS:
        raise EngineError("TOO_LARGE", f"The AOI at {res} m per pixel is {width} x {height} pixels, more than "
                          f"{MAX_PIXELS:,}.", "Draw a smaller area or use a larger --gsd.")
    return Grid(crs, Affine(res, 0, minx, 0, -res, round(miny + height * res, 9)), width, height)


def warp_rgba(src: np.ndarray, src_transform: Affine, src_crs: str, grid: Grid, resampling: Resampling) -> np.ndarray:
    """Warp an RGBA array onto `grid`; the alpha band weights the resampling,
    so empty tiles do not bleed dark edges into the imagery."""
    dst = np.zeros((4, grid.height, grid.width), np.uint8)
    reproject(src, dst, src_transform=src_transform, src_crs=src_crs, dst_transform=grid.transform,
              dst_crs=grid.crs, resampling=resampling, src_alpha=4, dst_alpha=4)
    return dst


def write_geotiff(out: Path, data: np.ndarray, profile: dict[str, Any], mask: np.ndarray | None = None,
                  colorinterp: Iterable[ColorInterp] | None = None) -> None:
    """Write `data` (bands, rows, cols) atomically as a tiled, deflate GeoTIFF with
    overviews; `mask` (0 = no data) becomes an internal mask band."""
    count, height, width = data.shape
    profile = {**profile, "driver": "GTiff", "count": count, "height": height, "width": width,
               "dtype": data.dtype.name, "tiled": True, "blockxsize": 256, "blockysize": 256,
               "compress": "deflate", "interleave": "pixel", "BIGTIFF": "IF_SAFER"}
    profile.pop("photometric", None)  # e.g. YCbCr from a JPEG-compressed source: not valid with deflate
    factors = [2 ** i for i in range(1, 8) if max(width, height) / 2 ** i >= 128]
    # An internal mask travels with the file through the atomic rename; a .msk sidecar would not.
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), atomic_output(out) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            if mask is not None:
                dst.write_mask(np.where(mask > 0, 255, 0).astype(np.uint8))
            if colorinterp is not None:
                dst.colorinterp = list(colorinterp)
            if factors:
                dst.build_overviews(factors, Resampling.average)
                dst.update_tags(ns="rio_overview", resampling="average")


def fetch_xyz(params: FetchParams, reporter: Reporter) -> StageResult:
    started = time.monotonic()
    template = check_template(params.source)
    bounds = params.aoi.to_crs("EPSG:4326").bounds
    lon, lat = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
    zoom = pick_zoom(params.zoom, params.gsd, lat)
    total = count_tiles(bounds, zoom)
    if total == 0:
        raise EngineError("NO_TILES", f"The AOI yields no tiles at zoom {zoom}: Web Mercator tiles stop at "
                          "latitude ±85.05°.", "Draw the AOI between latitudes -85 and 85, or use a local raster.")
    if total > MAX_TILES:
        raise EngineError("TOO_MANY_TILES", f"The AOI needs {total} tiles at zoom {zoom}, more than {MAX_TILES}.",
                          "Draw a smaller area or use a coarser zoom (a lower --zoom or a larger --gsd).")
    crs = utm_crs(lon, lat)
    aoi_bounds = params.aoi.to_crs(crs).bounds
    aoi_grid(aoi_bounds, crs, params.gsd or ground_resolution(lat, zoom, max(TILE_SIZES)))  # too large? ask now
    rng = tile_range(bounds, zoom)
    tiles = list(tiles_covering(bounds, zoom))
    reporter.log(f"fetch: {total} tiles at zoom {zoom} from {host_of(template)}")
    outcomes = download_tiles(template, tiles, TileCache.for_source(params.cache_dir, template), params, reporter)
    check_outcomes(outcomes, template, zoom, reporter)

    mosaic, transform = assemble({o.tile: o.rgba for o in outcomes if o.rgba is not None}, rng, zoom)
    native = ground_resolution(lat, zoom, tile_size=mosaic.shape[1] // (rng[3] - rng[1] + 1))
    gsd = params.gsd or round(native, 3)
    grid = aoi_grid(aoi_bounds, crs, gsd)
    # Bilinear when enlarging or keeping the size; averaging when shrinking, to avoid aliasing.
    rgba = warp_rgba(mosaic, transform, "EPSG:3857", grid,
                     Resampling.bilinear if gsd <= native * 1.5 else Resampling.average)
    if not rgba[3].any():
        raise EngineError("AOI_OUTSIDE_IMAGERY", f"The tiles from {host_of(template)} hold no imagery inside the AOI.",
                          "Check that the AOI lies inside the imagery.")
    write_geotiff(params.out, rgba[:3], {"crs": grid.crs, "transform": grid.transform}, mask=rgba[3],
                  colorinterp=(ColorInterp.red, ColorInterp.green, ColorInterp.blue))

    counts = Counter(o.status for o in outcomes)
    summary = {"zoom": zoom, "tiles": total, "from_cache": counts["cache"], "downloaded": counts["downloaded"],
               "missing": counts["missing"], "failed": counts["failed"], "retried": sum(o.retries for o in outcomes),
               "bytes": sum(o.nbytes for o in outcomes), "seconds": round(time.monotonic() - started, 2),
               "gsd_m": gsd, "crs": crs}
    return StageResult(outputs={"mosaic": str(params.out)}, summary=summary)


def pick_zoom(zoom: int | None, gsd: float | None, lat: float) -> int:
    if zoom is not None:
        if not 0 <= zoom <= MAX_ZOOM:
            raise EngineError("BAD_ZOOM", f"Zoom {zoom} is outside 0..{MAX_ZOOM}.", "Give --zoom between 0 and 24.")
        return zoom
    if gsd is None:
        raise EngineError("NEED_ZOOM", "An XYZ source needs a zoom level or a ground resolution.",
                          "Give --zoom Z or --gsd METRES (the nearest zoom is picked).")
    return nearest_zoom(gsd, lat, max_zoom=MAX_ZOOM)


# --- Local raster -----------------------------------------------------------------------------------


def _outside(src: rasterio.DatasetReader) -> EngineError:
    west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    return EngineError("AOI_OUTSIDE_IMAGERY",
                       f"The AOI does not overlap the imagery {Path(src.name).name}, which covers "
                       f"lon {west:.5f}..{east:.5f}, lat {south:.5f}..{north:.5f} (WGS84).",
                       "Draw the AOI inside the imagery's extent, or give imagery that covers it.")


def crop_window(src: rasterio.DatasetReader, bounds: tuple[float, float, float, float]) -> rasterio.windows.Window:
    """The pixel window of `bounds` (in the raster's CRS), widened to whole
    pixels and clipped to the raster; AOI_OUTSIDE_IMAGERY when empty."""
    window = rasterio.windows.from_bounds(*bounds, transform=src.transform)
    col0, row0 = max(0, math.floor(window.col_off + 1e-6)), max(0, math.floor(window.row_off + 1e-6))
    col1 = min(src.width, math.ceil(window.col_off + window.width - 1e-6))
    row1 = min(src.height, math.ceil(window.row_off + window.height - 1e-6))
    if col1 <= col0 or row1 <= row0:
        raise _outside(src)
    return rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)


def _per_dataset_mask(src: rasterio.DatasetReader) -> bool:
    """True when validity comes from a mask band or alpha, not from nodata."""
    return src.nodata is None and MaskFlags.all_valid not in src.mask_flag_enums[0]


def fetch_local(params: FetchParams, reporter: Reporter) -> StageResult:
    started = time.monotonic()
    with open_raster(params.source) as src:
        if src.crs is None:
            raise EngineError("BAD_IMAGERY", f"{params.source} has no coordinate reference system.",
                              "Georeference the imagery (e.g. with QGIS's Georeferencer) first.")
        src_crs = src.crs.to_string()
        aoi_bounds = params.aoi.to_crs(src_crs).bounds
        window = crop_window(src, aoi_bounds)
        has_mask = _per_dataset_mask(src)
        if params.gsd is None:
            data, transform, crs = src.read(window=window), src.window_transform(window), src_crs
            mask = src.dataset_mask(window=window) if has_mask else None
        else:
            data, mask, transform, crs = _resample_local(src, params.aoi, window, params.gsd, has_mask)
        profile = {"crs": crs, "transform": transform, "nodata": src.nodata}
        write_geotiff(params.out, data, profile, mask=mask, colorinterp=src.colorinterp)
    reporter.progress(STAGE, 1, 1)
    summary = {"zoom": None, "tiles": 0, "from_cache": 0, "downloaded": 0, "missing": 0, "failed": 0, "retried": 0,
               "bytes": 0, "seconds": round(time.monotonic() - started, 2),
               "gsd_m": round(pixel_metres(crs, transform), 6), "crs": crs}
    return StageResult(outputs={"mosaic": str(params.out)}, summary=summary)


def pixel_metres(crs: str, transform: Affine) -> float:
    """The pixel height in metres (degrees converted at about 111 km per degree of latitude)."""
    crs_ = rasterio.crs.CRS.from_user_input(crs)
    if crs_.is_geographic:
        return abs(transform.e) * 111_320
    return abs(transform.e) * (crs_.linear_units_factor[1] if crs_.is_projected else 1.0)


def _resample_local(src: rasterio.DatasetReader, aoi: AOI, window: rasterio.windows.Window, gsd: float,
                    has_mask: bool) -> tuple[np.ndarray, np.ndarray | None, Affine, str]:
    """The AOI at `gsd` m/px: in the raster's CRS when it is in metres, else
    (degrees) in the UTM zone of the AOI's centre."""
    if src.crs.is_projected and src.crs.linear_units_factor[1] == 1.0:
        crs = src.crs.to_string()
    else:
        west, south, east, north = aoi.to_crs("EPSG:4326").bounds
        crs = utm_crs((west + east) / 2, (south + north) / 2)
    # Only the part of the AOI the imagery covers.
    covered = transform_bounds(src.crs, crs, *rasterio.windows.bounds(window, src.transform))
    aoi_bounds = aoi.to_crs(crs).bounds
    grid = aoi_grid((max(covered[0], aoi_bounds[0]), max(covered[1], aoi_bounds[1]),
                     min(covered[2], aoi_bounds[2]), min(covered[3], aoi_bounds[3])), crs, gsd)
    native = abs(src.transform.a) if crs == src.crs.to_string() else gsd
    resampling = Resampling.bilinear if gsd <= native * 1.5 else Resampling.average
    with WarpedVRT(src, crs=crs, transform=grid.transform, width=grid.width, height=grid.height,
                   resampling=resampling, add_alpha=has_mask) as vrt:
        if has_mask:
            return vrt.read(list(range(1, src.count + 1))), vrt.read(src.count + 1), grid.transform, crs
        return vrt.read(), None, grid.transform, crs
