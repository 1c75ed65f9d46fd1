"""The 'landcover' Processing provider."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..core.engine_env import find_resource
from .algorithm import MapFromImageryAlgorithm


def plugin_icon() -> QIcon:
    path = find_resource("resources/icons/landcover.svg")
    return QIcon(str(path)) if path else QIcon()


class LandcoverProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "landcover"

    def name(self) -> str:
        return "Landcover"

    def longName(self) -> str:  # noqa: N802 (QGIS's name)
        return "Landcover: trees and land cover from imagery"

    def icon(self) -> QIcon:
        return plugin_icon()

    def loadAlgorithms(self) -> None:  # noqa: N802
        self.addAlgorithm(MapFromImageryAlgorithm())
