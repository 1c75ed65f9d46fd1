"""landcover:mapfromimagery in the Processing framework (real QGIS, real engine)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback,
                       QgsProject, QgsRasterLayer)

from landcover_plugin.contract.names import OSM_ATTRIBUTION, OVERPASS_DEFAULT
from landcover_plugin.core import job

ALG_ID = "landcover:mapfromimagery"


@pytest.fixture
def alg(qgis_processing, plugin):
    return QgsApplication.processingRegistry().algorithmById(ALG_ID)


def _extent(path) -> str:
    e = QgsRasterLayer(str(path), "r").extent()
    return f"{e.xMinimum()},{e.xMaximum()},{e.yMinimum()},{e.yMaximum()} [EPSG:32617]"


class RecordingFeedback(QgsProcessingFeedback):
    """Keeps every message the algorithm reports (info, debug, errors) in `infos`."""

    def __init__(self):
        super().__init__()
        self.infos: list[str] = []

    def pushInfo(self, info):  # noqa: N802
        self.infos.append(info)

    def pushDebugInfo(self, info):  # noqa: N802
        self.infos.append(info)

    def reportError(self, error, fatalError=False):  # noqa: N802, N803
        self.infos.append(error)


def _context() -> QgsProcessingContext:
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return context


def test_registered_with_its_parameters_and_help(alg):
    assert alg.displayName() == "Map trees or land cover from imagery"
    names = {p.name() for p in alg.parameterDefinitions()}
    assert names == {"IMAGERY", "XYZ_URL", "EXTENT", "TASK", "LABELS", "LABELS_FILE", "CLASS_FIELD", "MODEL",
                     "EPOCHS", "GSD", "OUTPUT", "LABEL_SOURCE", "PRESET", "OVERPASS_URL", "OSM_FILE", "DATE",
                     "REMOTE_HOST", "MAP"}
    assert alg.parameterDefinition("PRESET").options() == ["buildings", "landcover", "trees"]
    assert alg.parameterDefinition("OVERPASS_URL").defaultValue() == OVERPASS_DEFAULT
    assert "OpenStreetMap" in alg.shortHelpString() and "© OpenStreetMap contributors" in alg.shortHelpString()
    assert alg.parameterDefinition("EPOCHS").defaultValue() == 10
    assert {o.name() for o in alg.outputDefinitions()} >= {"OUTPUT", "LAYERS"}
    assert "DeepForest CSV" in alg.shortHelpString() and "make install" in alg.shortHelpString()


def test_parameters_validate(qgis_new_project, alg, osbs_tif, osbs_csv, tmp_path):  # no raster: no default imagery
    context = _context()
    params = {"EXTENT": _extent(osbs_tif), "TASK": 0, "OUTPUT": str(tmp_path / "o.gpkg")}
    ok, message = alg.checkParameterValues(params, context)
    assert not ok and "imagery" in message
    ok, message = alg.checkParameterValues({**params, "IMAGERY": str(osbs_tif)}, context)
    assert not ok and "labels" in message and "model" in message
    ok, message = alg.checkParameterValues({**params, "IMAGERY": str(osbs_tif), "LABELS_FILE": str(osbs_csv)}, context)
    assert ok, message
    ok, message = alg.checkParameterValues({**params, "XYZ_URL": "http://127.0.0.1:1/{z}/{x}/{y}.png",
                                            "MODEL": str(tmp_path / "m.onnx")}, context)
    assert ok, message
    ok, message = alg.checkParameterValues({"IMAGERY": str(osbs_tif), "LABELS_FILE": str(osbs_csv),
                                            "OUTPUT": str(tmp_path / "o.gpkg")}, context)
    assert not ok  # the area is required


def test_parameters_become_the_pipeline(alg, osbs_tif, osbs_csv, tmp_path):
    params = {"IMAGERY": str(osbs_tif), "LABELS_FILE": str(osbs_csv), "EXTENT": _extent(osbs_tif), "TASK": 0,
              "EPOCHS": 2, "OUTPUT": str(tmp_path / "out.gpkg")}
    context = _context()
    instance = alg.create()
    assert instance.prepare(params, context, QgsProcessingFeedback())
    spec = instance.build_spec(params, context)
    e = QgsRasterLayer(str(osbs_tif), "r").extent()
    assert spec.aoi == pytest.approx((e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()))
    assert spec.aoi_crs == "EPSG:32617" and spec.task == "trees" and spec.epochs == 2
    assert spec.imagery == str(osbs_tif) and spec.labels == osbs_csv and spec.model is None
    assert spec.out == tmp_path / "out.gpkg" and spec.workdir == tmp_path / "out-work"
    assert job.problems(spec) == []


def test_the_scheduler_set_in_the_dock_is_used(alg, osbs_tif, tmp_path):
    from qgis.core import QgsSettings

    params = {"IMAGERY": str(osbs_tif), "MODEL": str(tmp_path / "m.onnx"), "LABEL_SOURCE": 3,
              "EXTENT": _extent(osbs_tif), "TASK": 0, "OUTPUT": str(tmp_path / "out.gpkg")}
    context = _context()
    QgsSettings().setValue(job.SCHEDULER_SETTING, "tls://cluster.example.org:8786")
    try:
        assert alg.create().build_spec(params, context).scheduler == "tls://cluster.example.org:8786"
    finally:
        QgsSettings().remove(job.SCHEDULER_SETTING)
    assert alg.create().build_spec(params, context).scheduler is None


def test_labels_from_the_same_choices_as_the_dock(alg, osbs_tif, osbs_csv, tmp_path):
    """Processing offers the dock's label sources, in an order that keeps older command lines
    (0 is the layer or file); "model" predicts with the model even when labels are given."""
    from landcover_plugin.processing.algorithm import MapFromImageryAlgorithm

    assert MapFromImageryAlgorithm.LABEL_SOURCES == ("layer", "overpass", "osm_file", "model")
    context = _context()
    params = {"IMAGERY": str(osbs_tif), "LABELS_FILE": str(osbs_csv), "EXTENT": _extent(osbs_tif), "TASK": 0,
              "LABEL_SOURCE": 3, "OUTPUT": str(tmp_path / "out.gpkg")}
    ok, message = alg.checkParameterValues(params, context)
    assert not ok and "model" in message
    params["MODEL"] = str(tmp_path / "m.onnx")
    ok, message = alg.checkParameterValues(params, context)
    assert ok, message
    instance = alg.create()
    assert instance.prepare(params, context, QgsProcessingFeedback())
    spec = instance.build_spec(params, context)
    assert spec.labels is None and spec.model == tmp_path / "m.onnx"


def test_the_labels_are_exactly_the_chosen_layer(alg, osbs_tif, tmp_path):
    """A GeoPackage's second layer with a filter: Processing trains on it, as the dock does."""
    from qgis.core import QgsVectorLayer
    from test_dock_choices import BLOCKS, _features, _gpkg_layer

    gpkg = tmp_path / "labels.gpkg"
    _gpkg_layer(gpkg, "other", "&field=id:integer", [(BLOCKS[0], [1])])
    _gpkg_layer(gpkg, "training_polygons", "&field=label:string",
                [(BLOCKS[0], ["forest"]), (BLOCKS[1], ["water"])])
    layer = QgsVectorLayer(f"{gpkg}|layername=training_polygons", "training_polygons", "ogr")
    layer.setSubsetString("label = 'water'")
    context = _context()
    context.project().addMapLayer(layer)
    params = {"IMAGERY": str(osbs_tif), "LABELS": layer.id(), "CLASS_FIELD": "label", "EXTENT": _extent(osbs_tif),
              "TASK": 1, "OUTPUT": str(tmp_path / "lc.gpkg")}
    spec = alg.create().build_spec(params, context)
    assert spec.labels.parent == tmp_path / "lc-work" and [f["label"] for f in _features(spec.labels)] == ["water"]


def test_osm_parameters_become_the_pipeline(alg, osbs_tif, tmp_path):
    context = _context()
    base = {"IMAGERY": str(osbs_tif), "EXTENT": _extent(osbs_tif), "TASK": 1, "OUTPUT": str(tmp_path / "lc.gpkg")}
    overpass = {**base, "LABEL_SOURCE": 1, "PRESET": "buildings", "DATE": "2021-06-01"}
    ok, message = alg.checkParameterValues(overpass, context)
    assert ok, message
    instance = alg.create()
    assert instance.prepare(overpass, context, QgsProcessingFeedback())
    spec = instance.build_spec(overpass, context)
    assert job.problems(spec) == [] and spec.labels is None and spec.model is None
    assert spec.to_dict()["labels"] == {"preset": "buildings", "overpass": OVERPASS_DEFAULT, "date": "2021-06-01"}

    ok, message = alg.checkParameterValues({**overpass, "TASK": 0}, context)
    assert not ok and "does not fit the trees task" in message and "trees" in message
    osm_file = {**base, "LABEL_SOURCE": 2, "PRESET": "landcover", "MODEL": str(tmp_path / "ignored.onnx")}
    ok, message = alg.checkParameterValues(osm_file, context)
    assert not ok and "OSM file" in message
    osm = tmp_path / "area.osm"
    osm.write_text("<osm/>")
    spec = alg.create().build_spec({**osm_file, "OSM_FILE": str(osm), "DATE": "2021-06-01"}, context)
    assert spec.to_dict()["labels"] == {"preset": "landcover", "osm_file": str(osm)} and spec.model is None


def test_missing_engine_is_a_processing_error(alg, no_engine, osbs_tif, osbs_csv, tmp_path):
    import processing

    params = {"IMAGERY": str(osbs_tif), "LABELS_FILE": str(osbs_csv), "EXTENT": _extent(osbs_tif),
              "OUTPUT": str(tmp_path / "out.gpkg")}
    with pytest.raises(QgsProcessingException, match="engine environment is missing"):
        processing.run(ALG_ID, params, context=_context(), feedback=QgsProcessingFeedback())
    assert not (tmp_path / "out.gpkg").exists()


def test_engine_error_is_a_processing_error_with_the_hint(alg, engine_python, osbs_tif, tmp_path):
    import processing

    params = {"IMAGERY": str(osbs_tif), "MODEL": str(tmp_path / "missing.onnx"), "EXTENT": _extent(osbs_tif),
              "OUTPUT": str(tmp_path / "out.gpkg")}
    with pytest.raises(QgsProcessingException, match="missing.onnx"):
        processing.run(ALG_ID, params, context=_context(), feedback=QgsProcessingFeedback())
    assert not (tmp_path / "out.gpkg").exists()


@pytest.mark.slow
def test_runs_and_returns_styled_layers(alg, qgis_new_project, engine_python, osbs_tif, osbs_csv, tmp_path,
                                        assert_styled):
    import processing

    feedback, context = RecordingFeedback(), _context()
    progress = []
    feedback.progressChanged.connect(progress.append)
    out = tmp_path / "trees.gpkg"
    params = {"IMAGERY": str(osbs_tif), "LABELS_FILE": str(osbs_csv), "EXTENT": _extent(osbs_tif), "TASK": 0,
              "EPOCHS": 1, "OUTPUT": str(out)}
    results = processing.run(ALG_ID, params, context=context, feedback=feedback)
    assert results["OUTPUT"] == str(out) and out.exists()
    assert {uri.split("layername=")[1] for uri in results["LAYERS"]} >= {"crowns", "trees"}
    to_load = context.layersToLoadOnCompletion()
    layers = [context.temporaryLayerStore().mapLayer(layer_id) for layer_id in to_load]
    assert {layer.name() for layer in layers} >= {"crowns", "trees"}
    assert all(layer.isValid() and layer.featureCount() >= 0 for layer in layers)
    assert all(details.project is QgsProject.instance() for details in to_load.values())
    for layer in layers:
        assert_styled(layer, out)
    assert progress and max(progress) == 100
    assert any("crowns" in info for info in feedback.infos)


def test_saved_connection_credentials_reach_the_engine_env_only(alg, engine_python, basic_authcfg, tmp_path,
                                                               monkeypatch):
    """A saved XYZ connection with an authcfg: its Basic credentials reach the engine (the tile
    server sees them) through the environment, and appear in no argv, pipeline file or log."""
    import json
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import processing
    from qgis.core import QgsSettings

    from landcover_plugin.contract import runner as engine_runner
    from landcover_plugin.contract.names import HEADERS_ENV

    seen: list[str | None] = []

    class NoTiles(BaseHTTPRequestHandler):  # records the credentials; has no tiles (the run stops at fetch)
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoTiles)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = "qgis/connections-xyz/Agency tiles"
    settings = QgsSettings()
    settings.setValue(f"{key}/url", f"http://127.0.0.1:{server.server_address[1]}/{{z}}/{{x}}/{{y}}.png")
    settings.setValue(f"{key}/authcfg", basic_authcfg)

    started: list[tuple[list, dict]] = []
    popen = subprocess.Popen

    def recording_popen(args, **kw):
        started.append((list(args), kw.get("env") or {}))
        return popen(args, **kw)

    monkeypatch.setattr(engine_runner.subprocess, "Popen", recording_popen)
    feedback = RecordingFeedback()
    out = tmp_path / "out.gpkg"
    params = {"XYZ_URL": "Agency tiles", "EXTENT": "-82.0005,-82.0,29.7,29.7005 [EPSG:4326]", "TASK": 0,
              "LABELS_FILE": str(tmp_path / "labels.csv"), "GSD": 0.5, "OUTPUT": str(out)}
    (tmp_path / "labels.csv").write_text("image_path,xmin,ymin,xmax,ymax,label\n")
    try:
        with pytest.raises(QgsProcessingException) as failed:  # no tiles: the run stops after the requests
            processing.run(ALG_ID, params, context=_context(), feedback=feedback)
    finally:
        server.shutdown()
        server.server_close()
        settings.remove(key)
    secrets = ("s3cret", "ZmllbGQ6czNjcmV0")  # the password, and field:s3cret in Base64
    assert seen and set(seen) == {"Basic ZmllbGQ6czNjcmV0"}  # every request carried the credentials
    (argv, env), = started
    assert json.loads(env[HEADERS_ENV]) == {"Authorization": "Basic ZmllbGQ6czNjcmV0"}
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    for secret in secrets:
        assert secret not in " ".join(argv) + written + "\n".join(feedback.infos) + str(failed.value)


def _osm_scene(folder):
    """A 256 m square at 1 m/px (EPSG:32617): green noise under an OSM forest on the left,
    blue noise under an OSM lake on the right (closed ways in a .osm file)."""
    import numpy as np
    from osgeo import gdal, osr

    x0, y0, size = 500000.0, 4000256.0, 256
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (3, size, size)).astype(np.uint8)
    image[1, :, :128] += 120
    image[2, :, 128:] += 150
    tif = folder / "scene.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(tif), size, size, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((x0, 1, 0, y0, 0, -1))
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(32617)
    ds.SetProjection(utm.ExportToWkt())
    ds.WriteArray(image)
    ds = None
    wgs84 = osr.SpatialReference()
    wgs84.ImportFromEPSG(4326)
    wgs84.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    to_wgs84 = osr.CoordinateTransformation(utm, wgs84)
    nodes, ways = [], []
    for wid, ((c0, c1), tag) in enumerate((((4, 112), 'k="landuse" v="forest"'),
                                          ((144, 252), 'k="natural" v="water"')), start=1):
        refs = []
        for x, y in ((x0 + c0, y0 - 252), (x0 + c1, y0 - 252), (x0 + c1, y0 - 4), (x0 + c0, y0 - 4)):
            lon, lat, _ = to_wgs84.TransformPoint(x, y)
            nodes.append(f'<node id="{len(nodes) + 1}" version="1" lat="{lat!r}" lon="{lon!r}"/>')
            refs.append(len(nodes))
        nds = "".join(f'<nd ref="{r}"/>' for r in refs + refs[:1])
        ways.append(f'<way id="{wid}" version="1">{nds}<tag {tag}/></way>')
    osm = folder / "scene.osm"
    osm.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<osm version="0.6">' + "".join(nodes + ways) + "</osm>")
    return tif, osm


@pytest.mark.slow
def test_runs_with_osm_labels_and_credits_them(alg, qgis_new_project, engine_python, tmp_path):
    import processing

    tif, osm = _osm_scene(tmp_path)
    feedback, context = RecordingFeedback(), _context()
    out = tmp_path / "landcover.gpkg"
    params = {"IMAGERY": str(tif), "EXTENT": "500000,500256,4000000,4000256 [EPSG:32617]", "TASK": 1,
              "LABEL_SOURCE": 2, "PRESET": "landcover", "OSM_FILE": str(osm), "EPOCHS": 1, "OUTPUT": str(out)}
    results = processing.run(ALG_ID, params, context=context, feedback=feedback)
    assert results["OUTPUT"] == str(out) and out.exists()
    pipeline = (tmp_path / "landcover-pipeline.yaml").read_text()
    assert '"osm_file"' in pipeline and '"preset": "landcover"' in pipeline
    layers = [context.temporaryLayerStore().mapLayer(i) for i in context.layersToLoadOnCompletion()]
    assert "landcover" in {layer.name() for layer in layers}
    for layer in layers:  # the ODbL credit travels with every result layer
        assert OSM_ATTRIBUTION in layer.metadata().rights() and layer.attribution() == OSM_ATTRIBUTION
    assert any(OSM_ATTRIBUTION in info for info in feedback.infos)


def test_parameters_in_the_order_of_the_job_with_the_expert_ones_advanced(alg):
    """What to map and from what first, the outputs last; the expert parameters folded under
    'Advanced parameters' instead of one flat list of 18."""
    from qgis.core import QgsProcessingParameterDefinition

    instance = alg.create()  # kept: its parameters live as long as it does
    definitions = instance.parameterDefinitions()
    advanced = [p.name() for p in definitions if p.flags() & QgsProcessingParameterDefinition.FlagAdvanced]
    shown = [p.name() for p in definitions if not p.flags() & QgsProcessingParameterDefinition.FlagAdvanced]
    assert shown == ["IMAGERY", "EXTENT", "TASK", "LABEL_SOURCE", "LABELS", "CLASS_FIELD", "PRESET", "OSM_FILE",
                     "MODEL", "EPOCHS", "OUTPUT", "MAP"]
    assert sorted(advanced) == ["DATE", "GSD", "LABELS_FILE", "OVERPASS_URL", "REMOTE_HOST", "XYZ_URL"]


def test_the_help_shows_whole_paragraphs_in_the_dialog(alg, qgis_iface):
    """Processing's dialog makes each line of the help a paragraph: each must be a whole one."""
    from processing.gui.AlgorithmDialog import AlgorithmDialog
    from qgis.gui import QgsBrowserGuiModel
    from qgis.PyQt.QtWidgets import QTextBrowser

    browser = QgsBrowserGuiModel()
    qgis_iface.browserModel = lambda: browser  # pytest-qgis's interface has none; the dialog asks for it
    dialog = AlgorithmDialog(alg.create(), parent=qgis_iface.mainWindow())
    help_view = dialog.findChild(QTextBrowser, "textShortHelp")
    document = help_view.document()
    paragraphs = [document.findBlockByNumber(i).text().strip() for i in range(document.blockCount())]
    paragraphs = [p for p in paragraphs if p]
    assert paragraphs[0] == alg.displayName()
    assert len(paragraphs) >= 8
    for paragraph in paragraphs[1:]:
        assert paragraph[0].isupper() and paragraph.endswith("."), paragraph
    assert any(p.startswith("Maps trees") and p.endswith("(never in QGIS's Python).") for p in paragraphs)
    dialog.deleteLater()


@pytest.mark.parametrize("task_index, preset", [(0, "trees"), (1, "landcover"), (2, "buildings"), (3, "landcover")])
def test_the_osm_preset_follows_the_task(alg, osbs_tif, tmp_path, task_index, preset):
    """No preset chosen: the task's own (not 'landcover' for the Trees task); one chosen that
    does not fit the task is still refused with the ones that do."""
    context = _context()
    params = {"IMAGERY": str(osbs_tif), "EXTENT": _extent(osbs_tif), "TASK": task_index, "LABEL_SOURCE": 1,
              "OUTPUT": str(tmp_path / "o.gpkg")}
    fresh = alg.create()  # kept: its parameters live as long as it does
    assert fresh.parameterDefinition("PRESET").defaultValue() is None
    ok, message = alg.checkParameterValues(params, context)
    assert ok, message
    assert alg.create().build_spec(params, context).preset == preset
    if task_index == 0:
        ok, message = alg.checkParameterValues({**params, "PRESET": "landcover"}, context)
        assert not ok and "does not fit the trees task: use trees" in message


def test_the_imagery_starts_with_the_projects_raster_file(qgis_processing, plugin, qgis_new_project, osbs_tif,
                                                         tmp_path):
    """With a raster file in the project the imagery is required and starts with it (never a web
    layer: it may be a street map); without one it stays optional, for an XYZ URL; a URL typed
    under Advanced is used instead of the preselected layer."""
    from qgis.core import QgsProcessingParameterDefinition

    project = QgsProject.instance()
    street = QgsRasterLayer("type=xyz&url=https://tile.openstreetmap.org/{z}/{x}/{y}.png&zmax=19", "OSM", "wms")
    project.addMapLayer(street)  # valid or not (no network here), it is never the default
    before = QgsApplication.processingRegistry().createAlgorithmById(ALG_ID)
    empty = before.parameterDefinition("IMAGERY")
    assert empty.defaultValue() is None and empty.flags() & QgsProcessingParameterDefinition.FlagOptional

    raster = QgsRasterLayer(str(osbs_tif), "orthophoto")
    project.addMapLayer(raster)
    instance = QgsApplication.processingRegistry().createAlgorithmById(ALG_ID)
    imagery = instance.parameterDefinition("IMAGERY")
    assert imagery.defaultValue() == raster.id()
    assert not imagery.flags() & QgsProcessingParameterDefinition.FlagOptional

    context = _context()
    params = {"EXTENT": _extent(osbs_tif), "TASK": 0, "LABEL_SOURCE": 3, "MODEL": str(tmp_path / "m.onnx"),
              "OUTPUT": str(tmp_path / "o.gpkg")}
    ok, message = instance.checkParameterValues(params, context)
    assert ok, message
    assert instance.build_spec(params, context).imagery == str(osbs_tif)
    url = "https://tiles.example.org/{z}/{x}/{y}.png"
    assert instance.build_spec({**params, "XYZ_URL": url}, context).imagery == url


@pytest.mark.slow
def test_a_run_exports_the_map_for_a_report(alg, qgis_new_project, engine_python, osbs_tif, tmp_path):
    """MAP: a PDF and a PNG beside it, titled with the task, the area, the model and the date, over
    the imagery; the log gives the hectares and figures rounded, every figure in the debug log."""
    import processing
    from qgis.PyQt.QtGui import QImage

    from landcover_plugin.contract.names import MODELS_DIR

    feedback, context = RecordingFeedback(), _context()
    params = {"IMAGERY": str(osbs_tif), "EXTENT": _extent(osbs_tif), "TASK": 0, "LABEL_SOURCE": 3,
              "MODEL": str(MODELS_DIR / "trees-base" / "model.onnx"), "OUTPUT": str(tmp_path / "trees.gpkg"),
              "MAP": str(tmp_path / "maps" / "trees.pdf")}
    results = processing.run(ALG_ID, params, context=context, feedback=feedback)
    pdf, png = tmp_path / "maps" / "trees.pdf", tmp_path / "maps" / "trees.png"
    assert results["MAP"] == str(pdf)
    assert pdf.read_bytes()[:5] == b"%PDF-" and not QImage(str(png)).isNull()
    assert sorted(p.name for p in pdf.parent.iterdir()) == ["trees.pdf", "trees.png"]
    artifacts = Path(__file__).resolve().parents[1] / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(png, artifacts / "processing_map_trees.png")  # for people to look at
    done = next(info for info in feedback.infos if info.startswith("Done: "))
    assert "crowns: " in done and "{" not in done  # the headline figures, not the engine's raw summary
    assert any(info.startswith("Engine summary: {") for info in feedback.infos)
    assert any(f"Map: {pdf}" in info for info in feedback.infos)


def test_no_imagery_default_off_the_main_thread(qgis_processing, plugin, qgis_new_project, osbs_tif):
    """A model creates its child algorithms in its worker thread: the project's layers are not read there."""
    import threading

    from landcover_plugin.processing.algorithm import default_imagery

    raster = QgsRasterLayer(str(osbs_tif), "orthophoto")
    QgsProject.instance().addMapLayer(raster)
    assert default_imagery(QgsProject.instance()) is raster
    found = []
    worker = threading.Thread(target=lambda: found.append(default_imagery(QgsProject.instance())))
    worker.start()
    worker.join()
    assert found == [None]
