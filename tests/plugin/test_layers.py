"""load_result_layers: every layer of a GeoPackage, styled, in a new group on top."""
from __future__ import annotations

import pytest

from qgis.core import (QgsCategorizedSymbolRenderer, QgsCoordinateTransformContext, QgsFeature, QgsFillSymbol,
                       QgsGeometry, QgsProject, QgsRendererCategory, QgsVectorFileWriter, QgsVectorLayer, QgsWkbTypes)

from landcover_plugin.core.layers import gpkg_layer_names, load_result_layers


def add_gpkg_layer(gpkg, name: str, uri: str, rows: list[tuple[list, str | None]]) -> None:
    """Add a layer (a memory layer's `uri`: geometry, CRS, fields) of rows (attributes, WKT or None)
    to a GeoPackage, created if needed."""
    layer = QgsVectorLayer(uri, name, "memory")
    features = []
    for values, wkt in rows:
        feature = QgsFeature(layer.fields())
        feature.setAttributes(values)
        if wkt:
            feature.setGeometry(QgsGeometry.fromWkt(wkt))
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName, options.layerName = "GPKG", name
    if gpkg.exists():
        options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteLayer
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(layer, str(gpkg), QgsCoordinateTransformContext(),
                                                                   options)
    assert error == QgsVectorFileWriter.NoError, message


def _write(gpkg, uri: str, name: str, wkt: str | None) -> None:
    add_gpkg_layer(gpkg, name, uri, [(["forested"], wkt)])


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


def test_measures_show_rounded_and_stay_whole_in_the_data(qgis_new_project, tmp_path):
    """class_stats' hectares (six decimals from the engine) read '1,234.57' in the attribute
    table and forms; the GeoPackage and the feature keep every decimal for sums and other tools."""
    from qgis.core import QgsApplication

    gpkg = tmp_path / "result.gpkg"
    _write(gpkg, "None?field=class:string&field=hectares:double&field=share_pct:double", "class_stats", None)
    table = QgsVectorLayer(f"{gpkg}|layername=class_stats", "class_stats", "ogr")
    table.startEditing()
    feature = next(table.getFeatures())
    fields = table.fields()
    table.changeAttributeValues(feature.id(), {fields.indexOf("hectares"): 1234.567891,
                                               fields.indexOf("share_pct"): 12.34567})
    assert table.commitChanges()
    layer, = load_result_layers(gpkg, "Land cover", QgsProject.instance())
    feature = next(layer.getFeatures())
    shown = {}
    for name in ("hectares", "share_pct"):
        index = layer.fields().indexOf(name)
        setup = layer.editorWidgetSetup(index)
        formatter = QgsApplication.fieldFormatterRegistry().fieldFormatter(setup.type())
        shown[name] = formatter.representValue(layer, index, setup.config(), None, feature[name])
    assert shown == {"hectares": "1,234.57", "share_pct": "12.3"}
    assert feature["hectares"] == 1234.567891  # the data keeps its precision
    class_field = layer.fields().indexOf("class")
    assert layer.editorWidgetSetup(class_field).type() != "Range"  # text stays as it is


def test_hectares_read_as_a_report_gives_them():
    from landcover_plugin.core.layers import class_hectares_text, hectares_text

    assert [hectares_text(v) for v in (12.345678, 0.256789, 1234.5678, 0.004, 0.0, 9.999)] == \
        ["12.3 ha", "0.26 ha", "1,235 ha", "< 0.01 ha", "0.00 ha", "10.00 ha"]
    assert class_hectares_text({"water": 0.451234, "forest": 12.345678, "grass": 0.0}) == \
        "forest 12.3 ha, water 0.45 ha, grass 0.00 ha"


def test_group_names_say_what_how_large_which_model_and_when():
    from datetime import datetime

    from landcover_plugin.core.layers import group_name, model_label

    when = datetime(2026, 12, 6, 14, 5, 59)
    assert group_name("Trees", 12.345678, "trees-base", when) == "Trees — 12.3 ha, trees-base, 2026-12-06 14:05"
    later = group_name("Trees", 12.345678, "trees-base", datetime(2026, 12, 7, 14, 5))
    assert later != group_name("Trees", 12.345678, "trees-base", when)  # not only HH:MM apart
    assert model_label("/p/resources/models/trees-base/model.onnx") == "trees-base"
    assert model_label("/out/trees-work/models/trees-2026-12-06") == "trees-2026-12-06"
    assert model_label("/downloads/orchard-v2.onnx") == "orchard-v2"
    assert model_label("/out/trees-work/model") == "trees-work/model"  # trained by a run: where to find it
    assert model_label("trees-base") == "trees-base"  # a shipped model by name
    assert model_label(None) == "no model"


def test_the_area_is_measured_on_the_ellipsoid_in_any_crs():
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

    from landcover_plugin.core.layers import area_hectares

    context = QgsProject.instance().transformContext()
    square = QgsGeometry.fromRect(QgsRectangle(500000, 4000000, 500100, 4000100))  # 100 m, UTM 17N
    utm = area_hectares(square, QgsCoordinateReferenceSystem("EPSG:32617"), context)
    assert utm == pytest.approx(1.0, rel=0.002)  # UTM's scale factor near the central meridian
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    degrees = area_hectares(QgsGeometry.fromRect(QgsRectangle(-81.0, 36.0, -80.999, 36.001)), wgs84, context)
    assert degrees == pytest.approx(111.0 * 90.1 / 1e4, rel=0.02)  # 0.001° ≈ 111 m by 90 m at 36° N
    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    tile = QgsGeometry.fromRect(QgsRectangle(0, 6_000_000, 100, 6_000_100))  # Web Mercator inflates it at 47° N
    assert area_hectares(tile, mercator, context) == pytest.approx(0.46, rel=0.02)
