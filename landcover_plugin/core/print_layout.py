"""A report-ready map of the results: a print layout (map at the results' extent, their
legend, scale bar, north arrow, title, credits of the labels and the imagery) exported to
PDF and PNG, each written whole (a temporary name, then renamed)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsLayoutExporter, QgsLayoutItemLabel,
                       QgsLayoutItemLegend, QgsLayoutItemMap, QgsLayoutItemPicture, QgsLayoutItemScaleBar,
                       QgsLayoutPoint, QgsLayoutSize, QgsMapLayer, QgsPrintLayout, QgsProject, QgsRectangle,
                       QgsSymbolLayerUtils, QgsVectorLayer)
from qgis.PyQt.QtGui import QFont

NORTH_ARROW = "arrows/NorthArrow_02.svg"  # one of QGIS's own SVGs (found through its SVG paths)
# A4 landscape in mm: map on the left, legend and north arrow on the right, credits below.
PAGE_W, PAGE_H, MARGIN, SIDE_W = 297.0, 210.0, 10.0, 70.0


@dataclass(frozen=True)
class MapFiles:
    pdf: Path
    png: Path


def layer_credit(layer: QgsMapLayer) -> str:
    """What a layer asks to be credited with: its attribution, else its metadata's rights
    (where the plugin puts OSM's), else its name."""
    server = layer.serverProperties() if hasattr(layer, "serverProperties") else None
    attribution = server.attribution() if server is not None and hasattr(server, "attribution") \
        else layer.attribution()
    return attribution or "; ".join(layer.metadata().rights()) or layer.name()


def credits_text(results: list[QgsMapLayer], backdrop: list[QgsMapLayer]) -> str:
    """The layout's foot: 'Training labels: © OpenStreetMap contributors. Imagery: OSBS_029.'"""
    labels = sorted({c for layer in results if (c := layer_credit(layer)) != layer.name()})
    imagery = sorted({layer_credit(layer) for layer in backdrop})
    parts = [f"Training labels: {', '.join(labels)}." if labels else "",
             f"Imagery: {', '.join(imagery)}." if imagery else ""]
    return " ".join(p for p in parts if p)


def results_extent(layers: list[QgsMapLayer], project: QgsProject,
                   crs: QgsCoordinateReferenceSystem) -> QgsRectangle:
    """The layers' combined extent in `crs`, with a 5 % margin so edge features are not cut."""
    extent = QgsRectangle()
    extent.setMinimal()
    for layer in layers:
        transform = QgsCoordinateTransform(layer.crs(), crs, project.transformContext())
        extent.combineExtentWith(transform.transformBoundingBox(layer.extent()))
    return extent.buffered(0.05 * max(extent.width(), extent.height()))


def build_layout(project: QgsProject, results: list[QgsMapLayer], title: str,
                 backdrop: Sequence[QgsMapLayer] = ()) -> QgsPrintLayout:
    """A one-page layout of `results` (geometry layers; tables are left out) over `backdrop`
    (the imagery), in the results' CRS so the scale bar measures metres."""
    shown = [layer for layer in results if not (isinstance(layer, QgsVectorLayer) and not layer.isSpatial())]
    if not shown:
        raise ValueError("No result layer with geometries to map.")
    layout = QgsPrintLayout(project)
    layout.initializeDefaults()  # one A4 landscape page
    layout.setName(title)
    map_w, map_h = PAGE_W - 3 * MARGIN - SIDE_W, PAGE_H - 2 * MARGIN - 30

    _label(layout, title, 16, QgsLayoutPoint(MARGIN, MARGIN - 4), QgsLayoutSize(PAGE_W - 2 * MARGIN, 12), bold=True)
    map_item = QgsLayoutItemMap(layout)
    layout.addLayoutItem(map_item)  # before placing it: sizes are converted with the layout's units
    map_item.setCrs(shown[0].crs())
    map_item.setLayers([*shown, *backdrop])  # first drawn on top
    map_item.setFrameEnabled(True)
    extent = results_extent(shown, project, shown[0].crs())
    map_item.attemptMove(QgsLayoutPoint(MARGIN, MARGIN + 10))
    # zoomToExtent scales the current extent (empty on a new item), setExtent resizes the item to
    # the extent's shape: set it, restore the size, then zoom (the extent widened to the item's shape).
    map_item.attemptResize(QgsLayoutSize(map_w, map_h))
    map_item.setExtent(extent)
    map_item.attemptResize(QgsLayoutSize(map_w, map_h))
    map_item.zoomToExtent(extent)

    legend = QgsLayoutItemLegend(layout)
    legend.setTitle("Legend")
    legend.setAutoUpdateModel(False)  # its own copy of the layer tree (it owns it): the results only
    root = legend.model().rootGroup()
    root.removeAllChildren()
    for layer in shown:
        root.addLayer(layer)
    legend.setLinkedMap(map_item)
    layout.addLayoutItem(legend)
    legend.attemptMove(QgsLayoutPoint(PAGE_W - MARGIN - SIDE_W, MARGIN + 10))
    legend.adjustBoxSize()

    arrow = QgsLayoutItemPicture(layout)
    layout.addLayoutItem(arrow)
    arrow.setPicturePath(QgsSymbolLayerUtils.svgSymbolNameToPath(NORTH_ARROW, project.pathResolver()))
    arrow.setLinkedMap(map_item)  # points to true north of the map's CRS
    arrow.attemptMove(QgsLayoutPoint(PAGE_W - MARGIN - 18, MARGIN + 10 + map_h - 22))
    arrow.attemptResize(QgsLayoutSize(14, 20))

    scale = QgsLayoutItemScaleBar(layout)
    layout.addLayoutItem(scale)
    scale.setStyle("Single Box")
    scale.setLinkedMap(map_item)
    scale.applyDefaultSize()  # a round length for the map's scale, in the CRS's units (metres)
    scale.attemptMove(QgsLayoutPoint(MARGIN, MARGIN + 12 + map_h))

    foot = credits_text(shown, list(backdrop))
    _label(layout, foot, 8, QgsLayoutPoint(MARGIN, PAGE_H - MARGIN - 6), QgsLayoutSize(PAGE_W - 2 * MARGIN, 8))
    return layout


def _label(layout: QgsPrintLayout, text: str, size: int, where: QgsLayoutPoint, box: QgsLayoutSize,
           bold: bool = False) -> QgsLayoutItemLabel:
    label = QgsLayoutItemLabel(layout)
    layout.addLayoutItem(label)
    label.setText(text)
    font = QFont()
    font.setPointSize(size)
    font.setBold(bold)
    if hasattr(label, "setTextFormat"):  # QGIS >= 3.24; setFont is gone in QGIS 4
        from qgis.core import QgsTextFormat

        label.setTextFormat(QgsTextFormat.fromQFont(font))
    else:
        label.setFont(font)
    label.attemptMove(where)
    label.attemptResize(box)
    return label


def export_map(layout: QgsPrintLayout, pdf: Path, png: Path, dpi: int = 150) -> MapFiles:
    """The layout as a PDF (vector) and a PNG at `dpi`; each file appears whole or not at all.
    OSError names the file and QGIS's reason when an export fails."""
    exporter = QgsLayoutExporter(layout)
    pdf_settings = QgsLayoutExporter.PdfExportSettings()
    pdf_settings.dpi = dpi
    png_settings = QgsLayoutExporter.ImageExportSettings()
    png_settings.dpi = dpi
    for path, export, settings in ((Path(pdf), exporter.exportToPdf, pdf_settings),
                                   (Path(png), exporter.exportToImage, png_settings)):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")  # the exporter goes by suffix
        try:
            if export(str(partial), settings) != QgsLayoutExporter.ExportResult.Success:
                raise OSError(f"Cannot export the map to {path}: {exporter.errorMessage() or 'QGIS gave no reason'}")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return MapFiles(Path(pdf), Path(png))
