"""LandcoverPlugin: what QGIS loads. A toolbar/menu action toggling the dock,
and the Processing provider (also registered without a GUI, for qgis_process)."""
from __future__ import annotations

from qgis.core import QgsApplication, QgsSettings
from qgis.PyQt.QtCore import Qt
try:  # Qt 6 (QGIS 4) moved QAction to QtGui
    from qgis.PyQt.QtGui import QAction
except ImportError:  # Qt 5 (QGIS 3)
    from qgis.PyQt.QtWidgets import QAction

from .processing.provider import LandcoverProvider, plugin_icon

MENU = "&Landcover"
DOCK_VISIBLE = "landcover/dock/visible"  # the dock reopens as the user left it


class LandcoverPlugin:
    def __init__(self, iface) -> None:
        self.iface = iface  # None under qgis_process
        self.provider: LandcoverProvider | None = None
        self.action: QAction | None = None
        self.dock = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS's name)
        if self.provider is None:
            self.provider = LandcoverProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        self.action = QAction(plugin_icon(), "Landcover", self.iface.mainWindow())
        self.action.setObjectName("LandcoverAction")
        self.action.setToolTip("Map trees or land cover from imagery (Landcover dock)")
        self.action.setCheckable(True)
        self.action.toggled.connect(self.toggle_dock)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu(MENU, self.action)
        if QgsSettings().value(DOCK_VISIBLE, False, type=bool):
            self.action.setChecked(True)

    def toggle_dock(self, visible: bool) -> None:
        if self.dock is None:
            if not visible:
                return
            from .ui.dock import LandcoverDock  # widgets only when first asked for

            self.dock = LandcoverDock(self.iface, self.iface.mainWindow())
            self.dock.visibilityChanged.connect(self._dock_visibility)
            self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        if visible:
            self.dock.refresh_sources()
            self.dock.check_engine()
        self.dock.setVisible(visible)

    def _dock_visibility(self, visible: bool) -> None:
        if self.iface.mainWindow().isVisible():  # the user's choice, not QGIS closing its window
            QgsSettings().setValue(DOCK_VISIBLE, visible)
        if self.action is not None and self.action.isChecked() != visible:
            self.action.blockSignals(True)  # the user closed the dock: keep the button in step
            self.action.setChecked(visible)
            self.action.blockSignals(False)

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.cleanup()
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
