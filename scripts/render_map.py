"""Render demo results over their imagery with QGIS into one PNG.

Runs in QGIS's own Python (/usr/bin/python3): render_map.py OUT.png
RASTER1 GPKG1 [RASTER2 GPKG2 ...]; one panel per raster/GeoPackage pair,
side by side, drawn by QgsMapRendererParallelJob.
"""
import sys

from qgis.core import (QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsRasterLayer,
                       QgsVectorLayer)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QImage, QPainter

PANEL = 700


def layers_of(gpkg: str) -> list:
    from osgeo import ogr

    source = ogr.Open(gpkg)
    names = [source.GetLayer(i).GetName() for i in range(source.GetLayerCount())]
    layers = [QgsVectorLayer(f"{gpkg}|layername={n}", n, "ogr") for n in names if n != "layer_styles"]
    return [layer for layer in layers if layer.isSpatial()]


def render(raster_path: str, gpkg: str) -> QImage:
    raster = QgsRasterLayer(raster_path, "imagery")
    vectors = layers_of(gpkg)
    for layer in vectors:
        layer.loadDefaultStyle()
    settings = QgsMapSettings()
    settings.setLayers(vectors[::-1] + [raster])  # first is drawn on top
    settings.setDestinationCrs(raster.crs())
    settings.setExtent(raster.extent())
    settings.setOutputSize(QSize(PANEL, PANEL))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    return job.renderedImage()


def main(out: str, *pairs: str) -> None:
    app = QgsApplication([], False)
    app.initQgis()
    panels = [render(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    image = QImage(PANEL * len(panels), PANEL, QImage.Format_ARGB32)
    image.fill(QColor("white"))
    painter = QPainter(image)
    for i, panel in enumerate(panels):
        painter.drawImage(i * PANEL, 0, panel)
    painter.end()
    if not image.save(out):
        sys.exit(f"could not write {out}")
    app.exitQgis()


if __name__ == "__main__":
    main(*sys.argv[1:])
