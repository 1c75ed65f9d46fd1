"""QGIS styles stored inside the GeoPackage, so QGIS applies them when a layer is opened.

QGIS reads a layer's default style from the GeoPackage's `layer_styles` table
(the table its own "Save style > In database" writes). We write the QML by hand
(QGIS 3.22 format) with sqlite3: the engine never imports qgis.
"""
from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

from ..learn.model_package import ModelInfo
from .health import INDEX_NAMES

QGIS_VERSION = "3.22.0"
GEOMETRY_TYPES = {"point": 0, "line": 1, "polygon": 2}
# Used when a model carries no colours (e.g. a Deepness model).
FALLBACK_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]

LAYER_STYLES_SQL = """
CREATE TABLE IF NOT EXISTS layer_styles (
  id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
  f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256),
  f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT,
  useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
  update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))
"""


def rgba(color: str, alpha: int = 255, factor: float = 1.0) -> str:
    """'#rrggbb' -> QGIS's 'r,g,b,a'; factor < 1 darkens (for outlines)."""
    r, g, b = (min(255, round(int(color.lstrip("#")[i:i + 2], 16) * factor)) for i in (0, 2, 4))
    return f"{r},{g},{b},{alpha}"


def _symbol(name: str, kind: str, layer_class: str, props: dict[str, str]) -> ET.Element:
    """A one-layer symbol; properties written both as <Option> (3.22) and <prop> (older readers)."""
    symbol = ET.Element("symbol", {"type": kind, "name": name, "alpha": "1", "clip_to_extent": "1",
                                   "force_rhr": "0"})
    layer = ET.SubElement(symbol, "layer", {"class": layer_class, "enabled": "1", "locked": "0", "pass": "0"})
    options = ET.SubElement(layer, "Option", {"type": "Map"})
    for key, value in props.items():
        ET.SubElement(options, "Option", {"name": key, "value": value, "type": "QString"})
    for key, value in props.items():
        ET.SubElement(layer, "prop", {"k": key, "v": value})
    return symbol


def _fill(name: str, fill: str, outline: str, width: str = "0.26") -> ET.Element:
    return _symbol(name, "fill", "SimpleFill", {
        "color": fill, "style": "solid", "outline_color": outline, "outline_style": "solid",
        "outline_width": width, "outline_width_unit": "MM", "joinstyle": "bevel"})


def _qml(renderer: ET.Element, geometry: str) -> str:
    root = ET.Element("qgis", {"version": QGIS_VERSION, "styleCategories": "Symbology|Labeling",
                               "labelsEnabled": "0"})
    root.append(renderer)
    ET.SubElement(root, "blendMode").text = "0"
    ET.SubElement(root, "featureBlendMode").text = "0"
    ET.SubElement(root, "layerGeometryType").text = str(GEOMETRY_TYPES[geometry])
    ET.indent(root, " ")
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode")


def _single(symbol: ET.Element, geometry: str) -> str:
    renderer = ET.Element("renderer-v2", {"type": "singleSymbol", "symbollevels": "0", "enableorderby": "0",
                                          "forceraster": "0", "referencescale": "-1"})
    ET.SubElement(renderer, "symbols").append(symbol)
    return _qml(renderer, geometry)


def landcover_qml(class_names: list[str], class_colors: list[str], field: str = "class") -> str:
    """Polygons categorized on `field`, one category per class, in the model's colours."""
    colors = class_colors_for(class_names, class_colors)
    renderer = ET.Element("renderer-v2", {"type": "categorizedSymbol", "attr": field, "symbollevels": "0",
                                          "enableorderby": "0", "forceraster": "0", "referencescale": "-1"})
    categories = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    for i, name in enumerate(class_names):
        color = colors[i % len(colors)]
        ET.SubElement(categories, "category", {"value": name, "symbol": str(i), "label": name, "render": "true"})
        symbols.append(_fill(str(i), rgba(color), rgba(color, factor=0.7), width="0.1"))
    return _qml(renderer, "polygon")


def _marker(name: str, shape: str, fill: str, outline: str, size: str, width: str = "0.2") -> ET.Element:
    return _symbol(name, "marker", "SimpleMarker", {
        "name": shape, "color": fill, "outline_color": outline, "outline_style": "solid",
        "outline_width": width, "outline_width_unit": "MM", "size": size, "size_unit": "MM",
        "angle": "0", "scale_method": "diameter"})


# NLCD 2019 legend colours for the land-cover classes our presets (and Deepness models) name.
NLCD_COLORS = {
    "water": "#466b9f", "open water": "#466b9f", "ice": "#d1def8", "developed": "#eb0000",
    "built": "#eb0000", "urban": "#eb0000", "buildings": "#ab0000", "building": "#ab0000", "road": "#ab0000",
    "barren": "#b3ac9f", "bare": "#b3ac9f", "forest": "#1c5f2c", "forested": "#1c5f2c", "trees": "#1c5f2c",
    "tree": "#1c5f2c", "deciduous": "#68ab5f", "evergreen": "#1c5f2c", "mixed forest": "#b5c58f",
    "shrub": "#ccb879", "shrubland": "#ccb879", "scrub": "#ccb879", "herbaceous": "#dfdfc2",
    "grassland": "#dfdfc2", "grass": "#dfdfc2", "pasture": "#dcd939", "cultivated": "#ab6c28",
    "cropland": "#ab6c28", "crops": "#ab6c28", "agriculture": "#ab6c28", "wetland": "#6c9fb8",
    "wetlands": "#6c9fb8",
}


def class_colors_for(class_names: list[str], model_colors: list[str]) -> list[str]:
    """The model's colours when it has them; else NLCD colours by class name, then a fallback palette."""
    if len(model_colors) >= len(class_names):
        return model_colors
    return [NLCD_COLORS.get(n.strip().lower(), FALLBACK_COLORS[i % len(FALLBACK_COLORS)])
            for i, n in enumerate(class_names)]


# One legend for crowns and tree points: the status, named for what measured it.
STATUS_COLORS = {"healthy": "#1a9641", "stressed": "#fdae61", "dead": "#d7191c"}


def status_labels(health_field: str = "vari") -> dict[str, str]:
    """The legend's label of each status: what it measures (see vector/health.py)."""
    index = INDEX_NAMES.get(health_field, health_field)
    return {"healthy": "healthy", "stressed": f"stressed: {index} low for the stand",
            "dead": f"dead: {index} very low, or the model's dead class"}


def _status_renderer(symbols_of: list[tuple[str, ET.Element]], health_field: str) -> ET.Element:
    renderer = ET.Element("renderer-v2", {"type": "categorizedSymbol", "attr": "status", "symbollevels": "0",
                                          "enableorderby": "0", "forceraster": "0", "referencescale": "-1"})
    categories = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    labels = status_labels(health_field)
    for i, (value, symbol) in enumerate(symbols_of):
        ET.SubElement(categories, "category", {"value": value, "symbol": str(i), "label": labels[value],
                                               "render": "true"})
        symbols.append(symbol)
    return renderer


def crowns_qml(health_field: str = "vari") -> str:
    """Crowns by status, in the colours of the tree points' legend."""
    return _qml(_status_renderer([(k, _fill(str(i), rgba(c, 150), rgba(c, factor=0.6), width="0.4"))
                                  for i, (k, c) in enumerate(STATUS_COLORS.items())], health_field), "polygon")


def trees_qml(health_field: str = "vari") -> str:
    """Dots at tree centres by status, the crowns' colours; a dead tree is a bold cross."""
    looks = [(k, _marker(str(i), "cross2" if k == "dead" else "circle", rgba(c),
                         "255,255,255,255" if k == "healthy" else "0,0,0,255",
                         {"healthy": "1.6", "stressed": "2.0", "dead": "3.0"}[k], width="0.8" if k == "dead" else "0.2"))
             for i, (k, c) in enumerate(STATUS_COLORS.items())]
    return _qml(_status_renderer(looks, health_field), "point")


def missing_qml() -> str:
    """Missing trees: hollow magenta rings, visible on any imagery."""
    return _single(_marker("0", "circle", "255,0,255,0", "255,0,255,255", "3.0", width="0.7"), "point")


def blocks_qml() -> str:
    """Orchard blocks: outline only, dashed."""
    symbol = _symbol("0", "fill", "SimpleFill", {
        "color": "0,0,0,0", "style": "no", "outline_color": "255,255,0,255", "outline_style": "dash",
        "outline_width": "0.6", "outline_width_unit": "MM", "joinstyle": "bevel"})
    return _single(symbol, "polygon")


def styles_for(info: ModelInfo, layers: list[str] | None = None, health_field: str = "vari") -> dict[str, str]:
    """Layer name -> QML for the layers predict writes for this model's task (only those in
    `layers` when given). `health_field`: what the trees' status measured ("vari" or "ndvi")."""
    if info.task == "trees":
        styles = {"crowns": crowns_qml(health_field), "trees": trees_qml(health_field),
                  "missing_trees": missing_qml(), "orchard_blocks": blocks_qml()}
    else:
        styles = {"landcover": landcover_qml(info.class_names, info.class_colors)}
        if info.task == "buildings":
            styles["buildings"] = _single(_fill("0", "171,0,0,160", "90,0,0,255", width="0.3"), "polygon")
        if info.task == "classification":
            styles["chip_classes"] = landcover_qml(info.class_names, info.class_colors)
    return {k: v for k, v in styles.items() if layers is None or k in layers}


def write_styles(gpkg: Path, styles: dict[str, str], style_name: str = "landcover") -> None:
    """Store each layer's QML as its default style in `gpkg`'s layer_styles table."""
    with sqlite3.connect(gpkg) as db:
        db.execute(LAYER_STYLES_SQL)
        # Registered like any attribute table, so the GeoPackage stays valid.
        db.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier) "
                   "VALUES ('layer_styles', 'attributes', 'layer_styles')")
        geometry_columns = dict(db.execute("SELECT table_name, column_name FROM gpkg_geometry_columns"))
        for layer, qml in styles.items():
            db.execute("DELETE FROM layer_styles WHERE f_table_name = ?", (layer,))
            # QGIS looks styles up with f_table_schema = '' and the layer's geometry column.
            db.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
                       "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner) "
                       "VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '')",
                       (layer, geometry_columns.get(layer), style_name, qml, f"{layer} style by landcover"))
    db.close()
