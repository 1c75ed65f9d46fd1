"""The dock's choices as a QGIS analyst meets them, in real QGIS: the area (polygon, a layer's
extent, selected features one run each), exactly the chosen labels layer, the model list and
its refusals, remembered choices, imagery that is never a street map, the dock's own words."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsGeometry, QgsPointXY, QgsProject,
                       QgsRasterLayer, QgsRectangle, QgsSettings, QgsVectorLayer)
from qgis.gui import QgsMapMouseEvent
from qgis.PyQt.QtCore import QEvent, QPoint, Qt

from landcover_plugin.contract.model_file import read_summary
from landcover_plugin.contract.names import MODELS_DIR
from landcover_plugin.core import job
from landcover_plugin.core.models import describe, keep_model, list_models, next_version
from landcover_plugin.core.sources import labels_for_engine
from landcover_plugin.ui.area import Area
from landcover_plugin.ui.dock import STATE_GROUP, LandcoverDock
from test_layers import add_gpkg_layer
from test_dock import dock  # noqa: F401 (the fixture: a new user's dock, its project saved in tmp_path)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

# OSBS_029 covers x 404211.9..404251.9, y 3285102.9..3285142.9 (EPSG:32617).
BLOCKS = ["POLYGON((404215 3285105,404230 3285105,404230 3285120,404215 3285120,404215 3285105))",
          "POLYGON((404232 3285122,404248 3285122,404248 3285140,404232 3285140,404232 3285122))"]


def _gpkg_layer(gpkg, name: str, fields: str, rows: list[tuple[str, list]]) -> None:
    """Add a layer of polygons (WKT, attributes) in EPSG:32617 to a GeoPackage."""
    add_gpkg_layer(gpkg, name, f"Polygon?crs=EPSG:32617{fields}", [(values, wkt) for wkt, values in rows])


def _features(path) -> list[QgsFeature]:
    layer = QgsVectorLayer(str(path), "check", "ogr")
    assert layer.isValid(), path
    return list(layer.getFeatures())


def _click(canvas, tool, point: QgsPointXY, button=Qt.MouseButton.LeftButton) -> None:
    pixel = canvas.getCoordinateTransform().transform(point)
    event = QgsMapMouseEvent(canvas, QEvent.Type.MouseButtonRelease, QPoint(round(pixel.x()), round(pixel.y())),
                             button)
    tool.canvasReleaseEvent(event)


def test_a_drawn_polygon_reaches_the_engine_as_its_shape(dock, osbs_tif, tmp_path):
    raster = QgsRasterLayer(str(osbs_tif), "OSBS_029")
    QgsProject.instance().addMapLayer(raster)
    dock.canvas.setDestinationCrs(raster.crs())
    dock.canvas.setExtent(raster.extent())
    dock.start_polygon()
    assert dock.canvas.mapTool() is dock.polygon_tool
    corners = [QgsPointXY(404215, 3285105), QgsPointXY(404245, 3285108), QgsPointXY(404230, 3285138)]
    for corner in corners:
        _click(dock.canvas, dock.polygon_tool, corner)
    _click(dock.canvas, dock.polygon_tool, corners[0], Qt.MouseButton.RightButton)  # closes it
    assert dock.area is not None and dock.area.kind == "polygon"
    assert dock.canvas.mapTool() is not dock.polygon_tool
    assert re.fullmatch(r"0\.0\d ha: polygon \(EPSG:32617\)", dock.area_label.text()), dock.area_label.text()
    assert 350 < dock.area.hectares() * 10_000 < 520  # a triangle of about 435 m², as drawn to the pixel
    dock.imagery_combo.setLayer(raster)
    spec = dock.build_spec(tmp_path)
    assert job.problems(spec) == []
    (feature,) = _features(spec.aoi)  # a GeoPackage holding the polygon, in its CRS
    assert spec.aoi_crs == "EPSG:32617"
    assert feature.geometry().symDifference(dock.area.geometry).area() < 1e-6


def test_a_layers_extent_and_selected_features_one_run_each(dock, osbs_tif, tmp_path, wait_until):
    """Selected orchard blocks, one run per feature: a result group each, named by its block."""
    gpkg = tmp_path / "blocks.gpkg"
    _gpkg_layer(gpkg, "blocks", "&field=name:string", [(BLOCKS[0], ["north"]), (BLOCKS[1], ["south"])])
    blocks = QgsVectorLayer(f"{gpkg}|layername=blocks", "blocks", "ogr")
    raster = QgsRasterLayer(str(osbs_tif), "OSBS_029")
    QgsProject.instance().addMapLayers([raster, blocks])

    dock.use_layer_extent(raster)
    assert dock.area.kind == "extent" and "extent of OSBS_029" in dock.area_label.text()
    assert dock.build_spec(tmp_path).aoi == pytest.approx((404211.9, 3285102.9, 404251.9, 3285142.9))

    dock.use_selected_features(blocks)  # nothing selected yet
    assert "Select one or more polygons" in dock.status_label.text()
    blocks.selectAll()
    dock.use_selected_features(blocks)
    assert len(dock.batch) == 2 and not dock.per_feature_check.isHidden()
    dock.per_feature_check.setChecked(True)
    dock.imagery_combo.setLayer(raster)
    dock.set_label_source("model")
    dock.set_model(MODELS_DIR / "trees-base")
    dock.out_dir.setFilePath(str(tmp_path / "out"))
    first = dock.run()
    assert first is not None, dock.status_label.text()
    assert len(dock.queue) == 1
    assert wait_until(lambda: dock.task is None and not dock.queue, 240), dock.status_label.text()
    assert dock.status_label.text().startswith("Done"), dock.status_label.text()
    groups = [g.name() for g in QgsProject.instance().layerTreeRoot().children() if hasattr(g, "findLayers")]
    assert any(g.startswith("Trees (blocks 1) — 0.02 ha, trees-base, ") for g in groups), groups
    assert any(g.startswith("Trees (blocks 2) — 0.03 ha, trees-base, ") for g in groups), groups
    pipelines = sorted((tmp_path / "out").glob("trees-*-pipeline.yaml"))
    assert len(pipelines) == 2
    aois = {json.loads(p.read_text())["aoi"] for p in pipelines}
    assert len(aois) == 2 and all(a.endswith(".gpkg") for a in aois)  # each block's own polygon


def test_training_uses_exactly_the_chosen_layer(dock, tmp_path):
    """The GeoPackage's second layer (not its first), its filter, its selected features."""
    gpkg = tmp_path / "labels.gpkg"
    _gpkg_layer(gpkg, "other", "&field=id:integer", [(BLOCKS[0], [1])])
    _gpkg_layer(gpkg, "training_polygons", "&field=label:string",
                [(BLOCKS[0], ["forest"]), (BLOCKS[1], ["forest"]), (BLOCKS[1], ["water"])])
    layer = QgsVectorLayer(f"{gpkg}|layername=training_polygons", "training_polygons", "ogr")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)

    path = labels_for_engine(layer, tmp_path / "work")
    assert path != gpkg and [f["label"] for f in _features(path)] == ["forest", "forest", "water"]
    layer.setSubsetString("label = 'forest'")
    filtered = labels_for_engine(layer, tmp_path / "work")
    assert [f["label"] for f in _features(filtered)] == ["forest", "forest"]
    assert labels_for_engine(layer, tmp_path / "work") == filtered  # unchanged: the same file, stages reused
    layer.selectByIds([next(layer.getFeatures()).id()])
    assert len(_features(labels_for_engine(layer, tmp_path / "work"))) == 1

    single = tmp_path / "single.gpkg"
    _gpkg_layer(single, "crowns", "&field=label:string", [(BLOCKS[0], ["crown"])])
    whole = QgsVectorLayer(str(single), "crowns", "ogr")
    assert labels_for_engine(whole, tmp_path / "work") == single  # a whole file goes as it is

    dock.task_combo.setCurrentIndex(dock.task_combo.findData("landcover"))
    dock.labels_combo.setLayer(layer)
    dock.class_field_combo.setField("label")
    spec = dock.build_spec(tmp_path)
    assert spec.labels.parent == tmp_path / "landcover-work" and len(_features(spec.labels)) == 1


def test_models_are_listed_kept_and_refused_when_they_do_not_fit(dock, osbs_tif, tmp_path):
    shipped = read_summary(MODELS_DIR / "trees-base")
    assert describe(shipped).startswith("trees-base — Trees, 0.1 m, 3 bands, crown F1 ")
    models = tmp_path / "models"
    kept = keep_model(MODELS_DIR / "trees-base", models, "trees", when=0)
    assert re.fullmatch(r"trees-\d{8}-\d{6}", kept.name) and (kept / "model.onnx").is_file()
    again = keep_model(MODELS_DIR / "trees-base", models, "trees", when=0)  # same second: its own folder
    assert again != kept and again.name.startswith(kept.name)
    assert next_version(MODELS_DIR / "trees-base") == "trees-base-v2"
    assert next_version(models / "trees-base-v2" / "model.onnx") == "trees-base-v3"
    listed = [m.folder for m in list_models([models])]
    assert listed[:2] == [again, kept] and listed[-1] == MODELS_DIR / "trees-base"  # newest first, shipped last

    raster = QgsRasterLayer(str(osbs_tif), "OSBS_029")
    QgsProject.instance().addMapLayer(raster)
    dock.set_area(raster.extent(), raster.crs())
    dock.imagery_combo.setLayer(raster)
    dock.set_label_source("model")
    dock.set_model(MODELS_DIR / "trees-base")
    assert dock.report_path == MODELS_DIR / "trees-base" / "MODEL_CARD.md" and dock.report_button.isEnabled()
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("landcover"))
    assert dock.run() is None
    assert "maps trees, not land cover" in dock.status_label.text()
    one_band = tmp_path / "one_band.tif"
    from osgeo import gdal

    gdal.Translate(str(one_band), str(osbs_tif), bandList=[1])
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("trees"))
    dock.imagery_combo.setLayer(QgsProject.instance().addMapLayer(QgsRasterLayer(str(one_band), "one band")))
    assert dock.run() is None
    assert "reads 3 bands; the imagery has 1" in dock.status_label.text()


def test_choices_are_remembered_and_the_dock_reopens(qgis_iface, engine_python, qgis_new_project, plugin):
    QgsSettings().remove(STATE_GROUP)
    first = LandcoverDock(qgis_iface, qgis_iface.mainWindow())
    try:
        first.task_combo.setCurrentIndex(first.task_combo.findData("landcover"))
        first.set_label_source("layer")
        first.epochs_spin.setValue(37)
        first.out_dir.setFilePath("/data/project-out")
        first.remember_state()
    finally:
        first.cleanup()
        first.deleteLater()
    second = LandcoverDock(qgis_iface, qgis_iface.mainWindow())
    try:
        assert (second.task_key(), second.label_source(), second.epochs_spin.value()) == ("landcover", "layer", 37)
        assert second.out_dir.filePath() == "/data/project-out"  # from the project's own entries
        QgsProject.instance().removeEntry("landcover", "dock")
        QgsProject.instance().clear()
    finally:
        second.cleanup()
        second.deleteLater()
        QgsSettings().remove(STATE_GROUP)

    from landcover_plugin.plugin import DOCK_VISIBLE

    QgsSettings().setValue(DOCK_VISIBLE, True)
    try:
        plugin.unload()
        plugin.initGui()  # as QGIS does at the next start
        assert plugin.dock is not None and plugin.action.isChecked()
    finally:
        QgsSettings().remove(DOCK_VISIBLE)


def test_imagery_is_never_a_street_map_by_default(dock, tmp_path):
    settings = QgsSettings()
    connections = {"OpenStreetMap": ("https://tile.openstreetmap.org/{z}/{x}/{y}.png", 19),
                   "Esri World Imagery": ("https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/"
                                          "MapServer/tile/{z}/{y}/{x}", 23)}
    for name, (url, zmax) in connections.items():
        settings.setValue(f"qgis/connections-xyz/{name}/url", url)
        settings.setValue(f"qgis/connections-xyz/{name}/zmax", zmax)
    try:
        dock.imagery_combo.setCurrentIndex(0)  # nothing chosen, no raster layer
        dock.refresh_sources()
        items = [dock.imagery_combo.itemText(i) for i in range(dock.imagery_combo.count())]
        assert items.index("XYZ: Esri World Imagery") < items.index("XYZ: OpenStreetMap (street map)")
        assert dock.imagery_combo.currentText() == "XYZ: Esri World Imagery"
        assert dock.imagery().max_zoom == 23
        dock.imagery_combo.setCurrentIndex(items.index("XYZ: OpenStreetMap (street map)"))
        dock.set_area(QgsGeometry.fromWkt(BLOCKS[0]).boundingBox(), QgsCoordinateReferenceSystem("EPSG:32617"))
        spec = dock.build_spec(tmp_path)
        assert spec.max_zoom == 19 and spec.to_dict()["imagery"]["max_zoom"] == 19
        assert dock.run() is None
        assert "OpenStreetMap is a street map, not imagery" in dock.status_label.text()
    finally:
        for name in connections:
            settings.remove(f"qgis/connections-xyz/{name}")


def test_rows_that_apply_an_advanced_section_and_help(dock):
    assert dock.advanced.isCollapsed()
    for widget in (dock.overpass_edit, dock.date_edit, dock.train_on_combo, dock.scheduler_edit):
        assert dock.advanced.isAncestorOf(widget), widget.objectName()
    dock.set_label_source("model")
    assert dock.epochs_spin.isHidden() and dock.train_on_row.isHidden() and not dock.model_combo.isHidden()
    assert dock.row_label(dock.epochs_spin).isHidden()
    form = next(form for form, _, field in dock._rows if field is dock.epochs_spin)
    assert form.getWidgetPosition(dock.epochs_spin)[0] == -1  # out of the form: no gap where the row was


def test_progress_and_messages_in_the_docks_words():
    assert job.stage_text("train", "epoch 3/300, 2m05s left (loss 0.213)") == \
        "Training: epoch 3/300, 2m05s left (loss 0.213)"
    assert job.stage_text("fetch") == "Fetching the imagery…"
    assert job.dock_words("Label file labels.gpkg has no field 'label'. Give --class-field one of: id") == \
        "Label file labels.gpkg has no field 'label'. Give 'Class field' one of: id"
    assert "landcover train" not in job.dock_words("Use a model made by `landcover train`, unmodified.")


@pytest.mark.slow
def test_corrections_retrain_the_model_in_qgis(dock, osbs_tif, tmp_path, wait_until):
    """Map with trees-base, correct crowns in the west half, 'Retrain with my corrections': trees-base-v2
    is kept with how its score changed, and the area is mapped again with it."""
    raster = QgsRasterLayer(str(osbs_tif), "OSBS_029")
    QgsProject.instance().addMapLayer(raster)
    dock.imagery_combo.setLayer(raster)
    dock.set_area(raster.extent(), raster.crs())
    dock.set_label_source("model")
    dock.set_model(MODELS_DIR / "trees-base")
    dock.out_dir.setFilePath(str(tmp_path))
    assert dock.run() is not None, dock.status_label.text()
    assert wait_until(lambda: dock.task is None, 120) and dock.status_label.text().startswith("Done")
    assert dock.retrain_button.isEnabled()
    west = Area(QgsGeometry.fromRect(QgsRectangle(404211.9, 3285102.9, 404231.9, 3285142.9)), raster.crs(),
                "west half", "polygon")
    assert dock.retrain_with_corrections(west) is None  # nothing corrected yet
    assert "No crown was corrected in the reviewed area" in dock.status_label.text()

    crowns = dock.results.crowns()
    inside = [f for f in crowns.getFeatures() if f.geometry().intersects(west.geometry)]
    crowns.startEditing()
    for feature in inside[:2]:  # two false crowns deleted
        crowns.deleteFeature(feature.id())
    missed = QgsFeature(crowns.fields())  # one missed crown drawn
    missed.setGeometry(QgsGeometry.fromWkt("POLYGON((404214 3285110,404217 3285110,404217 3285113,"
                                           "404214 3285113,404214 3285110))"))
    crowns.addFeature(missed)  # left uncommitted: the dock saves the edits it trains on
    dock.epochs_spin.setValue(2)
    assert dock.retrain_with_corrections(west) is not None, dock.status_label.text()
    assert wait_until(lambda: dock.task is None, 300), dock.status_label.text()
    status = dock.status_label.text()
    assert re.search(r"trees-base-v2: crown F1 on the reviewed area \d\.\d\d \(trees-base\) → \d\.\d\d", status), status
    assert dock.model_combo.itemData(0).folder.name == "trees-base-v2"  # kept, listed first
    assert dock.results.title.startswith("Trees — ") and "trees-base-v2" in dock.results.title
    pipeline = json.loads(sorted(tmp_path.glob("trees-*-trees-base-v2-pipeline.yaml"))[-1].read_text())
    assert pipeline["train"]["base"].endswith("trees-base/model.onnx")
    assert pipeline["labels"]["reviewed_area"].endswith(".gpkg")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    dock.show()
    wait_until(lambda: False, 0.5)  # let it lay out and paint
    dock.grab().save(str(ARTIFACTS / "dock-retrained.png"))  # for a person to look at
