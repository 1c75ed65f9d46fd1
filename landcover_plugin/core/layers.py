"""Load the engine's result GeoPackage into the project as styled layers."""
from __future__ import annotations

from pathlib import Path

from qgis.core import QgsMapLayer, QgsProject, QgsVectorLayer, QgsWkbTypes

# Tables a GeoPackage may list that are not results (QGIS's style table).
_NOT_RESULTS = {"layer_styles"}
# Points above lines above polygons above tables, so nothing hides the points.
_ORDER = {QgsWkbTypes.GeometryType.PointGeometry: 0, QgsWkbTypes.GeometryType.LineGeometry: 1,
          QgsWkbTypes.GeometryType.PolygonGeometry: 2}


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
