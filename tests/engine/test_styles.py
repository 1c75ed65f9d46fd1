"""styles: QML in the GeoPackage's layer_styles table, checked by opening the layers in real QGIS."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rasterio.crs import CRS
from shapely.geometry import MultiPolygon, Point, box

from landcover_plugin.engine.learn.model_package import ModelInfo
from landcover_plugin.engine.vector.styles import landcover_qml, styles_for, write_styles
from landcover_plugin.engine.vector.vectorize import Layer, write_gpkg

QGIS_PYTHON = "/usr/bin/python3"  # Debian's, with QGIS 3.22 (the engine's .venv has no qgis)
NAMES = ["barren", "forest", "water"]
COLORS = ["#d8c9a7", "#1b7837", "#2166ac"]

# Opens each layer as QGIS does (default style from the GeoPackage) and describes its renderer.
QGIS_SCRIPT = r"""
import json, sys
from qgis.core import QgsApplication, QgsMarkerSymbol, QgsVectorLayer
app = QgsApplication([], False)
app.initQgis()
report = {}
for name in sys.argv[2:]:
    layer = QgsVectorLayer(f"{sys.argv[1]}|layername={name}", name, "ogr")
    renderer = layer.renderer()
    info = {"valid": layer.isValid(), "renderer": renderer.type() if renderer else None,
            "labels": layer.labelsEnabled()}
    if info["renderer"] == "categorizedSymbol":
        info["attr"] = renderer.classAttribute()
        info["categories"] = [[c.value(), c.symbol().color().name()] for c in renderer.categories()]
    elif info["renderer"] == "graduatedSymbol":
        info["attr"] = renderer.classAttribute()
        info["ranges"] = [[r.lowerValue(), r.upperValue(), r.symbol().color().name()] for r in renderer.ranges()]
        # which range the one feature (health NULL -> shown as healthy) falls in
        from qgis.core import QgsExpressionContextUtils, QgsRenderContext
        ctx = QgsRenderContext()
        ctx.expressionContext().appendScopes(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
        renderer.startRender(ctx, layer.fields())
        feature = next(layer.getFeatures())
        ctx.expressionContext().setFeature(feature)
        symbol = renderer.symbolForFeature(feature, ctx)
        info["feature_color"] = symbol.color().name() if symbol else None
        renderer.stopRender(ctx)
    elif renderer:
        info["color"] = renderer.symbol().color().name()
        info["alpha"] = renderer.symbol().color().alpha()
        info["marker"] = isinstance(renderer.symbol(), QgsMarkerSymbol)
    report[name] = info
    del layer, renderer  # before exitQgis, or QGIS crashes on exit
print("REPORT " + json.dumps(report), flush=True)
app.exitQgis()
"""


def landcover_info() -> ModelInfo:
    return ModelInfo(task="landcover", class_names=NAMES, class_colors=COLORS, band_count=3, resolution_m=1.0,
                     tile_size=64, tile_overlap=8)


def test_landcover_qml_has_a_category_per_class():
    root = ET.fromstring(landcover_qml(NAMES, COLORS).split("\n", 1)[1])
    assert root.tag == "qgis" and root.get("version").startswith("3.22")
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class"
    assert [c.get("value") for c in renderer.iter("category")] == NAMES
    colors = [o.get("value") for o in renderer.iter("Option") if o.get("name") == "color"]
    assert colors == ["216,201,167,255", "27,120,55,255", "33,102,172,255"]


def test_landcover_qml_without_model_colours_and_odd_names():
    qml = landcover_qml(["a & b", "<c>"], [])  # a Deepness model: no colours
    root = ET.fromstring(qml.split("\n", 1)[1])
    assert [c.get("value") for c in root.iter("category")] == ["a & b", "<c>"]
    assert len({o.get("value") for o in root.iter("Option") if o.get("name") == "color"}) == 2


def test_write_styles_registers_the_table(tmp_path):
    gpkg = tmp_path / "x.gpkg"
    write_gpkg(gpkg, [Layer("crowns", "MultiPolygon", {"tree_id": "int"})], CRS.from_epsg(32617))
    styles = styles_for(ModelInfo(task="trees", class_names=["crown"], class_colors=[], band_count=3,
                                  resolution_m=0.1, tile_size=256, tile_overlap=32))
    write_styles(gpkg, styles)
    write_styles(gpkg, styles)  # again: replaces, does not duplicate
    with sqlite3.connect(gpkg) as db:
        rows = db.execute("SELECT f_table_schema, f_table_name, f_geometry_column, useAsDefault "
                          "FROM layer_styles ORDER BY f_table_name").fetchall()
        contents = dict(db.execute("SELECT table_name, data_type FROM gpkg_contents"))
    assert rows == [("", "crowns", "geom", 1), ("", "missing_trees", None, 1), ("", "orchard_blocks", None, 1),
                    ("", "trees", None, 1)]
    assert contents == {"crowns": "features", "layer_styles": "attributes"}


@pytest.fixture()
def styled_gpkg(tmp_path) -> Path:
    """A GeoPackage with every layer predict writes, and their styles."""
    gpkg = tmp_path / "result.gpkg"
    crs = CRS.from_epsg(32617)
    square = MultiPolygon([box(400000, 3300000, 400010, 3300010)])
    write_gpkg(gpkg, [
        Layer("landcover", "MultiPolygon", {"class": "str", "area_m2": "float"},
              [(square, {"class": "forest", "area_m2": 100.0})]),
        Layer("class_stats", None, {"class": "str", "hectares": "float"}, [(None, {"class": "forest", "hectares": 0.01})]),
        Layer("crowns", "MultiPolygon", {"tree_id": "int", "vari": "float", "status": "str"},
              [(square, {"tree_id": 1, "vari": None, "status": "dead"})]),
        Layer("trees", "Point", {"tree_id": "int", "status": "str"},
              [(Point(400005, 3300005), {"tree_id": 1, "status": "dead"})]),
        Layer("missing_trees", "Point", {"block_id": "int"}, [(Point(400008, 3300005), {"block_id": 1})]),
        Layer("orchard_blocks", "Polygon", {"block_id": "int"}, [(box(400000, 3300000, 400010, 3300010),
                                                                  {"block_id": 1})]),
    ], crs)
    trees = ModelInfo(task="trees", class_names=["crown"], class_colors=[], band_count=3, resolution_m=0.1,
                      tile_size=256, tile_overlap=32)
    write_styles(gpkg, styles_for(landcover_info()) | styles_for(trees))
    return gpkg


def test_styles_load_in_real_qgis(styled_gpkg, tmp_path):
    if not Path(QGIS_PYTHON).exists():
        pytest.fail(f"{QGIS_PYTHON} is missing: run `make install` (it installs QGIS)")
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = os.environ | {"QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(runtime),
                        "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "profile")}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run([QGIS_PYTHON, "-c", QGIS_SCRIPT, str(styled_gpkg), "landcover", "class_stats",
                           "crowns", "trees", "missing_trees", "orchard_blocks"], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[0][len("REPORT "):])
    assert all(layer["valid"] for layer in report.values())
    landcover = report["landcover"]
    assert landcover["renderer"] == "categorizedSymbol" and landcover["attr"] == "class"
    assert landcover["categories"] == [[n, c] for n, c in zip(NAMES, COLORS)]
    crowns, trees = report["crowns"], report["trees"]  # one legend: the status, in the same colours
    assert crowns["renderer"] == trees["renderer"] == "categorizedSymbol" and crowns["attr"] == trees["attr"] == "status"
    assert crowns["categories"] == [["healthy", "#1a9641"], ["stressed", "#fdae61"], ["dead", "#d7191c"]]
    assert [c[0] for c in trees["categories"]] == ["healthy", "stressed", "dead"]
    assert crowns["labels"] is False
    assert report["missing_trees"]["renderer"] == "singleSymbol" and report["missing_trees"]["marker"]
    assert report["orchard_blocks"]["renderer"] == "singleSymbol"
    assert report["class_stats"]["renderer"] is None  # a plain table


def test_landcover_without_model_colours_gets_nlcd_colours():
    root = ET.fromstring(landcover_qml(["Water", "forest", "unknown"], []).split("\n", 1)[1])
    colors = [o.get("value") for o in root.iter("Option") if o.get("name") == "color"]
    assert colors[:2] == ["70,107,159,255", "28,95,44,255"]  # NLCD open water, evergreen forest
