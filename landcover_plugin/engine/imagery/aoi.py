"""Areas of interest: a bounding box or a vector file, in any CRS."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from ..errors import EngineError


@dataclass(frozen=True)
class AOI:
    """An area of interest: a geometry and the CRS its coordinates are in."""

    geometry: BaseGeometry
    crs: str = "EPSG:4326"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return tuple(self.geometry.bounds)  # type: ignore[return-value]

    def to_crs(self, crs: str) -> "AOI":
        try:
            return AOI(reproject_geometry(self.geometry, self.crs, crs), crs)
        except OutsideProjection as exc:
            from rasterio.crs import CRS

            names = [CRS.from_user_input(c).to_string()[:60] for c in (self.crs, crs)]  # EPSG:nnnn, not WKT
            raise EngineError("BAD_AOI", f"The AOI cannot be put from {names[0]} into {names[1]}: {exc}",
                              "Check the AOI's CRS (--aoi-crs, or the AOI file's own): its coordinates must be "
                              "in it, and near the imagery.") from None


def utm_crs(lon: float, lat: float) -> str:
    """The WGS84 UTM zone holding (lon, lat), e.g. EPSG:32617: a metric CRS for areas and mosaics."""
    zone = min(int((lon + 180) // 6) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def same_crs(a: str, b: str) -> bool:
    from rasterio.crs import CRS

    return CRS.from_user_input(a) == CRS.from_user_input(b)


class OutsideProjection(ValueError):
    """PROJ cannot put the coordinates into the target CRS ("Point outside of projection
    domain"): usually they are in another CRS than the one they are said to be in.
    Callers say which input that was."""


def reproject_geometry(geometry: BaseGeometry, src_crs: str, dst_crs: str) -> BaseGeometry:
    from rasterio._err import CPLE_BaseError
    from rasterio.warp import transform_geom

    if same_crs(src_crs, dst_crs):
        return geometry
    try:
        return shape(transform_geom(src_crs, dst_crs, mapping(geometry)))
    except CPLE_BaseError as exc:
        raise OutsideProjection(str(exc)) from None


def check_crs(crs: str, what: str = "The AOI's CRS") -> str:
    """`crs` as given, once PROJ knows it (an unknown code would fail deep in a stage)."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError as exc:
        raise EngineError("BAD_CRS", f"{what} {crs!r} is not a coordinate reference system PROJ knows: {exc}",
                          "Give an EPSG code such as EPSG:4326 (WGS84) or EPSG:32617 (UTM 17N), or WKT.") from None
    return crs


def crosses_antimeridian(minx: float, maxx: float) -> bool:
    """A longitude box drawn across the 180th meridian: its west edge east of its east
    edge, and less than half the world wide that way round (170,..,-170,..), or an
    edge beyond +-180 (170,..,190,..). A plain swap of min and max (10,..,5,..) is not."""
    wrapped = -180 <= maxx < minx <= 180 and maxx + 360 - minx < 180
    return wrapped or minx < 180 < maxx or minx < -180 < maxx


def reproject_geometries(geoms: list, src_crs: str, dst_crs: str) -> list:
    """Reproject many geometries with one coordinate transform (shapely.transform batches them)."""
    import numpy as np
    import shapely
    from rasterio._err import CPLE_BaseError
    from rasterio.warp import transform

    if same_crs(src_crs, dst_crs):
        return geoms

    def fn(xy):
        if not len(xy):
            return xy
        x, y = transform(src_crs, dst_crs, xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    try:
        return list(shapely.transform(np.asarray(geoms, dtype=object), fn))
    except CPLE_BaseError as exc:
        raise OutsideProjection(str(exc)) from None


def parse_aoi(text: str, crs: str = "EPSG:4326") -> AOI:
    """`minx,miny,maxx,maxy` (in `crs`, WGS84 by default) or a vector file
    (its features' union, in the file's own CRS)."""
    parts = text.split(",")
    if len(parts) == 4:
        try:
            minx, miny, maxx, maxy = (float(p) for p in parts)
        except ValueError:
            raise EngineError("BAD_AOI", f"AOI '{text}' is not four numbers.",
                              "Give minx,miny,maxx,maxy, e.g. --aoi -82.01,29.68,-82.00,29.69") from None
        if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
            raise EngineError("BAD_AOI", f"AOI '{text}' is not four finite numbers.",
                              "Give minx,miny,maxx,maxy, e.g. --aoi -82.01,29.68,-82.00,29.69")
        degrees = crs.upper() in ("EPSG:4326", "OGC:CRS84")
        if degrees and -90 <= miny < maxy <= 90 and crosses_antimeridian(minx, maxx):
            raise EngineError("BAD_AOI", f"AOI '{text}' crosses the antimeridian (180° longitude): the "
                              "tiles, mosaics and UTM zones the stages use stop there.",
                              "Split it in two at 180°, e.g. --aoi 179.5,-17,180,-16 and --aoi -180,-17,-179.5,-16, "
                              "and run each part.")
        if minx >= maxx or miny >= maxy:
            raise EngineError("BAD_AOI", f"AOI '{text}' is empty: min must be below max.",
                              "Give minx,miny,maxx,maxy with minx < maxx and miny < maxy.")
        if degrees and not (-180 <= minx <= 180 and -90 <= miny <= 90 and -180 <= maxx <= 180 and -90 <= maxy <= 90):
            raise EngineError("BAD_AOI", f"AOI '{text}' is not in longitude/latitude degrees.",
                              "Give WGS84 degrees, or name the AOI's CRS with --aoi-crs.")
        return AOI(box(minx, miny, maxx, maxy), check_crs(crs))
    from shapely.ops import unary_union

    features, file_crs = read_aoi_features(Path(text), crs)
    return AOI(unary_union([g for _, g in features]), check_crs(file_crs))


def read_aoi_features(path: Path, crs: str = "EPSG:4326",
                      id_field: str | None = None) -> tuple[list[tuple[str, BaseGeometry]], str]:
    """A vector file's features with a geometry, each with its id (the value of `id_field`,
    else the feature's id), and the file's CRS (`crs` when it has none)."""
    if not path.exists():
        raise EngineError("BAD_AOI", f"AOI '{path}' is neither minx,miny,maxx,maxy nor an existing file.",
                          "Give four comma-separated numbers or the path of a vector file.")
    import fiona
    from fiona.errors import FionaError

    try:
        with fiona.open(path) as src:
            if id_field is not None and id_field not in src.schema["properties"]:
                raise EngineError("BAD_AOI", f"AOI file {path} has no field '{id_field}'.",
                                  f"Give --id-field one of {', '.join(src.schema['properties']) or '(none)'}, "
                                  "or leave it out to use the features' ids.")
            features = [(str(f["properties"][id_field] if id_field else f.id), shape(f["geometry"]))
                        for f in src if f["geometry"]]
            file_crs = src.crs.to_string() if src.crs else crs
    except FionaError as exc:
        raise EngineError("BAD_AOI", f"Cannot read AOI file {path}: {exc}",
                          "Give a vector file GDAL can open (GeoPackage, Shapefile, GeoJSON) with a polygon.") from None
    if not features:
        raise EngineError("BAD_AOI", f"AOI file {path} has no geometry.", "Draw at least one polygon in it.")
    return features, file_crs


def parse_aoi_areas(text: str | None, crs: str = "EPSG:4326",
                    id_field: str | None = None) -> tuple[tuple[str, AOI], ...]:
    """Each feature of a vector file as an area of its own, with its id (predict --per-feature)."""
    if not text or not Path(text).exists():
        raise EngineError("BAD_AOI", "--per-feature needs --aoi to be a vector file of areas.",
                          "Give --aoi areas.gpkg (one polygon per area, e.g. per orchard block).")
    features, file_crs = read_aoi_features(Path(text), crs, id_field)
    ids = [i for i, _ in features]
    doubles = sorted({i for i in ids if ids.count(i) > 1})
    if doubles:
        raise EngineError("BAD_AOI", f"Areas of {text} share the id {', '.join(doubles[:5])}: their rows could not "
                          "be told apart.", "Give --id-field a field whose values are unique, or leave it out.")
    return tuple((i, AOI(g, check_crs(file_crs))) for i, g in features)
