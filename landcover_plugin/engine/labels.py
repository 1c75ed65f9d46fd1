"""Training labels from a vector file or a DeepForest CSV, in the imagery's CRS.

Two sources:
- any vector file fiona reads: polygons with a class field (land cover) or
  crown polygons (trees), reprojected from the file's CRS to the imagery's;
- a DeepForest CSV of crown boxes `image_path,xmin,ymin,xmax,ymax,label` in
  PIXEL coordinates of a georeferenced image beside the CSV. The boxes go to map
  coordinates through that image's transform, then to the imagery's CRS (the
  imagery may be a fetched mosaic in another CRS and resolution).
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

from shapely.geometry import Polygon, box, mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from .errors import EngineError

# Tried in order when no class field is given (our OSM labels use "class").
DEFAULT_CLASS_FIELDS = ("class", "label", "landcover", "type")
CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class Labels:
    geometries: list[BaseGeometry]  # polygons in the imagery's CRS, those over the imagery
    classes: list[str]  # class name per geometry
    class_names: list[str]  # sorted distinct names
    crs: str  # the imagery's CRS (WKT)
    # Where the annotation is complete (a CSV's image): outside it, "no crown"
    # is unknown rather than background. None: complete everywhere.
    footprint: BaseGeometry | None = None


def read_labels(path: Path, imagery: Path, task: str, class_field: str | None = None) -> Labels:
    """Read labels for `task` ("trees" | "landcover") and bring them into `imagery`'s CRS."""
    from .imagery import open_raster

    path = Path(path)
    if not path.is_file():
        raise EngineError("LABELS_NOT_FOUND", f"Label file {path} does not exist.",
                          "Give a vector file (GeoPackage, Shapefile, GeoJSON) or a DeepForest CSV.")
    with open_raster(imagery) as src:
        crs, bounds = src.crs, box(*src.bounds)
    if crs is None:
        raise EngineError("BAD_IMAGERY", f"Imagery {imagery} has no CRS.",
                          "Georeference the imagery (e.g. gdal_translate -a_srs) before training.")
    crs_wkt = crs.to_wkt()
    if path.suffix.lower() == ".csv":
        geoms, classes, footprint = _read_csv_boxes(path, crs_wkt)
    else:
        geoms, classes = _read_vector(path, crs_wkt, task, class_field)
        footprint = None
    # Only labels over the imagery count: a model's classes are those it saw.
    inside = [i for i, g in enumerate(geoms) if g.intersects(bounds)]
    if not inside:
        raise EngineError("LABELS_OUTSIDE_IMAGERY",
                          f"None of the {len(geoms)} labels in {path.name} overlaps the imagery {Path(imagery).name}.",
                          "Check that labels and imagery cover the same place (and that the label file's CRS is set).")
    geoms, classes = [geoms[i] for i in inside], [classes[i] for i in inside]
    return Labels(geoms, classes, sorted(set(classes)), crs_wkt, footprint)


def _reproject(geom: BaseGeometry, src_crs: str, dst_crs: str) -> BaseGeometry:
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom

    if CRS.from_user_input(src_crs) == CRS.from_user_input(dst_crs):
        return geom
    return shape(transform_geom(src_crs, dst_crs, mapping(geom)))


def _read_vector(path: Path, crs_wkt: str, task: str, class_field: str | None) -> tuple[list, list[str]]:
    import fiona

    try:
        with fiona.open(path) as src:
            fields = list(src.schema["properties"])
            # A file without a CRS is taken to be in the imagery's CRS.
            src_crs = src.crs_wkt or crs_wkt
            features = list(src)
    except fiona.errors.FionaError as exc:
        raise EngineError("BAD_LABELS", f"Cannot read label file {path}: {exc}",
                          "Give a vector file GDAL can open, or a DeepForest CSV.") from None
    field = _class_field(fields, task, class_field, path)
    geoms, classes = [], []
    for feature in features:
        geometry = feature["geometry"]
        value = feature["properties"].get(field) if field else "crown"
        if geometry is None or value is None:
            continue
        geom = shape(geometry)
        if geom.geom_type not in ("Polygon", "MultiPolygon") or geom.is_empty:
            continue  # points and lines carry no area to learn from
        geoms.append(_reproject(geom.buffer(0) if not geom.is_valid else geom, src_crs, crs_wkt))
        classes.append(str(value))
    if not geoms:
        raise EngineError("LABELS_EMPTY", f"Label file {path} has no polygon with a class.",
                          "Draw or download polygons (with a class value) first.")
    return geoms, classes


def _class_field(fields: list[str], task: str, class_field: str | None, path: Path) -> str | None:
    """The attribute holding the class; None for trees without one (all crowns)."""
    if class_field:
        if class_field not in fields:
            raise EngineError("CLASS_FIELD_MISSING",
                              f"Label file {path.name} has no field '{class_field}'; its fields are: "
                              f"{', '.join(fields) or '(none)'}.",
                              "Pick one of those with --class-field.")
        return class_field
    if task == "trees":
        return None
    for name in DEFAULT_CLASS_FIELDS:
        if name in fields:
            return name
    raise EngineError("CLASS_FIELD_MISSING",
                      f"Label file {path.name} has no class field ({', '.join(DEFAULT_CLASS_FIELDS)}); "
                      f"its fields are: {', '.join(fields) or '(none)'}.",
                      "Name the field that holds the land-cover class with --class-field.")


def _read_csv_boxes(path: Path, crs_wkt: str) -> tuple[list, list[str], BaseGeometry]:
    """DeepForest boxes -> polygons in the imagery's CRS, and the union of the
    annotated images' footprints."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EngineError("BAD_LABELS", f"Cannot read label file {path}: {exc}",
                          "Give a DeepForest CSV: image_path,xmin,ymin,xmax,ymax,label.") from None
    if not rows:
        raise EngineError("LABELS_EMPTY", f"Label file {path} has no boxes.",
                          "Annotate at least one crown (image_path,xmin,ymin,xmax,ymax,label).")
    missing = [c for c in CSV_COLUMNS if c not in rows[0]]
    if missing:
        raise EngineError("BAD_LABELS", f"CSV {path.name} lacks the column(s) {', '.join(missing)}.",
                          "A DeepForest CSV has the header image_path,xmin,ymin,xmax,ymax,label.")
    geoms, classes, footprints = [], [], []
    for image_name in sorted({r["image_path"] for r in rows}):
        transform, image_crs, size = _image_georef(path.parent / image_name, path)
        footprints.append(_reproject(_pixel_polygon(transform, 0, 0, *size), image_crs, crs_wkt))
        for r in (r for r in rows if r["image_path"] == image_name):
            try:
                corners = [float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax")]
            except ValueError:
                raise EngineError("BAD_LABELS", f"CSV {path.name} has a non-numeric box: {r}.",
                                  "Box coordinates are pixel numbers.") from None
            geoms.append(_reproject(_pixel_polygon(transform, *corners), image_crs, crs_wkt))
            classes.append(r.get("label") or "crown")
    return geoms, classes, unary_union(footprints)


def _image_georef(image: Path, csv_path: Path):
    """Transform, CRS and (width, height) of an image named in a CSV."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    if not image.is_file():
        raise EngineError("LABEL_IMAGE_NOT_FOUND",
                          f"{csv_path.name} refers to {image.name}, which is not in {image.parent}.",
                          "Put the annotated image beside the CSV (image_path is relative to the CSV's folder).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(image) as src:
            transform, crs, size = src.transform, src.crs, (src.width, src.height)
    if crs is None or transform.is_identity:
        raise EngineError("LABEL_IMAGE_NOT_GEOREFERENCED",
                          f"{image.name} (annotated in {csv_path.name}) has no georeference, so its boxes "
                          "cannot be placed on the map.",
                          "Use a GeoTIFF with a CRS and transform (or add a world file and .prj).")
    return transform, crs.to_wkt(), size


def _pixel_polygon(transform, xmin: float, ymin: float, xmax: float, ymax: float) -> Polygon:
    """A pixel box (columns/rows, y down) as a map polygon (handles rotated transforms)."""
    corners = [(xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax)]
    return Polygon([transform @ c for c in corners])
