"""Load the engine's result GeoPackage into the project as styled layers, with what a report
reads: measures shown rounded, group names with the area, the model and the date."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Mapping

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransformContext, QgsDistanceArea,
                       QgsEditorWidgetSetup, QgsGeometry, QgsMapLayer, QgsProject, QgsVectorLayer,
                       QgsWkbTypes)

# Tables a GeoPackage may list that are not results (QGIS's style table).
_NOT_RESULTS = {"layer_styles"}
# Points above lines above polygons above tables, so nothing hides the points.
_ORDER = {QgsWkbTypes.GeometryType.PointGeometry: 0, QgsWkbTypes.GeometryType.LineGeometry: 1,
          QgsWkbTypes.GeometryType.PolygonGeometry: 2}
# Decimals a reader sees in the attribute table and forms; the GeoPackage keeps the engine's
# full precision (sums over many polygons and other tools need it).
DISPLAY_DECIMALS = {"hectares": 2, "share_pct": 1, "area_m2": 1, "canopy_m2": 1, "diameter_m": 2}


def gpkg_layer_names(gpkg: Path | str) -> list[str]:
    """Names of the result layers and tables in a GeoPackage, in file order."""
    from osgeo import ogr  # GDAL's bindings ship with QGIS

    ds = ogr.Open(str(gpkg))
    if ds is None:
        raise OSError(f"Cannot open {gpkg} as a GeoPackage")
    names = [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())]
    return [n for n in names if n not in _NOT_RESULTS]


def set_attribution(layer: QgsMapLayer, attribution: str) -> None:
    """Credit the labels' data source on the layer: its metadata's rights (shown in
    the layer's properties) and its attribution (printed by layouts, served by QGIS Server)."""
    metadata = layer.metadata()
    if attribution not in metadata.rights():
        metadata.setRights([*metadata.rights(), attribution])
    layer.setMetadata(metadata)
    if hasattr(layer, "serverProperties") and hasattr(layer.serverProperties(), "setAttribution"):  # QGIS >= 3.28
        layer.serverProperties().setAttribution(attribution)
    else:
        layer.setAttribution(attribution)


def hectares_text(hectares: float) -> str:
    """An area as a report gives it: '12.3 ha', '0.26 ha', '1,234 ha', '< 0.01 ha'."""
    if 0 < hectares < 0.005:
        return "< 0.01 ha"
    decimals = 0 if hectares >= 100 else 1 if hectares >= 10 else 2
    return f"{hectares:,.{decimals}f} ha"


def class_hectares_text(hectares: Mapping[str, float]) -> str:
    """Hectares per class, largest first: 'forest 12.3 ha, water 0.45 ha' (the predict summary's)."""
    return ", ".join(f"{name} {hectares_text(ha)}"
                     for name, ha in sorted(hectares.items(), key=lambda kv: (-kv[1], kv[0])))


def area_hectares(area: QgsGeometry, crs: QgsCoordinateReferenceSystem,
                  context: QgsCoordinateTransformContext) -> float:
    """The mapped area's size on the ellipsoid (right in degrees and in Web Mercator too)."""
    measure = QgsDistanceArea()
    measure.setSourceCrs(crs, context)
    measure.setEllipsoid(crs.ellipsoidAcronym() or "EPSG:7030")
    return measure.measureArea(area) / 1e4  # m² with an ellipsoid set


def model_label(model: Path | str | None) -> str:
    """A model's name for people: its folder ('trees-base', 'trees-2026-12-06'), or the .onnx
    file's name when that says more than 'model'; a folder named just 'model' (a run's work
    folder) with its parent, 'trees-work/model', so it can be found; 'no model' when there is none."""
    if not model:
        return "no model"
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        path = path.parent if path.stem == "model" else path.with_suffix("")
    return f"{path.parent.name}/{path.name}" if path.name == "model" and path.parent.name else path.name


def group_name(task_label: str, hectares: float, model: str, when: datetime) -> str:
    """The result group's name: what, how large, with which model, when, e.g.
    'Trees — 12.3 ha, trees-base, 2026-12-06 14:05'; two runs of a day differ in more than HH:MM."""
    return f"{task_label} — {hectares_text(hectares)}, {model}, {when:%Y-%m-%d %H:%M}"


def show_rounded(layer: QgsVectorLayer, decimals: Mapping[str, int] = DISPLAY_DECIMALS) -> None:
    """Show the result's measures rounded (DISPLAY_DECIMALS) where a user reads them: QGIS's
    'Range' field formatter rounds doubles in the attribute table, forms and identify results."""
    for index, field in enumerate(layer.fields()):
        if field.name() in decimals and field.isNumeric():
            layer.setEditorWidgetSetup(index, QgsEditorWidgetSetup(
                "Range", {"Precision": decimals[field.name()], "Style": "SpinBox", "AllowNull": True}))


def open_result_layers(gpkg: Path | str, attribution: str = "") -> list[QgsVectorLayer]:
    """One QgsVectorLayer per result layer, with the default style stored in the
    GeoPackage's layer_styles (QGIS applies it on load; we make sure), and the
    labels' attribution (OSM's: its licence asks for it wherever the data shows)."""
    layers = []
    for name in gpkg_layer_names(gpkg):
        layer = QgsVectorLayer(f"{gpkg}|layername={name}", name, "ogr")
        if not layer.isValid():
            raise OSError(f"QGIS cannot open layer {name} of {gpkg}")
        if attribution:
            set_attribution(layer, attribution)
        show_rounded(layer)
        layers.append(layer)
    return sorted(layers, key=lambda lyr: _ORDER.get(lyr.geometryType(), 3))


def load_result_layers(gpkg: Path | str, group_name: str, project: QgsProject | None = None,
                       attribution: str = "") -> list[QgsVectorLayer]:
    """Add every layer of `gpkg` to a new group at the top of the layer tree."""
    project = project or QgsProject.instance()
    layers = open_result_layers(gpkg, attribution)
    group = project.layerTreeRoot().insertGroup(0, group_name)
    for layer in layers:
        project.addMapLayer(layer, False)
        group.addLayer(layer)
    return layers
