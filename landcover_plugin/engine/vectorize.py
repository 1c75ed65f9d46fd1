"""Model output rasters -> vector layers (land-cover polygons, tree crowns and points).

All geometries stay in the imagery's CRS; areas are in m². A geographic CRS
(degrees) is measured in its local UTM zone, so areas are right there too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes, sieve
from rasterio.warp import transform_geom
from scipy import ndimage
from shapely.geometry import MultiPolygon, Point, box, mapping, shape
from shapely.geometry.base import BaseGeometry

MIN_REGION_PIXELS = 4  # land-cover regions smaller than this merge into their neighbours
MIN_CROWN_M2 = 0.5  # smaller crowns are noise
SEED_DISTANCE_M = 1.0  # two tree centres are at least this far apart
SEED_MIN_HEAT = 0.3  # a heatmap peak below this is not a tree centre


@dataclass
class Layer:
    """One GeoPackage layer: `geometry` is a fiona geometry type, None for a plain table."""

    name: str
    geometry: str | None
    fields: dict[str, str]  # fiona field types, in column order
    rows: list[tuple[BaseGeometry | None, dict[str, Any]]] = field(default_factory=list)


# --- measuring -------------------------------------------------------------

def utm_crs(lon: float, lat: float) -> CRS:
    zone = min(int((lon + 180) // 6) + 1, 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


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
    col = width // 2
    pixels = [box(*(transform @ (col, r)), *(transform @ (col + 1, r + 1))) for r in range(height)]
    return areas_m2(pixels, crs)


def pixel_size_m(transform: Affine, crs: CRS, height: int, width: int) -> float:
    """Ground size of a (square-ish) pixel in metres, at the middle of the raster."""
    row = height // 2
    middle = transform @ Affine.translation(0, row)
    return math.sqrt(float(row_pixel_areas(middle, crs, 1, width)[0]))


def _polygonal(geom: BaseGeometry) -> MultiPolygon:
    """A valid MultiPolygon (make_valid may return collections with lines)."""
    geom = shapely.make_valid(geom)
    parts = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type in ("Polygon", "MultiPolygon")]
    polys = [p for g in parts for p in getattr(g, "geoms", [g])]
    return MultiPolygon(polys)


# --- land cover ------------------------------------------------------------

def landcover_layers(classes: np.ndarray, valid: np.ndarray, transform: Affine, crs: CRS,
                     class_names: list[str], min_pixels: int = MIN_REGION_PIXELS) -> list[Layer]:
    """`landcover` (one polygon per connected region, fields class, area_m2) and
    `class_stats` (class, hectares, share_pct over the valid pixels)."""
    # Sieve rather than drop: small specks join their largest neighbour, so the
    # polygons still tile the area and match the statistics.
    classes = sieve(classes.astype(np.int16), min_pixels, mask=valid, connectivity=4)
    pixel_crs_area = abs(transform.a * transform.e - transform.b * transform.d)
    regions = [(shape(g), int(v)) for g, v in shapes(classes, mask=valid, transform=transform, connectivity=4)]
    regions = [(g, v) for g, v in regions if g.area >= min_pixels * pixel_crs_area * 0.999]  # isolated specks
    # Coverage simplification keeps shared edges shared (no slivers or gaps);
    # 0.75 px removes the pixel staircase without moving edges more than ~half a pixel.
    geoms = shapely.coverage_simplify([g for g, _ in regions], 0.75 * math.sqrt(pixel_crs_area)) if regions else []
    geoms = [_polygonal(g) for g in geoms]
    areas = areas_m2(geoms, crs)
    landcover = Layer("landcover", "MultiPolygon", {"class": "str", "area_m2": "float"})
    for geom, (_, value), area in zip(geoms, regions, areas):
        if not geom.is_empty:
            landcover.rows.append((geom, {"class": class_names[value], "area_m2": round(float(area), 2)}))

    stats = Layer("class_stats", None, {"class": "str", "hectares": "float", "share_pct": "float"})
    for name, ha in class_hectares(classes, valid, transform, crs, class_names).items():
        stats.rows.append((None, {"class": name, "hectares": ha, "share_pct": 0.0}))
    total = sum(r["hectares"] for _, r in stats.rows)
    for _, row in stats.rows:
        row["share_pct"] = round(100.0 * row["hectares"] / total, 3) if total else 0.0
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


def tree_layers(prob: np.ndarray, heat: np.ndarray, valid: np.ndarray, transform: Affine, crs: CRS,
                threshold: float, min_area_m2: float = MIN_CROWN_M2,
                seed_distance_m: float = SEED_DISTANCE_M) -> list[Layer]:
    """`crowns` (polygon per tree) and `trees` (point per tree at its centre), both with
    tree_id, area_m2, diameter_m (equivalent circle) and confidence (mean crown probability)."""
    crown = (prob > threshold) & valid
    radius_px = max(1, round(seed_distance_m / pixel_size_m(transform, crs, *prob.shape)))
    trees, tree_seeds = split_crowns(crown, find_seeds(heat, crown, radius_px))

    parts: dict[int, list[BaseGeometry]] = {}
    for g, v in shapes(trees, mask=trees > 0, transform=transform, connectivity=4):
        parts.setdefault(int(v), []).append(shape(g))
    ids = sorted(parts)
    geoms = [_polygonal(shapely.union_all(parts[i])) for i in ids]
    areas = areas_m2(geoms, crs)
    confidence = ndimage.mean(prob, trees, ids) if ids else []

    fields = {"tree_id": "int", "area_m2": "float", "diameter_m": "float", "confidence": "float"}
    crowns, points = Layer("crowns", "MultiPolygon", fields), Layer("trees", "Point", dict(fields))
    for i, geom, area, conf in zip(ids, geoms, areas, confidence):
        if area < min_area_m2:
            continue
        seed = tree_seeds[i]
        centre = Point(transform @ (seed[1] + 0.5, seed[0] + 0.5)) if seed else geom.centroid
        if seed is None and not geom.contains(centre):
            centre = geom.representative_point()  # a crescent's centroid lies outside it
        row = {"tree_id": len(crowns.rows) + 1, "area_m2": round(float(area), 3),
               "diameter_m": round(2 * math.sqrt(area / math.pi), 3), "confidence": round(float(conf), 4)}
        crowns.rows.append((geom, row))
        points.rows.append((centre, dict(row)))
    return [crowns, points]


# --- writing ---------------------------------------------------------------

def write_gpkg(path: Path, layers: list[Layer], crs: CRS) -> None:
    """Write the layers into one GeoPackage (the caller makes it atomic)."""
    import fiona

    for layer in layers:
        schema = {"geometry": layer.geometry or "None", "properties": dict(layer.fields)}
        with fiona.open(path, "w", driver="GPKG", layer=layer.name, schema=schema,
                        crs_wkt=crs.to_wkt() if layer.geometry else None) as dst:
            dst.writerecords({"geometry": mapping(g) if g is not None else None, "properties": props}
                             for g, props in layer.rows)
