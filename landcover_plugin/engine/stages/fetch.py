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
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ...contract.names import RESOLUTION_TOLERANCE
from ..atomic import check_out_path
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..imagery import http_client, wms
from ..imagery.aoi import AOI, check_crs, utm_crs
from ..imagery.decode import decode_tile, decode_wms
from ..imagery.download import STAGE, Job, Layout, Remote, fetch_remote
from ..imagery.http_client import host_of
from ..imagery.mbtiles import MBTilesWriter
from ..imagery.mosaic import Grid, aligned_grid, write_windowed
from ..imagery.raster import open_raster, reading
from ..imagery.tile_cache import DEFAULT_MAX_AGE_DAYS, TileCache
from ..imagery.tiles import (ORIGIN_SHIFT, Tile, count_tiles, expand_template, ground_resolution, nearest_zoom,
                             template_tile_size, tile_bounds_mercator, tile_range, tiles_covering)

MAX_TILES = 20_000  # default cap: beyond this the user has probably mis-sized the AOI or the zoom
MAX_BYTES = 2_000_000_000  # default cap on the estimated download
EST_TILE_BYTES = 25_000  # a typical 256-px aerial tile (JPEG/PNG), for the estimate
EST_TILE_SECONDS = 0.3  # a typical tile request, for the time estimate
MAX_PIXELS = 4_000_000_000  # output grid limit (catches a --gsd typo); the mosaic is written in windows
MAX_ZOOM = 24
DEFAULT_RATE = 100.0  # requests per second per host: polite, yet no brake for 16 workers at ~200 ms a tile


@dataclass(frozen=True)
class FetchParams:
    aoi: AOI
    source: str  # XYZ URL template, WMS GetMap URL, or a local raster path
    out: Path
    zoom: int | None = None
    gsd: float | None = None  # metres/pixel: picks the nearest zoom (XYZ) and the output resolution
    max_zoom: int | None = None  # the XYZ source's last zoom level (a street map server stops at 19)
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


def check_template(template: str) -> str:
    if not urlsplit(template).hostname:
        raise EngineError("BAD_SOURCE", f"XYZ source has no host: {template.split('?')[0]}",
                          "Give an XYZ template like https://host/{z}/{x}/{y}.png")
    xyz = all(key in template for key in ("{x}", "{z}")) and ("{y}" in template or "{-y}" in template)
    if not (xyz or "{q}" in template):
        raise EngineError("BAD_SOURCE", f"XYZ source {template.split('?')[0]} lacks {{x}}, {{y}} or {{z}} "
                          "(or a {q} quadkey).", "Give an XYZ template with the {z}, {x} and {y} placeholders.")
    return template


# --- remote sources: the caps, the output grid, the session ------------------------------------------


def estimate(jobs: int, piece_bytes: int, workers: int, rate: float) -> tuple[int, float]:
    """(bytes, seconds) a download of `jobs` pieces will take, roughly."""
    per_second = max(1, workers) / EST_TILE_SECONDS
    if rate and rate > 0:
        per_second = min(per_second, rate)
    return jobs * piece_bytes, jobs / per_second


def aoi_grid(bounds: tuple[float, float, float, float], crs: str, res: float) -> Grid:
    return aligned_grid(bounds, crs, res, MAX_PIXELS)


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


def make_remote(params: FetchParams, source_key: str, url: str, decode: Callable[[bytes], np.ndarray]) -> Remote:
    return Remote(http_client.make_session(http_client.request_headers(params.headers), params.workers),
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
    if params.max_zoom is not None and zoom > params.max_zoom:  # the server has no tiles there
        reporter.log(f"fetch: the source stops at zoom {params.max_zoom} "
                     f"({ground_resolution(lat, params.max_zoom, size):.3g} m/px here): fetching that instead of "
                     f"zoom {zoom}", level="warning")
        zoom = params.max_zoom
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


def covered_share(src: rasterio.DatasetReader, bounds: tuple[float, float, float, float], window: Window) -> float:
    """The share of the AOI's bounding box (in the raster's CRS) that `window` (clipped to the
    raster) covers: below 1 the mosaic holds only the imagery's part of the AOI."""
    whole = rasterio.windows.from_bounds(*bounds, transform=src.transform)
    return min(1.0, window.width * window.height / max(whole.width * whole.height, 1e-9))


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
        bounds = params.aoi.to_crs(src.crs.to_string()).bounds
        window = crop_window(src, bounds)
        covered = covered_share(src, bounds, window)
        if covered < 0.99:  # e.g. a 2,000 km AOI over a 40 km raster: say so rather than crop in silence
            reporter.log(f"The imagery {Path(params.source).name} covers {covered:.0%} of the AOI: the mosaic "
                         "holds that part only.", level="warning")
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
               "gsd_m": round(pixel_metres(crs, transform), 6), "crs": crs, "native_gsd_m": round(native, 6),
               "aoi_covered": round(covered, 4)}
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
