"""Run inside the QGIS desktop by `qgis --code` (tests/desktop/test_desktop.py).

Opens the Landcover dock through the plugin's toolbar action, loads the
imagery and the result GeoPackage, and takes screenshots of the whole screen:
the dock with the results, its area choices, its model list, and a training run
in progress (then cancelled). Then it quits. Paths come from LANDCOVER_DESKTOP_*
environment variables; what it found goes to the marker file (JSON) for the test.
"""
import json
import os
import shutil
import subprocess
import time
import traceback

from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtWidgets import QDockWidget
from qgis.utils import iface, plugins

MARKER = os.environ["LANDCOVER_DESKTOP_MARKER"]
SHOT = os.environ["LANDCOVER_DESKTOP_SHOT"]
RASTER = os.environ.get("LANDCOVER_DESKTOP_RASTER", "")
GPKG = os.environ.get("LANDCOVER_DESKTOP_GPKG", "")
CSV = os.environ.get("LANDCOVER_DESKTOP_CSV", "")
OUT = os.environ.get("LANDCOVER_DESKTOP_OUT", "")
report = {"errors": []}


def setup():
    try:
        window = iface.mainWindow()
        window.move(0, 0)
        window.resize(1400, 900)
        if RASTER:
            raster = QgsRasterLayer(RASTER, "imagery")
            QgsProject.instance().addMapLayer(raster)
            report["raster_valid"] = raster.isValid()
        if GPKG:
            from landcover_plugin.core.layers import load_result_layers

            report["result_layers"] = [layer.name() for layer in load_result_layers(GPKG, "Landcover — trees")]
        plugin = plugins.get("landcover_plugin")
        report["plugin_loaded"] = plugin is not None
        if plugin is not None:
            plugin.action.setChecked(True)  # as a click on the toolbar button
        if RASTER:
            iface.mapCanvas().setExtent(raster.extent())
            iface.mapCanvas().refresh()
            if plugin is not None:  # show a drawn area, as after "Draw rectangle"
                plugin.dock.set_area(raster.extent().buffered(-raster.extent().width() / 10), raster.crs())
    except Exception:
        report["errors"].append(traceback.format_exc())
    QTimer.singleShot(5000, capture)


def shot(name: str) -> int:
    """A screenshot of the whole screen beside SHOT: desktop-NAME.png."""
    path = SHOT if not name else SHOT.replace(".png", f"-{name}.png")
    return subprocess.run(["import", "-window", "root", path]).returncode


def step(function, then, delay_ms: int = 1000):
    """Run one step, record what fails, and go on with the next after a delay (the screen repaints)."""
    def run():
        try:
            function()
        except Exception:
            report["errors"].append(traceback.format_exc())
        QTimer.singleShot(delay_ms, then)
    return run


def capture():
    dock = iface.mainWindow().findChild(QDockWidget, "LandcoverDock")
    report["dock_found"] = dock is not None
    report["dock_visible"] = bool(dock and dock.isVisible())
    report["engine_found"] = bool(dock and dock.create_env_button.isHidden())
    report["screenshot_rc"] = shot("")
    if dock is None:
        finish()
        return
    menu = dock.draw_button.menu()
    step(lambda: menu.popup(dock.draw_button.mapToGlobal(dock.draw_button.rect().bottomLeft())),
         step(lambda: report.update(area_shot=shot("area")) or menu.hide(),
              step(lambda: show_models(dock), step(lambda: close_models(dock), lambda: start_training(dock)))))()


def show_models(dock):
    dock.set_label_source("model")
    dock.model_combo.showPopup()


def close_models(dock):
    report["models_shot"] = shot("models")
    report["models_listed"] = [dock.model_combo.itemText(i) for i in range(dock.model_combo.count())]
    dock.model_combo.hidePopup()


def start_training(dock):
    """A real training run from the dock; the screenshot when it reports its second epoch."""
    if not (CSV and OUT):
        finish()
        return
    labels = QgsVectorLayer(f"file://{CSV}?delimiter=,&geomType=none", "crowns", "delimitedtext")
    QgsProject.instance().addMapLayer(labels)
    dock.labels_combo.setLayer(labels)
    dock.epochs_spin.setValue(50)
    dock.out_dir.setFilePath(OUT)
    if dock.run() is None:
        report["errors"].append(f"the run did not start: {dock.status_label.text()}")
        finish()
        return
    deadline = time.monotonic() + 90

    def poll():
        text = dock.status_label.text()
        if text.startswith("Training: epoch 2/") or time.monotonic() > deadline:
            report["progress_status"], report["progress_value"] = text, dock.progress.value()
            report["progress_shot"] = shot("progress")
            dock.cancel()
            QTimer.singleShot(500, wait_cancelled)
        else:
            QTimer.singleShot(200, poll)

    def wait_cancelled():
        if dock.task is None or time.monotonic() > deadline + 15:
            report["cancel_status"] = dock.status_label.text()
            predict_and_export(dock)
        else:
            QTimer.singleShot(200, wait_cancelled)
    poll()


def predict_and_export(dock):
    """Map with the shipped model, then 'Export map…': the report's PNG is kept beside the shots."""
    dock.set_label_source("model")
    dock.model_combo.setCurrentIndex(dock.model_combo.findText("trees-base", Qt.MatchFlag.MatchStartsWith))
    if dock.run() is None:
        report["errors"].append(f"the prediction did not start: {dock.status_label.text()}")
        finish()
        return
    deadline = time.monotonic() + 60

    def wait_done():
        if dock.task is not None and time.monotonic() < deadline:
            QTimer.singleShot(200, wait_done)
            return
        try:  # an exception here would open QGIS's modal error dialog and hang the test: record it
            report["predict_status"] = dock.status_label.text()
            dock.export_button.click()
            report["export_status"] = dock.status_label.text()
            if dock.results is not None:
                png = dock.results.gpkg.with_name(dock.results.gpkg.stem + "-map.png")
                if png.exists():
                    shutil.copy(png, SHOT.replace(".png", "-report.png"))
        except Exception:
            report["errors"].append(traceback.format_exc())
        QTimer.singleShot(1000, lambda: report.update(result_shot=shot("result")) or finish())
    wait_done()


def finish():
    with open(MARKER, "w") as f:
        json.dump(report, f)
    QgsProject.instance().clear()  # no "save the project?" nor "temporary layers" question
    QTimer.singleShot(200, iface.actionExit().trigger)
    if os.environ.get("LANDCOVER_DESKTOP_DEBUG"):
        QTimer.singleShot(4000, lambda: subprocess.run(["import", "-window", "root", SHOT + ".exit.png"]))


QTimer.singleShot(1000, setup)
