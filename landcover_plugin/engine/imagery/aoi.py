"""Areas of interest: a bounding box or a vector file, in any CRS."""
from __future__ import annotations

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
        return AOI(reproject_geometry(self.geometry, self.crs, crs), crs)


def utm_crs(lon: float, lat: float) -> str:
    """The WGS84 UTM zone holding (lon, lat), e.g. EPSG:32617: a metric CRS for areas and mosaics."""
    zone = min(int((lon + 180) // 6) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def same_crs(a: str, b: str) -> bool:
    from rasterio.crs import CRS

    return CRS.from_user_input(a) == CRS.from_user_input(b)


def reproject_geometry(geometry: BaseGeometry, src_crs: str, dst_crs: str) -> BaseGeometry:
    from rasterio.warp import transform_geom

    if same_crs(src_crs, dst_crs):
        return geometry
    return shape(transform_geom(src_crs, dst_crs, mapping(geometry)))


def reproject_geometries(geoms: list, src_crs: str, dst_crs: str) -> list:
    """Reproject many geometries with one coordinate transform (shapely.transform batches them)."""
    import numpy as np
    import shapely
    from rasterio.warp import transform

    if same_crs(src_crs, dst_crs):
        return geoms

    def fn(xy):
        if not len(xy):
            return xy
        x, y = transform(src_crs, dst_crs, xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return list(shapely.transform(np.asarray(geoms, dtype=object), fn))


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
        if minx >= maxx or miny >= maxy:
            raise EngineError("BAD_AOI", f"AOI '{text}' is empty: min must be below max.",
                              "Give minx,miny,maxx,maxy with minx < maxx and miny < maxy.")
        if crs.upper() in ("EPSG:4326", "OGC:CRS84") and not (-180 <= minx <= 180 and -90 <= miny <= 90
                                                             and -180 <= maxx <= 180 and -90 <= maxy <= 90):
            raise EngineError("BAD_AOI", f"AOI '{text}' is not in longitude/latitude degrees.",
                              "Give WGS84 degrees, or name the AOI's CRS with --aoi-crs.")
        return AOI(box(minx, miny, maxx, maxy), crs)
    path = Path(text)
    if not path.exists():
        raise EngineError("BAD_AOI", f"AOI '{text}' is neither minx,miny,maxx,maxy nor an existing file.",
                          "Give four comma-separated numbers or the path of a vector file.")
    import fiona
    from shapely.ops import unary_union

    with fiona.open(path) as src:
        geoms = [shape(f["geometry"]) for f in src if f["geometry"]]
        file_crs = src.crs.to_string() if src.crs else crs
    if not geoms:
        raise EngineError("BAD_AOI", f"AOI file {path} has no geometry.", "Draw at least one polygon in it.")
    return AOI(unary_union(geoms), file_crs)
