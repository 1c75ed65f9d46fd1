"""Model output rasters -> vector layers (land-cover polygons, tree crowns and points).

All geometries stay in the imagery's CRS; areas are in m². A geographic CRS
(degrees) is measured in its local UTM zone, so areas are right there too.
"""
from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes, sieve
from rasterio.warp import transform_geom
from shapely.geometry import MultiPolygon, box, mapping, shape
from shapely.geometry.base import BaseGeometry

from ...contract.names import NODATA  # class raster value of pixels outside the AOI or without imagery
from ..imagery.aoi import utm_crs
from .coverage import PixelPolygons, simplify_coverage

MIN_REGION_PIXELS = 4  # land-cover regions smaller than this merge into their neighbours
SEED_MIN_HEAT = 0.3  # a heatmap peak below this is not a tree centre


@dataclass
class Layer:
    """One GeoPackage layer: `geometry` is a fiona geometry type, None for a plain table."""

    name: str
    geometry: str | None
    fields: dict[str, str]  # fiona field types, in column order
    rows: list[tuple[BaseGeometry | None, dict[str, Any]]] = field(default_factory=list)


# --- measuring -------------------------------------------------------------

def areas_m2(geoms: list[BaseGeometry], crs: CRS) -> np.ndarray:
    """Areas in m² of geometries in `crs` (degrees are measured in the local UTM zone)."""
    if not geoms:
        return np.zeros(0)
    if crs.is_geographic:
        lon, lat = shapely.union_all([g.envelope for g in geoms]).centroid.coords[0]
        projected = transform_geom(crs, utm_crs(lon, lat), [mapping(g) for g in geoms])
        return np.array([shape(g).area for g in projected])
    return shapely.area(np.asarray(geoms, dtype=object)) * crs.linear_units_factor[1] ** 2


def row_pixel_areas(transform: Affine, crs: CRS, height: int, width: int) -> np.ndarray:
    """m² of one pixel in each row (constant when projected; shrinks towards the poles
    in degrees). Measured at the middle column."""
    if not crs.is_geographic:  # the same everywhere: no geometry needed
        return np.full(height, abs(transform.determinant) * crs.linear_units_factor[1] ** 2)
    col = width // 2
    pixels = [box(*(transform @ (col, r)), *(transform @ (col + 1, r + 1))) for r in range(height)]
    return areas_m2(pixels, crs)


def pixel_size_m(transform: Affine, crs: CRS, height: int, width: int) -> float:
    """Ground size of a (square-ish) pixel in metres, at the middle of the raster."""
    row = height // 2
    middle = transform @ Affine.translation(0, row)
    return math.sqrt(float(row_pixel_areas(middle, crs, 1, width)[0]))


def polygon(geojson: dict) -> BaseGeometry:
    """A GeoJSON polygon from rasterio's shapes() as a shapely Polygon, through numpy
    arrays (2-3x faster than shapely.geometry.shape)."""
    rings = [shapely.linearrings(np.asarray(r, dtype=np.float64)) for r in geojson["coordinates"]]
    return shapely.polygons(rings[0], rings[1:] or None)


def _polygonal(geom: BaseGeometry) -> MultiPolygon:
    """A valid MultiPolygon (make_valid may return collections with lines)."""
    geom = shapely.make_valid(geom)
    parts = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type in ("Polygon", "MultiPolygon")]
    polys = [p for g in parts for p in getattr(g, "geoms", [g])]
    return MultiPolygon(polys)


# --- land cover ------------------------------------------------------------

BLOCK_SIZE = 2048  # pixels per side of a vectorization block: memory stays flat with the area
SIEVE_MARGIN = 8  # context read around a block so that sieving sees whole specks
MAX_WORKERS = 4  # vectorization processes at most (one block each)
SIMPLIFY_PX = 0.75  # Douglas-Peucker tolerance of the polygons' shared edges: removes the pixel staircase


def blocks(height: int, width: int, size: int) -> list[tuple[int, int, int, int]]:
    """(row0, col0, row1, col1) of the blocks covering a raster, row by row."""
    return [(r, c, min(r + size, height), min(c + size, width))
            for r in range(0, height, size) for c in range(0, width, size)]


@dataclass
class BlockJob:
    """One vectorization block: `raw` its classes read with SIEVE_MARGIN around it
    (top-left pixel at `ext_origin`), `block` its (row0, col0, row1, col1)."""

    raw: np.ndarray
    block: tuple[int, int, int, int]
    ext_origin: tuple[int, int]
    shape_hw: tuple[int, int]
    transform: Affine
    crs: CRS
    n_classes: int
    min_pixels: int


def block_polygons(job: BlockJob) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A block's simplified polygons (pixel coordinates), their class values, whether each
    touches an inner block border (it waits for its other parts), and m² per class."""
    (r0, c0, r1, c1), (e0, f0), (height, width) = job.block, job.ext_origin, job.shape_hw
    valid_ext = job.raw != NODATA
    whole = valid_ext.all()  # no mask then: the same result, and sieve and shapes run 20% faster
    # Sieve rather than drop: small specks join their largest neighbour, so the
    # polygons still tile the area and match the statistics.
    sieved = sieve(job.raw, job.min_pixels, mask=None if whole else valid_ext, connectivity=4)  # NODATA stays
    core = np.s_[r0 - e0:r1 - e0, c0 - f0:c1 - f0]
    classes, valid = sieved[core], valid_ext[core]
    traced = list(shapes(classes, mask=None if whole else valid, transform=Affine.translation(c0, r0),
                         connectivity=4))
    pixels = PixelPolygons.from_geojson([g for g, _ in traced])
    values = np.fromiter((v for _, v in traced), np.int64, len(traced))
    px_areas = pixels.areas()
    rows = row_pixel_areas(job.transform * Affine.translation(0, r0), job.crs, r1 - r0, width)
    if (rows == rows[0]).all():  # projected: the traced polygons' areas count the pixels (exact integers)
        m2 = np.bincount(values, px_areas, minlength=256)[:job.n_classes] * rows[0]
    else:
        m2 = np.bincount(classes[valid], np.broadcast_to(rows[:, None], classes.shape)[valid],
                         minlength=job.n_classes)[:job.n_classes]
    geoms = simplify_coverage(pixels, classes, (c0, r0), SIMPLIFY_PX)
    x0, y0, x1, y1 = shapely.bounds(geoms).T if len(geoms) else np.zeros((4, 0))
    # pieces touching an inner block border (left, top, right, bottom) wait for their other parts
    border = ((c0 > 0) & (x0 <= c0)) | ((r0 > 0) & (y0 <= r0)) | ((c1 < width) & (x1 >= c1)) | \
        ((r1 < height) & (y1 >= r1))
    kept = border | (px_areas >= job.min_pixels * 0.999)  # isolated specks (no neighbour to join) go
    return geoms[kept], values[kept], border[kept], m2


@contextmanager
def block_runner(n_blocks: int):
    """map(fn, jobs) in order: in forked worker processes when there are several blocks
    and cores (rasterio's sieve and shapes hold the GIL, so threads would not help),
    else here. At most two blocks wait per worker, so memory stays flat with the area."""
    workers = min(os.cpu_count() or 1, MAX_WORKERS, n_blocks)
    if workers < 2 or "fork" not in mp.get_all_start_methods():
        yield map
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    # All workers forked now (fork starts them at the first task), not later while a thread
    # of the caller's (predict's read-ahead) may hold a lock the children would inherit held.
    # Garbage collected here first and the rest frozen for the children: a child that collected
    # an inherited onnxruntime session would wait forever for its thread pool's threads,
    # which only the parent has.
    gc.collect()
    gc.freeze()
    try:
        pool.submit(int).result()
    finally:
        gc.unfreeze()

    def ordered(fn, jobs):
        queue: deque = deque()
        for job in jobs:
            queue.append(pool.submit(fn, job))
            if len(queue) > 2 * workers:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()

    try:
        yield ordered
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def landcover_layers(classes: np.ndarray, valid: np.ndarray, transform: Affine, crs: CRS,
                     class_names: list[str], min_pixels: int = MIN_REGION_PIXELS,
                     block_size: int = BLOCK_SIZE) -> list[Layer]:
    """The land-cover layers of an in-memory class raster (see landcover_blocks)."""
    coded = np.where(valid, classes, NODATA).astype(np.uint8)
    read = lambda r0, c0, r1, c1: coded[r0:r1, c0:c1]  # noqa: E731
    return landcover_blocks(read, coded.shape, transform, crs, class_names, min_pixels, block_size)


def landcover_blocks(read, shape_hw: tuple[int, int], transform: Affine, crs: CRS, class_names: list[str],
                     min_pixels: int = MIN_REGION_PIXELS, block_size: int = BLOCK_SIZE,
                     on_block=None) -> list[Layer]:
    """`landcover` (one polygon per connected region, fields class, area_m2) and
    `class_stats` (class, hectares, share_pct over the valid pixels), block by block.

    `read(r0, c0, r1, c1)` returns class indices (uint8, NODATA outside). Polygons
    are traced in pixel coordinates (exact integers), so pieces of a region cut by
    block borders share their edges exactly and are merged by a union (no seams).
    """
    height, width = shape_hw
    plan = blocks(height, width, block_size)

    def jobs():
        for r0, c0, r1, c1 in plan:
            e0, f0, e1, f1 = sieve_window((r0, c0, r1, c1), shape_hw)
            yield BlockJob(read(e0, f0, e1, f1), (r0, c0, r1, c1), (e0, f0), shape_hw, transform, crs,
                           len(class_names), min_pixels)

    with block_runner(len(plan)) as run:
        return landcover_from_blocks(run(block_polygons, jobs()), transform, crs, class_names, on_block, len(plan))


def sieve_window(block: tuple[int, int, int, int], shape_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) read for a block: the block and SIEVE_MARGIN around it, within the raster."""
    (r0, c0, r1, c1), (height, width) = block, shape_hw
    return max(r0 - SIEVE_MARGIN, 0), max(c0 - SIEVE_MARGIN, 0), min(r1 + SIEVE_MARGIN, height), \
        min(c1 + SIEVE_MARGIN, width)


def landcover_from_blocks(results, transform: Affine, crs: CRS, class_names: list[str], on_block=None,
                          n_blocks: int = 0) -> list[Layer]:
    """The land-cover layers from `block_polygons`' results in plan order (made here or on
    a cluster): pieces touching an inner block border are merged by a union."""
    done: list[tuple[BaseGeometry, int]] = []
    pending: dict[int, list[BaseGeometry]] = {}  # pieces touching an inner block border, by class
    m2 = np.zeros(len(class_names))
    for n, (geoms, values, border, block_m2) in enumerate(results, start=1):
        m2 += block_m2
        for geom, v, b in zip(geoms, values, border):
            if b:
                pending.setdefault(int(v), []).append(geom)
            else:
                done.append((geom, int(v)))
        if on_block:
            on_block(n, n_blocks)
    for v, pieces in pending.items():
        merged = shapely.union_all(pieces)
        done.extend((g, v) for g in getattr(merged, "geoms", [merged]))

    to_crs = lambda xy: np.column_stack(transform * (xy[:, 0], xy[:, 1]))  # noqa: E731
    geoms = shapely.transform(np.array([g for g, _ in done], dtype=object), to_crs)  # all at once
    ok = shapely.is_valid(geoms)
    geoms = [g if k else _polygonal(g) for g, k in zip(geoms, ok)]  # repair only the rare invalid one
    areas = areas_m2(geoms, crs)
    landcover = Layer("landcover", "MultiPolygon", {"class": "str", "area_m2": "float"})
    for geom, (_, value), area in zip(geoms, done, areas):
        if not geom.is_empty:
            landcover.rows.append((geom, {"class": class_names[value], "area_m2": round(float(area), 2)}))

    stats = Layer("class_stats", None, {"class": "str", "hectares": "float", "share_pct": "float"})
    total = m2.sum()
    for name, area in zip(class_names, m2):
        stats.rows.append((None, {"class": name, "hectares": round(float(area) / 1e4, 6),
                                  "share_pct": round(100.0 * float(area) / total, 3) if total else 0.0}))
    return [landcover, stats]


def class_hectares(classes: np.ndarray, valid: np.ndarray, transform: Affine, crs: CRS,
                   class_names: list[str]) -> dict[str, float]:
    """Hectares per class over the valid pixels (pixel areas per row, so degrees work)."""
    rows = row_pixel_areas(transform, crs, *classes.shape)
    weights = np.broadcast_to(rows[:, None], classes.shape)[valid]
    m2 = np.bincount(classes[valid].astype(np.int64), weights, minlength=len(class_names))
    return {name: round(float(m2[i]) / 1e4, 6) for i, name in enumerate(class_names)}


# --- trees -----------------------------------------------------------------

def find_seeds(heat: np.ndarray, crown: np.ndarray, radius_px: int,
               min_heat: float = SEED_MIN_HEAT) -> list[tuple[int, int]]:
    """Tree centres: heatmap maxima within `radius_px`, above `min_heat`, inside crowns.
    A plateau of equal maxima gives one seed."""
    from scipy import ndimage  # here: a land-cover run does not pay scipy's import (0.3 s)

    size = 2 * radius_px + 1
    peaks = (heat == ndimage.maximum_filter(heat, size=size, mode="constant", cval=0.0))
    peaks &= (heat > min_heat) & crown
    labels, n = ndimage.label(peaks)
    seeds = []
    for k, slc in enumerate(ndimage.find_objects(labels), start=1):
        rows, cols = np.nonzero(labels[slc] == k)
        i = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))  # plateau pixel nearest its centre
        seeds.append((int(rows[i] + slc[0].start), int(cols[i] + slc[1].start)))
    return seeds


def split_crowns(crown: np.ndarray, seeds: list[tuple[int, int]]) -> tuple[np.ndarray, dict[int, tuple[int, int] | None]]:
    """Label each tree: every connected crown region is split between the seeds in it
    (each pixel goes to its nearest seed); a region without a seed is one tree.
    Returns the tree-id raster (0 = no tree) and each tree's seed (None when it had none)."""
    from scipy import ndimage

    components, _ = ndimage.label(crown)
    by_component: dict[int, list[tuple[int, int]]] = {}
    for r, c in seeds:
        by_component.setdefault(int(components[r, c]), []).append((r, c))
    trees = np.zeros(crown.shape, np.int32)
    tree_seeds: dict[int, tuple[int, int] | None] = {}
    for k, slc in enumerate(ndimage.find_objects(components), start=1):
        inside = components[slc] == k
        own = by_component.get(k, [])
        if len(own) <= 1:
            tree_seeds[len(tree_seeds) + 1] = own[0] if own else None
            trees[slc][inside] = len(tree_seeds)
            continue
        seed_img = np.zeros(inside.shape, np.int32)
        for r, c in own:
            tree_seeds[len(tree_seeds) + 1] = (r, c)
            seed_img[r - slc[0].start, c - slc[1].start] = len(tree_seeds)
        _, (ri, ci) = ndimage.distance_transform_edt(seed_img == 0, return_indices=True)
        trees[slc][inside] = seed_img[ri, ci][inside]
    return trees, tree_seeds


# --- writing ---------------------------------------------------------------

def _column(values: list, kind: str) -> np.ndarray:
    """A field's values as the array pyogrio writes: floats with NaN for null, else objects."""
    if kind == "float":
        return np.array([np.nan if v is None else v for v in values], np.float64)
    if kind == "int" and None not in values:
        return np.array(values, np.int64)
    return np.array(values, dtype=object)


class GpkgWriter:
    """Layers written into one GeoPackage (the caller makes it atomic), a layer at a
    time or in batches of rows: a batch is appended to its layer, so a big layer is
    written as it is made and never held whole. Geometries go to GDAL as WKB arrays
    in one call per batch (pyogrio): fast for 100k polygons."""

    def __init__(self, path: Path, crs: CRS):
        self.path, self.crs = path, crs
        self.names: list[str] = []  # the layers written so far, in order

    def write(self, layer: Layer) -> None:
        """Append `layer.rows` to the layer (made on its first write, even with no rows)."""
        from pyogrio.raw import write

        wkb = None
        if layer.geometry:
            wkb = shapely.to_wkb(np.array([g for g, _ in layer.rows], dtype=object)) if layer.rows else \
                np.array([], dtype=object)
        columns = [_column([props[name] for _, props in layer.rows], kind) for name, kind in layer.fields.items()]
        write(str(self.path), wkb, columns, list(layer.fields), layer=layer.name, driver="GPKG",
              geometry_type=layer.geometry, crs=self.crs.to_wkt() if layer.geometry else None,
              append=bool(self.names), promote_to_multi=layer.geometry == "MultiPolygon",
              # GPKG 1.3: QGIS 3.22's GDAL 3.6 warns on the 1.4 that pyogrio's GDAL writes by default
              dataset_options=None if self.names else {"VERSION": "1.3"})
        if layer.name not in self.names:
            self.names.append(layer.name)


AREA_FIELD = "area_id"  # predict --per-feature: the area (AOI feature) a row belongs to


class TaggedWriter:
    """A GpkgWriter's view that puts `field` = `value` first in every row of every layer:
    one area of many written into one GeoPackage (predict --per-feature)."""

    def __init__(self, out: GpkgWriter, field: str, value: str):
        self.out, self.field, self.value = out, field, value
        self.path, self.crs, self.names = out.path, out.crs, out.names

    def write(self, layer: Layer) -> None:
        self.out.write(Layer(layer.name, layer.geometry, {self.field: "str", **layer.fields},
                             [(g, {self.field: self.value, **props}) for g, props in layer.rows]))


def write_gpkg(path: Path, layers: list[Layer], crs: CRS) -> None:
    """Write the layers whole into one GeoPackage (the caller makes it atomic)."""
    out = GpkgWriter(path, crs)
    for layer in layers:
        out.write(layer)
