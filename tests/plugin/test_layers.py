"""load_result_layers: every layer of a GeoPackage, styled, in a new group on top."""
from __future__ import annotations

from qgis.core import (QgsCategorizedSymbolRenderer, QgsCoordinateTransformContext, QgsFeature, QgsFillSymbol,
                       QgsGeometry, QgsProject, QgsRendererCategory, QgsVectorFileWriter, QgsVectorLayer, QgsWkbTypes)

from landcover_plugin.core.layers import gpkg_layer_names, load_result_layers


def _write(gpkg, uri: str, name: str, wkt: str | None) -> None:
    layer = QgsVectorLayer(uri, name, "memory")
    feature = QgsFeature(layer.fields())
    if wkt:
        feature.setGeometry(QgsGeometry.fromWkt(wkt))
    feature.setAttribute(0, "forested")
    layer.dataProvider().addFeatures([feature])
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName, options.layerName = "GPKG", name
    if gpkg.exists():
        options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteLayer
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(layer, str(gpkg), QgsCoordinateTransformContext(),
                                                                   options)
    assert error == QgsVectorFileWriter.NoError, message


def test_loads_all_layers_with_their_default_style(qgis_new_project, tmp_path):
    gpkg = tmp_path / "result.gpkg"
    _write(gpkg, "Polygon?crs=EPSG:32617&field=class:string", "landcover", "POLYGON((0 0,10 0,10 10,0 0))")
    _write(gpkg, "None?field=class:string&field=hectares:double", "class_stats", None)
    _write(gpkg, "Point?crs=EPSG:32617&field=class:string", "trees", "POINT(1 1)")
    styled = QgsVectorLayer(f"{gpkg}|layername=landcover", "landcover", "ogr")
    category = QgsRendererCategory("forested", QgsFillSymbol.createSimple({"color": "10,120,20"}), "forested")
    styled.setRenderer(QgsCategorizedSymbolRenderer("class", [category]))
    assert styled.saveStyleToDatabase("default", "", True, "") == ""
    del styled
    assert "layer_styles" not in gpkg_layer_names(gpkg)

    project = QgsProject.instance()
    project.layerTreeRoot().insertGroup(0, "an older group")
    layers = load_result_layers(gpkg, "Landcover — land cover (12:00)", project)

    assert [layer.name() for layer in layers] == ["trees", "landcover", "class_stats"]  # points on top
    group = project.layerTreeRoot().children()[0]
    assert group.name() == "Landcover — land cover (12:00)"
    assert [node.layer() for node in group.findLayers()] == layers
    assert all(layer.isValid() and project.mapLayer(layer.id()) is layer for layer in layers)
    landcover = layers[1]
    assert landcover.geometryType() == QgsWkbTypes.PolygonGeometry
    assert isinstance(landcover.renderer(), QgsCategorizedSymbolRenderer)  # the stored default style
    assert landcover.renderer().categories()[0].symbol().color().green() == 120


def test_osm_attribution_travels_with_the_layers(qgis_new_project, tmp_path):
    gpkg = tmp_path / "result.gpkg"
    _write(gpkg, "Polygon?crs=EPSG:32617&field=class:string", "landcover", "POLYGON((0 0,10 0,10 10,0 0))")
    _write(gpkg, "None?field=class:string&field=hectares:double", "class_stats", None)
    credit = "© OpenStreetMap contributors"
    layers = load_result_layers(gpkg, "Landcover — land cover", QgsProject.instance(), attribution=credit)
    assert len(layers) == 2
    for layer in layers:
        assert layer.metadata().rights() == [credit] and layer.attribution() == credit
    assert all(not layer.metadata().rights() for layer in load_result_layers(gpkg, "no credit"))
