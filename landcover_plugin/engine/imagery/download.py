"""Tiles or WMS pieces, downloaded concurrently and politely, into a temporary mosaic on
the source's grid, while the output is warped window by window as soon as its pieces
are in (`ProgressiveWarp`): CPU work overlaps the network wait, memory stays flat."""
from __future__ import annotations

import queue
import tempfile
import threading
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import rasterio
import requests
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioDeprecationWarning
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ..atomic import partial_path, partial_prefix, remove_stale_partials, replace_with
from ..errors import EngineError
from ..events import Reporter
from ..memory import fix_mmap_threshold
from . import http_client, mosaic
from .decode import _DECODE_LOCK, TILE_SIZES
from .mbtiles import MBTilesWriter
from .mosaic import Grid, SourceMosaic, Writer, windowed_output, windows
from .tile_cache import MosaicCache, TileCache
from .tiles import Tile

if TYPE_CHECKING:
    from ..stages.fetch import FetchParams


STAGE = "fetch"


# Bump when the warp, the output format or the tile checks change: older finished mosaics are not reused.
# 2: tiles cut short are refused (mosaics made from such tiles before must be made again).
MOSAIC_VERSION = 2


FAIL_FAST = 16  # this many failed tiles before any success: the server is broken, stop asking


LISTED_FAILURES = 50  # failed tiles named in the result summary (all are counted); the warning names fewer


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
    fix_mmap_threshold(128 * 1024)  # tile-sized buffers of many download threads
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
