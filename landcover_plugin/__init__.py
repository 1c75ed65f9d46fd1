"""Landcover QGIS plugin. Only classFactory lives here: QGIS imports this
package at startup, so nothing heavy may be imported at module level."""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin import LandcoverPlugin

    return LandcoverPlugin(iface)
