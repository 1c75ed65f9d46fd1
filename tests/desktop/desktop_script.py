"""Run inside the QGIS desktop by `qgis --code` (tests/desktop/test_desktop.py).

Opens the Landcover dock through the plugin's toolbar action, loads the
imagery and the result GeoPackage, takes a screenshot of the whole screen
and quits. Paths come from LANDCOVER_DESKTOP_* environment variables; what
it found goes to the marker file (JSON) for the test to check.
"""
import json
import os
import subprocess
import traceback

from qgis.core import QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QDockWidget
from qgis.utils import iface, plugins

MARKER = os.environ["LANDCOVER_DESKTOP_MARKER"]
SHOT = os.environ["LANDCOVER_DESKTOP_SHOT"]
RASTER = os.environ.get("LANDCOVER_DESKTOP_RASTER", "")
GPKG = os.environ.get("LANDCOVER_DESKTOP_GPKG", "")
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


def capture():
    try:
        dock = iface.mainWindow().findChild(QDockWidget, "LandcoverDock")
        report["dock_found"] = dock is not None
        report["dock_visible"] = bool(dock and dock.isVisible())
        report["engine_found"] = bool(dock and dock.create_env_button.isHidden())
        report["screenshot_rc"] = subprocess.run(["import", "-window", "root", SHOT]).returncode
    except Exception:
        report["errors"].append(traceback.format_exc())
    with open(MARKER, "w") as f:
        json.dump(report, f)
    QgsProject.instance().clear()  # no "save the project?" nor "temporary layers" question
    QTimer.singleShot(200, iface.actionExit().trigger)
    if os.environ.get("LANDCOVER_DESKTOP_DEBUG"):
        QTimer.singleShot(4000, lambda: subprocess.run(["import", "-window", "root", SHOT + ".exit.png"]))


QTimer.singleShot(1000, setup)
