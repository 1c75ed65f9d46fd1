"""`landcover predict --scheduler ADDRESS`: the prediction on a Dask cluster, the same
result as on this machine.

Two kinds of task: a *piece* runs the model over the tiles whose cores fall in a
square of the prediction raster (a whole number of tile cores, so no tile runs
twice) and returns that square's uint8 values; a *block* is a vectorization block
of the local run (the same plan), which joins the pieces under it and its margin
and returns its polygons or trees. Pieces stay on the workers; only vectors come
back, in plan order, and are joined and written here as the local run does
(vector/vectorize.py, stages/predict.py). Blocks are submitted a few ahead of the
ones collected, pieces as the first block needing them goes, so the cluster's
memory stays flat with the area.
"""
from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from ...contract.names import NODATA
from ..cluster import register_sessions, worker_address, worker_session
from ..events import Reporter
from ..imagery.raster import open_raster
from ..learn.inference import AoiPixels, Tile, encode, run_batches
from ..learn.model_package import ModelInfo
from ..vector.trees import TreeParams, block_trees
from ..vector.vectorize import MIN_REGION_PIXELS, BlockJob, block_polygons, blocks, sieve_window
from .predict import GDAL_CACHE_BYTES, tree_block, tree_margin

Rect = tuple[int, int, int, int]  # row0, col0, row1, col1 in the prediction raster


@dataclass(frozen=True)
class ClusterJob:
    """What every task needs; the prediction raster is the imagery's AOI `window`."""

    model_file: Path
    imagery: Path
    info: ModelInfo  # its input scale fitted to the imagery
    window: Window
    aoi: AoiPixels
    crs: CRS
    transform: Affine  # of the prediction raster
    channels: int
    batch_size: int
    threads: int  # onnxruntime threads per task
    block_size: int
    trees: TreeParams | None = None  # None: land cover
    nir: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.window.height), int(self.window.width)


def piece_side(stride: int, block_size: int) -> int:
    """Side of a piece: whole tile cores, about a vectorization block."""
    return stride * max(1, round(block_size / stride))


def group_tiles(tiles: list[Tile], side: int) -> dict[tuple[int, int], list[Tile]]:
    """The tiles by the piece holding their core's top-left pixel."""
    groups: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        groups.setdefault(((t.row + t.overlap) // side, (t.col + t.overlap) // side), []).append(t)
    return groups


def piece_rect(key: tuple[int, int], side: int, shape: tuple[int, int]) -> Rect:
    i, j = key
    return i * side, j * side, min((i + 1) * side, shape[0]), min((j + 1) * side, shape[1])


def pieces_under(rect: Rect, side: int, groups: dict) -> list[tuple[int, int]]:
    """The pieces (with tiles) that a rectangle overlaps."""
    r0, c0, r1, c1 = rect
    return [(i, j) for i in range(r0 // side, (r1 - 1) // side + 1) for j in range(c0 // side, (c1 - 1) // side + 1)
            if (i, j) in groups]


def predict_piece(job: ClusterJob, rect: Rect, tiles: list[Tile]) -> np.ndarray:
    """Task: the prediction raster's values over `rect` (as predict_to_raster writes them)."""
    session = worker_session(job.model_file, job.threads, job.info.tile_size)
    r0, c0, r1, c1 = rect
    out = np.full((job.channels, r1 - r0, c1 - c0), NODATA, np.uint8)
    overlap = job.info.tile_overlap
    stride = job.info.tile_size - 2 * overlap
    quiet = Reporter(json_mode=True, out=io.StringIO())  # the blocks' progress is reported, not the tiles'
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), open_raster(job.imagery) as src:
        for batch, probs, oks in run_batches(session, src, job.info, job.window, job.aoi, tiles, job.batch_size, quiet):
            for tile, values, ok in zip(batch, encode(probs, job.info), oks):
                ys, xs = tile.core
                top, left = tile.row + overlap - r0, tile.col + overlap - c0
                h, w = min(stride, r1 - r0 - top), min(stride, c1 - c0 - left)
                out[:, top:top + h, left:left + w] = np.where(ok[:h, :w], values[:, ys, xs][:, :h, :w], NODATA)
    return out


def join_pieces(rect: Rect, parts: list[tuple[Rect, np.ndarray]], channels: int) -> np.ndarray:
    """The prediction raster over `rect` from the pieces overlapping it (NODATA where none)."""
    r0, c0, r1, c1 = rect
    out = np.full((channels, r1 - r0, c1 - c0), NODATA, np.uint8)
    for (p0, q0, p1, q1), values in parts:
        a0, b0, a1, b1 = max(r0, p0), max(c0, q0), min(r1, p1), min(c1, q1)
        if a1 > a0 and b1 > b0:
            out[:, a0 - r0:a1 - r0, b0 - c0:b1 - c0] = values[:, a0 - p0:a1 - p0, b0 - q0:b1 - q0]
    return out


def landcover_block(job: ClusterJob, block: Rect, ext: Rect, parts: list) -> tuple[tuple, str]:
    """Task: block_polygons of one block (read with its sieve margin `ext`), and who ran it."""
    raw = join_pieces(ext, parts, 1)[0]
    block_job = BlockJob(raw, block, ext[:2], job.shape, job.transform, job.crs, len(job.info.class_names),
                         MIN_REGION_PIXELS)
    return block_polygons(block_job), worker_address()


def trees_block(job: ClusterJob, block: Rect, ext: Rect, parts: list) -> tuple[list, str]:
    """Task: the trees whose centre lies in one block (read with its margin `ext`), and who ran it."""
    data = join_pieces(ext, parts, job.channels)
    (r0, c0, r1, c1), (e0, f0, e1, f1) = block, ext
    win = Window(f0, e0, f1 - f0, e1 - e0)
    img = Window(f0 + job.window.col_off, e0 + job.window.row_off, f1 - f0, e1 - e0)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), open_raster(job.imagery) as src:
        tb = tree_block(data, window_transform(win, job.transform), np.s_[r0 - e0:r1 - e0, c0 - f0:c1 - f0],
                        src, img, job.nir)
    return block_trees(tb, job.crs, job.trees), worker_address()


def block_extents(job: ClusterJob) -> tuple[list[Rect], list[Rect]]:
    """The local run's vectorization blocks and what each reads around it."""
    plan = blocks(*job.shape, job.block_size)
    if job.trees is None:
        return plan, [sieve_window(b, job.shape) for b in plan]
    m = tree_margin(job.transform, job.crs, *job.shape)
    h, w = job.shape
    return plan, [(max(r0 - m, 0), max(c0 - m, 0), min(r1 + m, h), min(c1 + m, w)) for r0, c0, r1, c1 in plan]


class ClusterRun:
    """The blocks' results of one prediction on a cluster; `workers` who ran them."""

    def __init__(self, client, job: ClusterJob, tiles: list[Tile]):
        self.client, self.job, self.tiles = client, job, tiles
        self.workers: set[str] = set()

    def results(self, reporter: Reporter) -> Iterator:
        """Each block's result (block_polygons' or block_trees'), in plan order."""
        client, job = self.client, self.job
        register_sessions(client)
        side = piece_side(job.info.tile_size - 2 * job.info.tile_overlap, job.block_size)
        groups = group_tiles(self.tiles, side)
        plan, exts = block_extents(job)
        needs = [pieces_under(ext, side, groups) for ext in exts]
        last_use = {key: i for i, keys in enumerate(needs) for key in keys}
        task = landcover_block if job.trees is None else trees_block
        ahead = 2 * sum(client.nthreads().values()) + 2  # enough queued to keep every worker thread busy
        pieces: dict = {}

        def submit(i: int):
            for key in needs[i]:
                if key not in pieces:
                    pieces[key] = client.submit(predict_piece, job, piece_rect(key, side, job.shape), groups[key],
                                                pure=False)
            parts = [(piece_rect(key, side, job.shape), pieces[key]) for key in needs[i]]
            future = client.submit(task, job, plan[i], exts[i], parts, pure=False)
            for key in needs[i]:
                if last_use[key] == i:
                    del pieces[key]  # held by the blocks that need it, and freed after the last
            return future

        queue: deque = deque()
        done = 0

        def collect():
            nonlocal done
            result, worker = queue.popleft().result()  # a task's error is raised here
            self.workers.add(worker)
            done += 1
            reporter.progress("predict", done, len(plan), f"blocks on {len(self.workers)} workers")
            return result

        reporter.progress("predict", 0, len(plan), "blocks on the cluster")
        for i in range(len(plan)):
            queue.append(submit(i))
            if len(queue) > ahead:
                yield collect()
        while queue:
            yield collect()
