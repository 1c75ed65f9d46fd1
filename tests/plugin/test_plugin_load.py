"""The plugin loads into QGIS and unloads without leftovers."""
from __future__ import annotations

from qgis.core import QgsApplication
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QEvent
from qgis.PyQt.QtWidgets import QDockWidget

import landcover_plugin

ALG_ID = "landcover:mapfromimagery"


def _flush_deletes() -> None:
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    QCoreApplication.processEvents()


def test_load_toggle_and_unload(qgis_iface):
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("landcover") is None

    plugin = landcover_plugin.classFactory(qgis_iface)
    plugin.initGui()
    assert registry.providerById("landcover") is not None
    assert registry.algorithmById(ALG_ID) is not None
    assert plugin.action.text() == "Landcover" and not plugin.action.icon().isNull()

    plugin.action.trigger()  # the toolbar button opens the dock
    main = qgis_iface.mainWindow()
    dock = main.findChild(QDockWidget, "LandcoverDock")
    assert dock is plugin.dock and dock.isVisibleTo(main)
    plugin.action.trigger()
    assert not dock.isVisibleTo(main)
    action = plugin.action

    plugin.unload()
    _flush_deletes()
    assert registry.providerById("landcover") is None
    assert registry.algorithmById(ALG_ID) is None
    assert main.findChild(QDockWidget, "LandcoverDock") is None
    assert sip.isdeleted(dock) and sip.isdeleted(action)
    assert plugin.dock is None and plugin.action is None


def test_init_processing_without_gui(qgis_app):
    """qgis_process calls classFactory(None) + initProcessing(), never initGui."""
    plugin = landcover_plugin.classFactory(None)
    plugin.initProcessing()
    try:
        assert QgsApplication.processingRegistry().algorithmById(ALG_ID) is not None
    finally:
        plugin.unload()
    assert QgsApplication.processingRegistry().providerById("landcover") is None
