"""Geometry repair shared by label reading, the OSM labels stage and vectorizing."""
from __future__ import annotations

from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

POLYGONAL = ("Polygon", "MultiPolygon")


def polygonal(geom: BaseGeometry) -> BaseGeometry:
    """`geom` made valid, keeping only its polygonal parts (make_valid turns a bow-tie
    into polygons, but may also return lines and points); empty when none is left."""
    import shapely

    if geom.is_valid and geom.geom_type in POLYGONAL:
        return geom
    fixed = shapely.make_valid(geom)
    return unary_union([g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type in POLYGONAL])
