"""landcover:mapfromimagery in the Processing framework (real QGIS, real engine)."""
from __future__ import annotations

import pytest
from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback,
                       QgsProject, QgsRasterLayer)

ALG_ID = "landcover:mapfromimagery"


@pytest.fixture
def alg(qgis_processing, plugin):
    return QgsApplication.processingRegistry().algorithmById(ALG_ID)


def _extent(path) -> str:
    e = QgsRasterLayer(str(path), "r").extent()
    return f"{e.xMinimum()},{e.xMaximum()},{e.yMinimum()},{e.yMaximum()} [EPSG:32617]"


def _context() -> QgsProcessingContext:
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return context


def test_registered_with_its_parameters_and_help(alg):
    assert alg.displayName() == "Map trees or land cover from imagery"
    names = {p.name() for p in alg.parameterDefinitions()}
    assert names == {"IMAGERY", "XYZ_URL", "EXTENT", "TASK", "LABELS", "LABELS_FILE", "CLASS_FIELD", "MODEL",
                     "EPOCHS", "GSD", "OUTPUT"}
    assert alg.parameterDefinition("EPOCHS").defaultValue() == 10
    assert {o.name() for o in alg.outputDefinitions()} >= {"OUTPUT", "LAYERS"}
    assert "DeepForest CSV" in alg.shortHelpString() and "make install" in alg.shortHelpString()


def test_parameters_validate(alg, osbs_tif, osbs_csv, tmp_path):
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
    assert spec.problems() == []


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

    class Feedback(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.infos = []

        def pushInfo(self, info):  # noqa: N802
            self.infos.append(info)

    feedback, context = Feedback(), _context()
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


def test_saved_connection_credentials_reach_the_engine_env_only(alg, engine_python, tmp_path, monkeypatch):
    """A saved XYZ connection with an authcfg: its Basic credentials reach the engine (the tile
    server sees them) through the environment, and appear in no argv, pipeline file or log."""
    import json
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import processing
    from qgis.core import QgsAuthMethodConfig, QgsSettings

    from landcover_plugin.core import engine_runner
    from landcover_plugin.core.sources import HEADERS_ENV

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
    manager = QgsApplication.authManager()
    manager.setMasterPassword("test-master", True)
    config = QgsAuthMethodConfig("Basic")
    config.setName("tiles")
    config.setConfig("username", "field")
    config.setConfig("password", "s3cret")
    assert manager.storeAuthenticationConfig(config)
    key = "qgis/connections-xyz/Agency tiles"
    settings = QgsSettings()
    settings.setValue(f"{key}/url", f"http://127.0.0.1:{server.server_address[1]}/{{z}}/{{x}}/{{y}}.png")
    settings.setValue(f"{key}/authcfg", config.id())

    started: list[tuple[list, dict]] = []
    popen = subprocess.Popen

    def recording_popen(args, **kw):
        started.append((list(args), kw.get("env") or {}))
        return popen(args, **kw)

    monkeypatch.setattr(engine_runner.subprocess, "Popen", recording_popen)
    messages: list[str] = []

    class Feedback(QgsProcessingFeedback):
        def pushInfo(self, info):  # noqa: N802
            messages.append(info)

        def pushDebugInfo(self, info):  # noqa: N802
            messages.append(info)

        def reportError(self, error, fatalError=False):  # noqa: N802, N803
            messages.append(error)

    out = tmp_path / "out.gpkg"
    params = {"XYZ_URL": "Agency tiles", "EXTENT": "-82.0005,-82.0,29.7,29.7005 [EPSG:4326]", "TASK": 0,
              "LABELS_FILE": str(tmp_path / "labels.csv"), "GSD": 0.5, "OUTPUT": str(out)}
    (tmp_path / "labels.csv").write_text("image_path,xmin,ymin,xmax,ymax,label\n")
    try:
        with pytest.raises(QgsProcessingException) as failed:  # no tiles: the run stops after the requests
            processing.run(ALG_ID, params, context=_context(), feedback=Feedback())
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
        assert secret not in " ".join(argv) + written + "\n".join(messages) + str(failed.value)
