"""The Landcover dock in real QGIS: inputs, drawing the area, the pipeline it writes, Run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsSettings, QgsVectorLayer
from qgis.gui import QgsMapMouseEvent
from qgis.PyQt.QtCore import QEvent, QPoint, Qt

from landcover_plugin.contract.names import MODELS_DIR, OVERPASS_DEFAULT
from landcover_plugin.core import job
from landcover_plugin.core.sources import ImagerySource
from landcover_plugin.ui.dock import OVERPASS_SETTING, STATE_GROUP, LandcoverDock

XYZ_KEY = "qgis/connections-xyz/Test orthophoto"


@pytest.fixture
def dock(qgis_iface, engine_python, qgis_new_project, tmp_path):
    """A dock as a new user first sees it: no choices remembered from earlier tests, a project saved
    in tmp_path (its models and outputs go beside it)."""
    QgsSettings().remove(STATE_GROUP)
    QgsProject.instance().setFileName(str(tmp_path / "project.qgz"))
    dock = LandcoverDock(qgis_iface, qgis_iface.mainWindow())
    yield dock
    dock.cleanup()
    dock.deleteLater()
    QgsSettings().remove(STATE_GROUP)


@pytest.fixture
def xyz_connection():
    settings = QgsSettings()
    settings.setValue(f"{XYZ_KEY}/url", "http://127.0.0.1:8123/{z}/{x}/{y}.png")
    settings.setValue(f"{XYZ_KEY}/referer", "https://example.org/")
    yield "Test orthophoto"
    settings.remove(XYZ_KEY)


@pytest.fixture
def osbs_layers(qgis_new_project, osbs_tif, osbs_csv):
    raster = QgsRasterLayer(str(osbs_tif), "OSBS_029")
    labels = QgsVectorLayer(f"file://{osbs_csv}?delimiter=,&geomType=none", "OSBS crowns", "delimitedtext")
    assert raster.isValid() and labels.isValid()
    QgsProject.instance().addMapLayers([raster, labels])
    return raster, labels


def _drag(canvas, tool, start: QPoint, end: QPoint) -> None:
    """A left-button drag on the canvas, as the user draws the rectangle."""
    for kind, pos, buttons in ((QEvent.MouseButtonPress, start, Qt.LeftButton),
                               (QEvent.MouseMove, end, Qt.LeftButton),
                               (QEvent.MouseButtonRelease, end, Qt.NoButton)):
        event = QgsMapMouseEvent(canvas, kind, pos, Qt.LeftButton, buttons)
        {QEvent.MouseButtonPress: tool.canvasPressEvent, QEvent.MouseMove: tool.canvasMoveEvent,
         QEvent.MouseButtonRelease: tool.canvasReleaseEvent}[kind](event)


def _draw_over(dock, layer) -> None:
    """Draw a rectangle 10% inside the layer's extent."""
    canvas = dock.canvas
    canvas.setDestinationCrs(layer.crs())
    canvas.setExtent(layer.extent())
    canvas.refresh()
    dock.start_drawing()
    assert canvas.mapTool() is dock.map_tool
    e, to_pixel = layer.extent(), canvas.getCoordinateTransform()
    start = to_pixel.transform(e.xMinimum() + 0.1 * e.width(), e.yMaximum() - 0.1 * e.height())
    end = to_pixel.transform(e.xMaximum() - 0.1 * e.width(), e.yMinimum() + 0.1 * e.height())
    _drag(canvas, dock.map_tool, QPoint(round(start.x()), round(start.y())), QPoint(round(end.x()), round(end.y())))


def test_missing_engine_shows_the_message_and_the_offer(qgis_iface, no_engine):
    dock = LandcoverDock(qgis_iface, qgis_iface.mainWindow())
    try:
        assert not dock.create_env_button.isHidden()
        assert "engine environment is missing" in dock.engine_label.text()
        assert str(no_engine) in dock.engine_label.text() and "Create environment" in dock.engine_label.text()
        assert dock.run() is None
        assert "engine environment is missing" in dock.status_label.text()
    finally:
        dock.cleanup()
        dock.deleteLater()


def test_browse_to_an_existing_engine(qgis_iface, no_engine, monkeypatch, tmp_path):
    from landcover_plugin.core.engine_env import SETTINGS_KEY

    dock = LandcoverDock(qgis_iface, qgis_iface.mainWindow())
    try:
        assert not dock.browse_engine_button.isHidden()
        monkeypatch.delenv("LANDCOVER_ENGINE_PYTHON")  # the variable would win over the choice
        assert not dock.browse_to_engine(tmp_path)
        assert "is not a Python interpreter" in dock.status_label.text() and not QgsSettings().value(SETTINGS_KEY)
        venv = Path(__file__).resolve().parents[2] / ".venv"
        assert dock.browse_to_engine(venv), dock.status_label.text()
        assert QgsSettings().value(SETTINGS_KEY) == str(venv / "bin" / "python")
        assert dock.create_env_button.isHidden() and dock.browse_engine_button.isHidden()
    finally:
        QgsSettings().remove(SETTINGS_KEY)
        dock.cleanup()
        dock.deleteLater()


def test_engine_present_hides_the_offer(dock):
    assert dock.create_env_button.isHidden() and dock.engine_label.isHidden()


def test_every_input_has_help(dock):
    for widget in (dock.draw_button, dock.imagery_combo, dock.gsd_spin, dock.task_combo, dock.labels_combo,
                   dock.class_field_combo, dock.model_combo, dock.epochs_spin, dock.out_dir, dock.run_button,
                   dock.cancel_button, dock.create_env_button, dock.label_source_combo, dock.preset_combo,
                   dock.overpass_edit, dock.date_edit, dock.osm_file, dock.help_button, dock.labels_file_button,
                   dock.per_feature_check, dock.train_on_combo, dock.scheduler_edit):
        assert len(widget.toolTip()) > 20, widget.objectName()


def test_xyz_connections_are_offered(dock, xyz_connection):
    dock.refresh_sources()
    combo = dock.imagery_combo
    index = combo.findText(f"XYZ: {xyz_connection}")
    assert index >= 0
    combo.setCurrentIndex(index)
    assert dock.imagery() == ImagerySource("http://127.0.0.1:8123/{z}/{x}/{y}.png",
                                           {"Referer": "https://example.org/"})
    assert dock.gsd_spin.isEnabled()  # a resolution is asked for tiles only


def test_run_without_inputs_says_what_is_missing(dock, qgis_new_project, tmp_path):
    dock.out_dir.setFilePath(str(tmp_path))
    dock.imagery_combo.setAdditionalItems([])  # no XYZ connection either, whatever the user's settings hold
    assert dock.imagery_combo.currentLayer() is None and dock.imagery() is None
    dock.set_label_source("layer")  # and no labels layer (OpenStreetMap, the default, needs none)
    assert dock.run() is None and dock.task is None
    status = dock.status_label.text()
    assert "draw a rectangle" in status and "imagery" in status and "labels" in status
    assert list(tmp_path.iterdir()) == []


def test_drawn_area_and_the_pipeline_file(dock, osbs_layers, tmp_path):
    raster, labels = osbs_layers
    _draw_over(dock, raster)
    assert dock.area is not None and dock.canvas.mapTool() is not dock.map_tool  # the previous tool is back
    rect = dock.area.geometry.boundingBox()
    assert raster.extent().contains(rect) and rect.width() > 0.7 * raster.extent().width()
    assert re.fullmatch(r"0\.\d\d ha: rectangle \(EPSG:32617\)", dock.area_label.text()), dock.area_label.text()

    dock.imagery_combo.setLayer(raster)
    dock.labels_combo.setLayer(labels)
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("trees"))
    dock.epochs_spin.setValue(3)
    spec = dock.build_spec(tmp_path)
    assert job.problems(spec) == []
    data = spec.to_dict()
    aoi = [float(v) for v in data["aoi"].split(",")]
    assert aoi == pytest.approx([rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()])
    assert data["aoi_crs"] == "EPSG:32617"
    assert data["imagery"]["source"] == raster.source() and data["imagery"]["gsd"] is None
    assert data["labels"] == {"path": str(labels.source()).split("?")[0].removeprefix("file://"), "class_field": None}
    assert data["train"]["epochs"] == 3 and data["out"].startswith(str(tmp_path))


def test_area_in_a_crs_without_epsg_code_goes_to_wgs84(dock):
    from qgis.core import QgsRectangle

    custom = QgsCoordinateReferenceSystem.fromProj(
        "+proj=tmerc +lat_0=0 +lon_0=-81.5 +k=0.9996 +x_0=500000 +y_0=0 +ellps=GRS80 +units=m +no_defs")
    assert custom.isValid() and not custom.authid().startswith("EPSG:")
    dock.set_area(QgsRectangle(400000, 3285000, 401000, 3286000), custom)
    (minx, miny, maxx, maxy), crs = dock.aoi()
    assert crs == "EPSG:4326"
    assert -82.6 < minx < maxx < -82.5 and 29.6 < miny < maxy < 29.8  # 100 km west of -81.5


def start_trees_run(dock, osbs_layers, out_dir):
    """Trees on the OSBS orthophoto with its crowns, one epoch, over a drawn area: Run."""
    raster, labels = osbs_layers
    _draw_over(dock, raster)
    dock.imagery_combo.setLayer(raster)
    dock.labels_combo.setLayer(labels)
    dock.epochs_spin.setValue(1)
    dock.out_dir.setFilePath(str(out_dir))
    task = dock.run()
    assert task is not None, dock.status_label.text()
    return task


@pytest.mark.slow
def test_run_loads_styled_layers_into_a_group(dock, qgis_iface, osbs_layers, tmp_path, wait_until, monkeypatch):
    from qgis.PyQt.QtGui import QDesktopServices

    start_trees_run(dock, osbs_layers, tmp_path)
    assert not dock.run_button.isEnabled() and dock.cancel_button.isEnabled()
    pipeline = json.loads(next(tmp_path.glob("trees-*-pipeline.yaml")).read_text())
    assert pipeline["task"] == "trees" and pipeline["train"]["epochs"] == 1
    assert wait_until(lambda: dock.task is None, 300), dock.status_label.text()
    assert dock.status_label.text().startswith("Done"), dock.status_label.text()
    group = QgsProject.instance().layerTreeRoot().children()[0]
    model = dock.model_combo.itemData(0)  # the trained model, kept in its own dated folder and listed first
    assert re.fullmatch(r"trees-\d{8}-\d{6}", model.folder.name)
    assert model.folder.parent == tmp_path / "landcover" / "models"  # beside the project
    assert re.fullmatch(rf"Trees — 0\.\d\d ha, {model.folder.name}, \d{{4}}-\d\d-\d\d \d\d:\d\d", group.name()), \
        group.name()
    names = {node.layer().name() for node in group.findLayers()}
    assert {"crowns", "trees"} <= names
    assert dock.progress.value() == 100 and dock.run_button.isEnabled()
    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile()) or True)
    assert dock.report_button.isEnabled()
    dock.report_button.click()  # the trained model's card: scores, curves, provenance
    assert opened == [str(model.folder / "MODEL_CARD.md")]
    assert f"model saved as {model.folder.name}" in dock.status_label.text()
    files = dock.export_result_map()  # the map for a report, beside the results
    assert files is not None, dock.status_label.text()
    assert files.pdf.read_bytes()[:5] == b"%PDF-" and files.png.stat().st_size > 10_000
    assert files.pdf.parent == tmp_path and "Map exported" in dock.status_label.text()


def test_cancel_button_stops_the_run(dock, osbs_layers, slow_tiles, tmp_path, wait_until):
    from qgis.core import QgsRectangle

    settings = QgsSettings()
    settings.setValue("qgis/connections-xyz/Slow tiles/url", slow_tiles.url)
    try:
        dock.refresh_sources()
    finally:
        settings.remove("qgis/connections-xyz/Slow tiles")
    dock.imagery_combo.setCurrentIndex(dock.imagery_combo.findText("XYZ: Slow tiles"))
    dock.set_area(QgsRectangle(-82.33, 29.68, -82.32, 29.69), QgsCoordinateReferenceSystem("EPSG:4326"))
    dock.labels_combo.setLayer(osbs_layers[1])
    dock.gsd_spin.setValue(0.6)
    dock.out_dir.setFilePath(str(tmp_path))
    task = dock.run()
    assert task is not None, dock.status_label.text()
    assert json.loads(next(tmp_path.glob("*-pipeline.yaml")).read_text())["imagery"]["source"] == slow_tiles.url
    assert wait_until(slow_tiles.requested.is_set, 60)
    dock.cancel_button.click()
    assert wait_until(lambda: dock.task is None, 15)
    assert task.engine.proc.poll() is not None
    assert "Cancelled" in dock.status_label.text()
    assert dock.run_button.isEnabled() and not dock.cancel_button.isEnabled()
    assert not list(tmp_path.glob("*.gpkg"))


def test_wms_layer_becomes_an_engine_wms_source(qgis_iface):
    """A QGIS WMS layer reaches the engine as a GetMap URL with its layers, format and CRS."""
    from urllib.parse import parse_qs, urlsplit

    from landcover_plugin.core.sources import raster_layer_source

    uri = "crs=EPSG:4326&format=image/jpeg&layers=ortho&styles=&url=http://127.0.0.1:9/wms"
    layer = QgsRasterLayer(uri, "agency WMS", "wms")  # unreachable: the layer's source is all we need
    source = raster_layer_source(layer).source
    query = parse_qs(urlsplit(source).query, keep_blank_values=True)
    assert source.startswith("http://127.0.0.1:9/wms?")
    assert query["SERVICE"] == ["WMS"] and query["LAYERS"] == ["ortho"] and query["CRS"] == ["EPSG:4326"]
    assert query["FORMAT"] == ["image/jpeg"]


def test_credentials_from_the_qgis_auth_database(basic_authcfg):
    """A layer's authcfg becomes an Authorization header for the engine's environment, kept out of
    the source (which goes into the pipeline file) and out of repr (logs)."""
    from landcover_plugin.contract.names import HEADERS_ENV
    from landcover_plugin.core.sources import raster_layer_source

    uri = f"authcfg={basic_authcfg}&crs=EPSG:4326&format=image/png&layers=ortho&styles=&url=http://127.0.0.1:9/wms"
    source = raster_layer_source(QgsRasterLayer(uri, "agency WMS", "wms"))
    assert source.secret_headers == {"Authorization": "Basic ZmllbGQ6czNjcmV0"}  # field:s3cret
    assert "s3cret" not in source.source + repr(source) and "ZmllbGQ6czNjcmV0" not in repr(source)
    assert json.loads(source.engine_env()[HEADERS_ENV]) == source.secret_headers


def _rows_shown(dock) -> set[str]:
    widgets = (dock.preset_combo, dock.overpass_edit, dock.date_edit, dock.osm_file, dock.labels_row,
               dock.class_field_combo, dock.model_combo, dock.epochs_spin)
    return {w.objectName() for w in widgets if not w.isHidden()}


def test_label_sources_become_the_pipelines_labels(dock, osbs_layers, tmp_path):
    raster, labels = osbs_layers
    _draw_over(dock, raster)
    dock.imagery_combo.setLayer(raster)
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("landcover"))
    # OpenStreetMap from Overpass is the default: it needs nothing but the area
    assert dock.label_source() == "overpass"
    assert [dock.preset_combo.itemData(i) for i in range(dock.preset_combo.count())] == [
        "landcover", "buildings", "trees"]
    assert _rows_shown(dock) == {"presetCombo", "overpassEdit", "dateEdit", "epochsSpin"}
    assert dock.overpass_edit.text() == OVERPASS_DEFAULT
    dock.date_edit.setText("2021-06-01")
    spec = dock.build_spec(tmp_path)
    assert job.problems(spec) == [] and spec.osm
    assert spec.to_dict()["labels"] == {"preset": "landcover", "overpass": OVERPASS_DEFAULT, "date": "2021-06-01"}
    assert "model" not in spec.to_dict()
    dock.date_edit.setText("1 June")
    assert any("YYYY-MM-DD" in p for p in job.problems(dock.build_spec(tmp_path)))

    # the trees task lists only the presets that fit it
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("trees"))
    assert [dock.preset_combo.itemData(i) for i in range(dock.preset_combo.count())] == ["trees"]

    # a local OSM file: the date is Overpass's only
    osm = tmp_path / "area.osm.pbf"
    osm.write_bytes(b"")
    dock.set_label_source("osm_file")
    assert _rows_shown(dock) == {"presetCombo", "osmFile", "epochsSpin"}
    dock.osm_file.setFilePath(str(osm))
    spec = dock.build_spec(tmp_path)
    assert job.problems(spec) == [] and spec.to_dict()["labels"] == {"preset": "trees", "osm_file": str(osm)}
    dock.osm_file.setFilePath(str(tmp_path / "missing.osm"))
    assert any("does not exist" in p for p in job.problems(dock.build_spec(tmp_path)))

    # picking a labels layer switches to it; the class field is asked for land cover only
    dock.labels_combo.setLayer(labels)
    assert dock.label_source() == "layer" and _rows_shown(dock) == {"labelsRow", "epochsSpin"}
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("landcover"))
    assert _rows_shown(dock) == {"labelsRow", "classFieldCombo", "epochsSpin"}
    data = dock.build_spec(tmp_path).to_dict()
    assert set(data["labels"]) == {"path", "class_field"} and "model" not in data
    # no labels: a model from the list, no epochs
    dock.set_label_source("model")
    assert _rows_shown(dock) == {"modelCombo"}
    dock.set_model(MODELS_DIR / "trees-base")
    data = dock.build_spec(tmp_path).to_dict()
    assert "labels" not in data and data["model"] == str(MODELS_DIR / "trees-base" / "model.onnx")


def test_overpass_endpoint_is_remembered(qgis_iface, engine_python):
    docks = [LandcoverDock(qgis_iface, qgis_iface.mainWindow())]
    try:
        docks[0].overpass_edit.setText("http://127.0.0.1:9/api/interpreter")
        docks[0].overpass_edit.editingFinished.emit()
        docks.append(LandcoverDock(qgis_iface, qgis_iface.mainWindow()))
        assert docks[1].overpass_edit.text() == "http://127.0.0.1:9/api/interpreter"
    finally:
        QgsSettings().remove(OVERPASS_SETTING)
        for dock in docks:  # as the fixture does: no dock left for the other tests to find
            dock.cleanup()
            dock.deleteLater()


def test_results_from_osm_labels_are_credited(dock, qgis_new_project, tmp_path):
    from test_layers import _write

    gpkg = tmp_path / "landcover.gpkg"
    _write(gpkg, "Polygon?crs=EPSG:32617&field=class:string", "landcover", "POLYGON((0 0,10 0,10 10,0 0))")
    credit = "© OpenStreetMap contributors"
    dock._succeeded({"outputs": {"gpkg": str(gpkg)}, "summary": {"attribution": credit}}, "land cover")
    assert credit in dock.status_label.text()
    (layer,) = QgsProject.instance().layerTreeRoot().children()[0].findLayers()
    assert layer.layer().metadata().rights() == [credit] and layer.layer().attribution() == credit


def test_the_dask_scheduler_is_remembered_used_and_reported(qgis_iface, engine_python, osbs_layers, tmp_path):
    """Set once in the dock: its pipelines and Processing's predict on the cluster, and the
    result message says how many workers took part."""
    from landcover_plugin.core import job

    docks = [LandcoverDock(qgis_iface, qgis_iface.mainWindow())]
    try:
        docks[0].scheduler_edit.setText(" tcp://10.0.0.5:8786 ")
        docks[0].scheduler_edit.editingFinished.emit()
        docks.append(LandcoverDock(qgis_iface, qgis_iface.mainWindow()))
        assert docks[1].scheduler_edit.text() == "tcp://10.0.0.5:8786" == job.scheduler_setting()
        docks[1].imagery_combo.setLayer(osbs_layers[0])
        assert docks[1].build_spec(tmp_path).to_dict()["predict"] == {"scheduler": "tcp://10.0.0.5:8786"}
        docks[1].scheduler_edit.setText("")
        assert "predict" not in docks[1].build_spec(tmp_path).to_dict()  # empty: this machine
    finally:
        QgsSettings().remove(job.SCHEDULER_SETTING)
        for dock in docks:
            dock.cleanup()
            dock.deleteLater()
    assert job.scheduler_setting() is None
    assert job.workers_note({"predict": {"workers": 3}}) == "; predicted on 3 Dask workers"
    assert job.workers_note({"predict": {"crowns": 3}}) == ""
