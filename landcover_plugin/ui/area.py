"""The area to map: a drawn rectangle or polygon, a layer's extent, or selected features
(each its own run, in a batch). `Area` is what the dock keeps; the engine gets a
rectangle as four numbers and any other shape as a GeoPackage of polygons."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsGeometry, QgsPointXY, QgsProject, QgsRectangle,
                       QgsVectorLayer, QgsWkbTypes)
from qgis.gui import QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

from ..core import job
from ..core.layers import area_hectares, hectares_text
from ..core.sources import write_gpkg


@dataclass(frozen=True)
class Area:
    """One area: its shape in `crs`, and a name for its results (the feature's, in a batch)."""

    geometry: QgsGeometry
    crs: QgsCoordinateReferenceSystem
    name: str = ""
    kind: str = "rectangle"  # rectangle | polygon | extent | feature

    @property
    def is_rectangle(self) -> bool:
        return self.kind in ("rectangle", "extent")

    def hectares(self) -> float:
        """Its area in hectares (ellipsoidal, whatever the CRS)."""
        return area_hectares(self.geometry, self.crs, QgsProject.instance().transformContext())

    def for_engine(self, folder: Path) -> tuple[job.Bbox | str, str]:
        """(aoi, aoi_crs) for the pipeline file: a rectangle's bounds, else a GeoPackage
        of the polygon in `folder` (named by its shape: the same area, the same file)."""
        if self.is_rectangle:
            return job.aoi_for_engine(self.geometry.boundingBox(), self.crs, QgsProject.instance().transformContext())
        wkt = self.geometry.asWkt(6)
        path = Path(folder) / f"area-{hashlib.sha256(f'{wkt}{self.crs.authid()}'.encode()).hexdigest()[:12]}.gpkg"
        if not path.exists():
            write_polygon(self.geometry, self.crs, path)
        return str(path), self.crs.authid() or "EPSG:4326"


def write_polygon(geometry: QgsGeometry, crs: QgsCoordinateReferenceSystem, path: Path) -> None:
    """One polygon in a GeoPackage, written whole."""
    layer = QgsVectorLayer(f"MultiPolygon?crs={crs.authid() or crs.toWkt()}", "area", "memory")
    feature = QgsFeature(layer.fields())
    feature.setGeometry(geometry)
    layer.dataProvider().addFeatures([feature])
    write_gpkg(layer, path, "area")


def layer_extent_area(layer) -> Area:
    return Area(QgsGeometry.fromRect(layer.extent()), layer.crs(), layer.name(), "extent")


def selected_areas(layer: QgsVectorLayer, name_field: str | None = None) -> list[Area]:
    """Each selected polygon of `layer` as an area of its own, named by `name_field` or its id."""
    areas = []
    for feature in layer.selectedFeatures():
        geometry = feature.geometry()
        if geometry.isEmpty() or geometry.type() != QgsWkbTypes.GeometryType.PolygonGeometry:
            continue
        name = str(feature[name_field]) if name_field else f"{layer.name()} {feature.id()}"
        areas.append(Area(QgsGeometry(geometry), layer.crs(), name, "feature"))
    return areas


def union_area(areas: list[Area]) -> Area:
    """Several areas as one run."""
    geometry = QgsGeometry.unaryUnion([a.geometry for a in areas])
    return Area(geometry, areas[0].crs, f"{len(areas)} features", "polygon")


def area_text(area: Area) -> str:
    """The area's size for the dock: '3.20 ha: rectangle (EPSG:32617)'."""
    size = hectares_text(area.hectares())
    label = {"rectangle": "rectangle", "polygon": "polygon", "extent": f"extent of {area.name}",
             "feature": area.name}[area.kind]
    return f"{size}: {label} ({area.crs.authid() or 'map CRS'})"


class PolygonTool(QgsMapTool):
    """Click the corners of a polygon; right-click or double-click closes it."""

    polygon_drawn = pyqtSignal(QgsGeometry)

    def __init__(self, canvas) -> None:
        super().__init__(canvas)
        self.points: list[QgsPointXY] = []
        self.band = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
        self.band.setColor(QColor(255, 140, 0, 200))
        self.band.setFillColor(QColor(255, 140, 0, 30))
        self.band.setWidth(2)

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 (Qt's name)
        if event.button() == Qt.MouseButton.RightButton:
            self.finish()
            return
        self.points.append(self.toMapCoordinates(event.pos()))
        self.band.setToGeometry(QgsGeometry.fromPolygonXY([self.points]), None)

    def canvasDoubleClickEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        self.finish()

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if self.points:
            moving = [*self.points, self.toMapCoordinates(event.pos())]
            self.band.setToGeometry(QgsGeometry.fromPolygonXY([moving]), None)

    def finish(self) -> None:
        points, self.points = self.points, []
        self.band.reset(QgsWkbTypes.GeometryType.PolygonGeometry)
        if len(points) >= 3:
            self.polygon_drawn.emit(QgsGeometry.fromPolygonXY([points]))

    def deactivate(self) -> None:
        self.points = []
        self.band.reset(QgsWkbTypes.GeometryType.PolygonGeometry)
        super().deactivate()


def rectangle_area(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> Area:
    return Area(QgsGeometry.fromRect(rect), crs, "", "rectangle")
