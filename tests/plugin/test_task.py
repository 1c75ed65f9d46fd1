"""EngineTask: the engine run as a QgsTask, in real QGIS, against the real engine."""
from __future__ import annotations

import os
import time

import pytest
from qgis.core import Qgis, QgsApplication, QgsProject, QgsRasterLayer, QgsTask

from landcover_plugin.contract.pipeline_file import PipelineFile
from landcover_plugin.contract.runner import EngineRun
from landcover_plugin.core import job
from landcover_plugin.core.layers import load_result_layers
from landcover_plugin.core.task import EngineTask, result_level, summary_text


def _start(task: EngineTask) -> EngineTask:
    QgsApplication.taskManager().addTask(task)
    return task


def _done(task: EngineTask) -> bool:
    return task.status() in (QgsTask.Complete, QgsTask.Terminated)


def test_engine_error_reaches_the_message_bar(qgis_iface, engine_python, osbs_tif, tmp_path, wait_until):
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    failures = []
    engine = EngineRun(engine_python, ["predict", "--model", str(tmp_path / "missing.onnx"),
                                       "--imagery", str(osbs_tif), "--out", str(tmp_path / "r.gpkg")])
    task = _start(EngineTask("Landcover: predict", engine, bar, on_success=pytest.fail,
                             on_failure=failures.append))
    assert wait_until(lambda: bool(failures), 60)
    assert task.status() == QgsTask.Terminated
    failure = failures[0]
    assert failure.code not in ("INTERNAL", "ENGINE_CRASHED", "CANCELLED") and failure.hint
    assert "missing.onnx" in failure.message
    shown = bar.get_messages(Qgis.Critical)
    # the engine's words become the dock's: "a model folder trained by Landcover", not `landcover train`
    assert any(job.dock_words(str(failure)) in m and "landcover train" not in m for m in shown), shown


def test_missing_engine_environment(qgis_iface, no_engine, wait_until):
    from landcover_plugin.core.locate import engine_location

    bar = qgis_iface.messageBar()
    bar.clear_messages()
    failures = []
    location = engine_location()
    assert location.python == no_engine
    task = _start(EngineTask("Landcover: trees", EngineRun(location.python, ["run", "x.yaml"]), bar,
                             on_failure=failures.append))
    assert wait_until(lambda: bool(failures), 30)
    assert failures[0].code == "ENGINE_MISSING"
    assert any("engine environment is missing" in m and "make install" in m and str(no_engine) in m
               for m in bar.get_messages(Qgis.Critical))
    assert task.status() == QgsTask.Terminated


def test_cancel_stops_the_engine_and_leaves_no_output(engine_python, slow_tiles, tmp_path, wait_until):
    out = tmp_path / "mosaic.tif"
    # ~49 tiles at zoom 18 and 2 s per tile: minutes of work unless cancelled.
    engine = EngineRun(engine_python, ["fetch", "--aoi", "-82.330,29.680,-82.320,29.690", "--source",
                                       slow_tiles.url, "--zoom", "18", "--cache", str(tmp_path / "cache"),
                                       "--out", str(out)], cwd=tmp_path)
    failures = []
    task = _start(EngineTask("Landcover: fetch", engine, on_failure=failures.append))
    assert wait_until(slow_tiles.requested.is_set, 60), f"the engine never asked for a tile: {list(engine.stderr_tail)}"
    assert engine.proc.poll() is None
    task.cancel()
    cancelled_at = time.monotonic()
    assert wait_until(lambda: _done(task) and engine.proc.poll() is not None, 10)
    stopped_after = time.monotonic() - cancelled_at
    assert engine.proc.returncode == 130, (engine.proc.returncode, list(engine.stderr_tail))  # SIGTERM handled
    assert stopped_after < 6, stopped_after  # it did not run its many remaining tiles
    # Reported as cancelled, not failed: no "Task failed" from QGIS above the plugin's own message.
    assert task.status() == QgsTask.Complete and task.description().endswith("(cancelled)")
    assert failures[0].code == "CANCELLED"
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith((".mosaic", "mosaic"))]
    assert leftovers == [], leftovers


def test_summary_text_shows_the_results():
    summary = {"fetch": {"tiles": 4}, "predict": {"crowns": 61, "canopy_m2": 1234.5, "seconds": 3.2,
                                                  "provider": "CPUExecutionProvider"}}
    assert summary_text(summary) == "crowns: 61, canopy m²: 1,234.5 (model ran on CPU)"
    assert summary_text({"tiles": 3, "zoom": 18}) == "zoom: 18"
    osm = {"predict": {"crowns": 2}, "attribution": "© OpenStreetMap contributors"}
    assert summary_text(osm) == "crowns: 2. Labels: © OpenStreetMap contributors"
    land = {"train": {"val_accuracy": 0.8071, "family": "unet", "weakest_class": "water",
                      "classes_not_learnt": ["agriculture"], "still_improving": True},
            "predict": {"polygons": 1058}}
    assert summary_text(land) == ("polygons: 1058. Validation accuracy 0.81 (unet), weakest class: water; "
                                  "not learnt: agriculture; still improving at the last epoch: train longer")
    assert result_level(land) == Qgis.Warning
    assert result_level({"train": {"val_accuracy": 0.9, "classes_not_learnt": []}}) == Qgis.Success


def osbs_spec(osbs_tif, osbs_csv, tmp_path) -> PipelineFile:
    extent = QgsRasterLayer(str(osbs_tif), "osbs").extent()
    return PipelineFile(task="trees", aoi=(extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()),
                        aoi_crs="EPSG:32617", imagery=str(osbs_tif), labels=osbs_csv, epochs=1, chip_size=64,
                        out=tmp_path / "trees.gpkg", workdir=tmp_path / "work")


@pytest.mark.slow
def test_pipeline_task_adds_styled_layers(qgis_iface, qgis_new_project, engine_python, osbs_tif, osbs_csv, tmp_path,
                                          wait_until, assert_styled):
    spec = osbs_spec(osbs_tif, osbs_csv, tmp_path)
    pipeline = spec.write(tmp_path / "pipeline.yaml")
    loaded, progress = [], []
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    task = EngineTask("Landcover: trees", EngineRun(engine_python, ["run", str(pipeline)]), bar,
                      on_success=lambda ev: loaded.extend(load_result_layers(ev["outputs"]["gpkg"],
                                                                             "Landcover — trees")),
                      on_failure=lambda f: pytest.fail(f"{f.code}: {f}"))
    task.progressChanged.connect(progress.append)
    _start(task)
    assert wait_until(lambda: _done(task), 300)
    assert task.status() == QgsTask.Complete
    assert {layer.name() for layer in loaded} >= {"crowns", "trees"}
    group = QgsProject.instance().layerTreeRoot().children()[0]
    assert group.name() == "Landcover — trees"
    assert {n.layer().name() for n in group.findLayers()} == {layer.name() for layer in loaded}
    for layer in loaded:
        assert layer.isValid() and QgsProject.instance().mapLayer(layer.id()) is layer
        assert_styled(layer, spec.out)
    assert progress and max(progress) == 100 and progress == sorted(progress)
    # a warning rather than a success when the 2-epoch model was still improving
    assert any("crowns:" in m for m in bar.get_messages(Qgis.Success) + bar.get_messages(Qgis.Warning))
