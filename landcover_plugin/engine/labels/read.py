"""Training labels in the imagery's CRS, from the user's files or our OSM labels.

Sources for a dataset:
- any vector file fiona reads: polygons with a class field (land cover) or
  crown polygons (trees), reprojected from the file's CRS to the imagery's;
- a DeepForest CSV of crown boxes `image_path,xmin,ymin,xmax,ymax,label` in
  PIXEL coordinates of a georeferenced image beside the CSV. The boxes go to map
  coordinates through that image's transform, then to the imagery's CRS (the
  imagery may be a fetched mosaic in another CRS and resolution). Pascal VOC
  XML boxes are read the same way;
- tree positions (trees only): a vector file of points (any CRS), or a CSV with
  columns x,y (in the imagery's CRS) or lon,lat (WGS84). Only the centre heatmap
  is learnt from them (see rasterize.py): `Labels.points` is True.

Invalid polygons are repaired (make_valid) or skipped, and counted. Our OSM
labels carry a `priority` field (overlap order) and a `landcover_info` table
(source, preset, date, attribution) that the dataset copies into its catalog.
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

from shapely.geometry import Polygon, box, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from ..errors import EngineError
from ..imagery.aoi import OutsideProjection, reproject_geometries, reproject_geometry
from ..vector.geometry import POLYGONAL, polygonal

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
    priorities: list[int] | None = None  # per geometry (our OSM labels): higher wins overlaps
    info: dict | None = None  # provenance of our labels GeoPackages (source, preset, date)
    repaired: int = 0  # invalid geometries repaired
    skipped: int = 0  # features without a usable polygon
    points: bool = False  # the geometries are tree positions (Points), not crowns or areas
    no_area_classes: tuple[str, ...] = ()  # classes given only as points or lines: nothing to learn from


def read_labels(path: Path, imagery: Path, task: str, class_field: str | None = None,
                class_map: dict[str, str] | None = None) -> Labels:
    """Read labels for `task` ("trees" | "landcover") and bring them into `imagery`'s CRS.
    `class_map` renames class values (e.g. codes -> names); a value it lacks is an error."""
    from ..imagery.raster import open_raster

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
    priorities, counts = None, {"repaired": 0, "skipped": 0}
    points = False
    try:
        if path.suffix.lower() == ".csv" and _is_points_csv(path):
            geoms, footprint, points = _read_csv_points(path, crs_wkt), None, True
            classes = ["crown"] * len(geoms)
        elif path.suffix.lower() in (".csv", ".xml"):
            read_boxes = _read_csv_boxes if path.suffix.lower() == ".csv" else _read_voc_boxes
            geoms, classes, footprint = read_boxes(path, crs_wkt)
        else:
            geoms, classes, priorities, counts = _read_vector(path, crs_wkt, task, class_field)
            footprint, points = None, geoms[0].geom_type == "Point"
    except OutsideProjection as exc:
        raise EngineError("LABELS_OUTSIDE_IMAGERY", f"The labels cannot be put into the imagery's CRS: {exc}",
                          "Check the labels' CRS (a GeoJSON without one is read as WGS84 degrees) and that "
                          "they lie on the imagery.") from None
    if points and task != "trees":
        raise EngineError("POINT_LABELS_NEED_TREES", f"{path.name} holds points (tree positions), which carry "
                          "no area to learn land cover from.", "Use --task trees, or give polygons.")
    if class_map:
        classes = _map_classes(classes, class_map, path)
    # Only labels over the imagery count: a model's classes are those it saw.
    inside = [i for i, g in enumerate(geoms) if g.intersects(bounds)]
    if not inside:
        raise EngineError("LABELS_OUTSIDE_IMAGERY",
                          f"None of the {len(geoms)} labels in {path.name} overlaps the imagery {Path(imagery).name}.",
                          "Check that labels and imagery cover the same place (and that the label file's CRS is set).")
    geoms, classes = [geoms[i] for i in inside], [classes[i] for i in inside]
    if priorities is not None:
        priorities = [priorities[i] for i in inside]
    no_area = tuple(sorted(set(counts.get("no_area", ())) - set(classes)))
    return Labels(geoms, classes, sorted(set(classes)), crs_wkt, footprint, priorities, read_info(path),
                  counts["repaired"], counts["skipped"], points, no_area)


def _read_vector(path: Path, crs_wkt: str, task: str, class_field: str | None
                 ) -> tuple[list, list[str], list[int] | None, dict[str, int]]:
    import fiona

    geoms, classes, priorities, counts = [], [], [], {"repaired": 0, "skipped": 0}
    points = []  # tree positions: used when the file has no polygon (trees)
    try:
        with fiona.open(path) as src:
            fields = list(src.schema["properties"])
            # A file without a CRS is taken to be in the imagery's CRS.
            src_crs = src.crs_wkt or crs_wkt
            field = _class_field(fields, task, class_field, path)
            has_priority = "priority" in fields  # our OSM labels: the preset's overlap order
            for feature in src:  # streamed: only the shapely geometries stay in memory
                geometry = feature["geometry"]
                value = feature["properties"].get(field) if field else ("building" if task == "buildings" else "crown")
                if geometry is None or value is None:
                    counts["skipped"] += 1
                    continue
                geom = shape(geometry)
                if task == "trees" and geom.geom_type in ("Point", "MultiPoint") and not geom.is_empty:
                    points.extend(getattr(geom, "geoms", [geom]))
                    continue
                geom = _polygonal(geom, counts)
                if geom is None:  # lines (and, for land cover, points) carry no area to learn from
                    counts.setdefault("no_area", set()).add(str(value))
                    continue
                geoms.append(geom)
                classes.append(str(value))
                priorities.append(int(feature["properties"].get("priority") or 0) if has_priority else 0)
    except fiona.errors.FionaError as exc:
        raise EngineError("BAD_LABELS", f"Cannot read label file {path}: {exc}",
                          "Give a vector file GDAL can open, or a DeepForest CSV.") from None
    if not geoms and points:  # a file of tree positions; beside polygons, points are skipped
        return reproject_geometries(points, src_crs, crs_wkt), ["crown"] * len(points), None, counts
    counts["skipped"] += len(points)
    if not geoms:
        raise EngineError("LABELS_EMPTY", f"Label file {path} has no polygon with a class.",
                          "Draw or download polygons (with a class value) first"
                          + (" (or points of tree positions, with --task trees)." if task != "trees" else "."))
    return reproject_geometries(geoms, src_crs, crs_wkt), classes, priorities if has_priority else None, counts


def _polygonal(geom: BaseGeometry, counts: dict[str, int]) -> BaseGeometry | None:
    """The polygonal part of a geometry, repaired if invalid (self-intersections,
    bow-ties); None, counted as skipped, when nothing polygonal is left."""
    if geom.is_empty or geom.geom_type not in POLYGONAL:
        counts["skipped"] += 1
        return None
    if geom.is_valid:
        return geom
    fixed = polygonal(geom)
    if fixed.is_empty:
        counts["skipped"] += 1
        return None
    counts["repaired"] += 1
    return fixed


def _class_field(fields: list[str], task: str, class_field: str | None, path: Path) -> str | None:
    """The attribute holding the class; None for trees and buildings without one (one class)."""
    if class_field:
        if class_field not in fields:
            raise EngineError("CLASS_FIELD_MISSING",
                              f"Label file {path.name} has no field '{class_field}'; its fields are: "
                              f"{', '.join(fields) or '(none)'}.",
                              "Pick one of those with --class-field.")
        return class_field
    if task in ("trees", "buildings"):
        return None
    for name in DEFAULT_CLASS_FIELDS:
        if name in fields:
            return name
    raise EngineError("CLASS_FIELD_MISSING",
                      f"Label file {path.name} has no class field ({', '.join(DEFAULT_CLASS_FIELDS)}); "
                      f"its fields are: {', '.join(fields) or '(none)'}.",
                      "Name the field that holds the land-cover class with --class-field.")


def _map_classes(classes: list[str], class_map: dict[str, str], path: Path) -> list[str]:
    unknown = sorted(set(classes) - set(class_map))
    if unknown:
        raise EngineError("UNKNOWN_CLASS", f"{path.name} has class value(s) {', '.join(map(repr, unknown[:10]))} "
                          "that --class-map does not map.",
                          "Add them to --class-map (VALUE=CLASS,...), e.g. --class-map "
                          f"\"{unknown[0]}=forested\".")
    return [class_map[c] for c in classes]


def parse_class_map(text: str | None) -> dict[str, str] | None:
    """`"1=water,2=forested"` -> {"1": "water", "2": "forested"}."""
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise EngineError("BAD_CLASS_MAP", f"--class-map '{text}' is not VALUE=CLASS,VALUE=CLASS.",
                          "E.g. --class-map \"Forest=forested,Open water=water\".")
    return {k.strip(): v.strip() for k, v in pairs}


POINT_COLUMNS = {("x", "y"): None, ("lon", "lat"): "EPSG:4326", ("longitude", "latitude"): "EPSG:4326"}


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="") as f:
            return [h.strip().lower() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EngineError("BAD_LABELS", f"Cannot read label file {path}: {exc}",
                          "Give a DeepForest CSV (image_path,xmin,ymin,xmax,ymax,label) "
                          "or a CSV of points (x,y).") from None


def _is_points_csv(path: Path) -> bool:
    header = _csv_header(path)
    return "image_path" not in header and any(set(cols) <= set(header) for cols in POINT_COLUMNS)


def _read_csv_points(path: Path, crs_wkt: str) -> list:
    """Tree positions from a CSV: x,y in the imagery's CRS, or lon,lat in WGS84."""
    from shapely.geometry import Point

    header = _csv_header(path)
    (xcol, ycol), crs = next((cols, crs) for cols, crs in POINT_COLUMNS.items() if set(cols) <= set(header))
    points = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f, fieldnames=header), start=1):
            if n == 1:
                continue  # the header
            try:
                points.append(Point(float(row[xcol]), float(row[ycol])))
            except (TypeError, ValueError):
                raise EngineError("BAD_LABELS", f"CSV {path.name} line {n} has no numeric {xcol},{ycol}: "
                                  f"{row[xcol]!r}, {row[ycol]!r}.",
                                  f"Give numbers in the columns {xcol},{ycol}.") from None
    if not points:
        raise EngineError("LABELS_EMPTY", f"Label file {path} has no points.", "Add one row per tree: x,y.")
    return reproject_geometries(points, crs or crs_wkt, crs_wkt)


def _read_voc_boxes(path: Path, crs_wkt: str) -> tuple[list, list[str], BaseGeometry]:
    """Pascal VOC XML (one image, <object><name>, <bndbox> in pixels), like a DeepForest CSV."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
        image_name = root.findtext("filename") or ""
        objects = [(o.findtext("name") or "crown", [float(o.find("bndbox").findtext(k))
                                                    for k in ("xmin", "ymin", "xmax", "ymax")])
                   for o in root.iter("object")]
    except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise EngineError("BAD_LABELS", f"Cannot read Pascal VOC file {path.name}: {exc}",
                          "Give a Pascal VOC XML: <filename> and <object><name/><bndbox>xmin..ymax</bndbox>.") from None
    if not objects:
        raise EngineError("LABELS_EMPTY", f"Label file {path} has no boxes.", "Annotate at least one object.")
    transform, image_crs, size = _image_georef(path.parent / image_name, path)
    geoms = [reproject_geometry(_pixel_polygon(transform, *b), image_crs, crs_wkt) for _, b in objects]
    return geoms, [n for n, _ in objects], reproject_geometry(_pixel_polygon(transform, 0, 0, *size), image_crs, crs_wkt)


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
        footprints.append(reproject_geometry(_pixel_polygon(transform, 0, 0, *size), image_crs, crs_wkt))
        for r in (r for r in rows if r["image_path"] == image_name):
            try:
                corners = [float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax")]
            except ValueError:
                raise EngineError("BAD_LABELS", f"CSV {path.name} has a non-numeric box: {r}.",
                                  "Box coordinates are pixel numbers.") from None
            geoms.append(reproject_geometry(_pixel_polygon(transform, *corners), image_crs, crs_wkt))
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


INFO_TABLE = "landcover_info"  # key/value provenance table in our GeoPackages


def write_info(gpkg: Path, info: dict[str, str], describe: dict[str, str] | None = None) -> None:
    """Key/value provenance in a `landcover_info` table; layer descriptions (QGIS shows them)."""
    import sqlite3

    with sqlite3.connect(gpkg) as db:
        db.execute(f"CREATE TABLE IF NOT EXISTS {INFO_TABLE} (fid INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "key TEXT UNIQUE NOT NULL, value TEXT)")
        db.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier) "
                   f"VALUES ('{INFO_TABLE}', 'attributes', '{INFO_TABLE}')")
        db.executemany(f"INSERT OR REPLACE INTO {INFO_TABLE} (key, value) VALUES (?, ?)",
                       [(k, str(v)) for k, v in info.items()])
        for table, text in (describe or {}).items():
            db.execute("UPDATE gpkg_contents SET description = ? WHERE table_name = ?", (text, table))
    db.close()


def read_info(gpkg: Path) -> dict[str, str]:
    """The provenance table of one of our GeoPackages; {} for any other file."""
    import sqlite3

    if Path(gpkg).suffix.lower() != ".gpkg":
        return {}
    try:
        with sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True) as db:
            return dict(db.execute(f"SELECT key, value FROM {INFO_TABLE}"))
    except sqlite3.Error:
        return {}
