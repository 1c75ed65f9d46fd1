"""The results as a report-ready map: a print layout exported to PDF and PNG (real QGIS)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from qgis.core import (QgsCategorizedSymbolRenderer, QgsFillSymbol, QgsLayoutItemLabel, QgsLayoutItemLegend,
                       QgsLayoutItemMap, QgsLayoutItemPicture, QgsLayoutItemScaleBar, QgsProject, QgsRasterLayer,
                       QgsRendererCategory, QgsVectorLayer)
from qgis.PyQt.QtGui import QColor, QImage

from landcover_plugin.contract.names import OSM_ATTRIBUTION
from landcover_plugin.core.layers import load_result_layers
from landcover_plugin.core.print_layout import PAGE_H, PAGE_W, build_layout, export_map
from test_layers import add_gpkg_layer

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FOREST = (230, 0, 230)  # a colour no imagery has, to find the class in the PNG


def _result_gpkg(folder: Path, imagery: QgsRasterLayer) -> Path:
    """A land-cover result over the imagery: two class polygons (styled by class), the
    class_stats table and two tree points, as the engine writes them."""
    e = imagery.extent()
    w, h = e.width(), e.height()
    x0, y0 = e.xMinimum(), e.yMinimum()
    gpkg = folder / "result.gpkg"
    layers = [
        ("landcover", f"Polygon?crs={imagery.crs().authid()}&field=class:string&field=area_m2:double",
         [(["forest", 150.123456], f"POLYGON(({x0 + 2} {y0 + 2},{x0 + w / 2} {y0 + 2},{x0 + w / 2} {y0 + h - 2},"
                                    f"{x0 + 2} {y0 + h - 2},{x0 + 2} {y0 + 2}))"),
          (["water", 80.5], f"POLYGON(({x0 + w / 2} {y0 + 2},{x0 + w - 2} {y0 + 2},{x0 + w - 2} {y0 + h / 3},"
                            f"{x0 + w / 2} {y0 + h / 3},{x0 + w / 2} {y0 + 2}))")]),
        ("class_stats", "None?field=class:string&field=hectares:double&field=share_pct:double",
         [(["forest", 0.0150123456, 65.1234], None), (["water", 0.00805, 34.8766], None)]),
        ("trees", f"Point?crs={imagery.crs().authid()}&field=confidence:double",
         [([0.9], f"POINT({x0 + w * 0.7} {y0 + h * 0.7})"), ([0.8], f"POINT({x0 + w * 0.8} {y0 + h * 0.8})")]),
    ]
    for name, uri, rows in layers:
        add_gpkg_layer(gpkg, name, uri, rows)
    styled = QgsVectorLayer(f"{gpkg}|layername=landcover", "landcover", "ogr")
    categories = [QgsRendererCategory("forest", QgsFillSymbol.createSimple(
                      {"color": ",".join(map(str, FOREST)), "outline_style": "no"}), "forest"),
                  QgsRendererCategory("water", QgsFillSymbol.createSimple({"color": "30,90,200"}), "water")]
    styled.setRenderer(QgsCategorizedSymbolRenderer("class", categories))
    assert styled.saveStyleToDatabase("default", "", True, "") == ""
    return gpkg


def _share_of(image: QImage, colour: tuple[int, int, int], x0: int, x1: int, y0: int, y1: int) -> float:
    """Share of the pixels in [x0, x1) × [y0, y1), sampled every 4 px, that have `colour` (± 8)."""
    hits = total = 0
    for y in range(y0, y1, 4):
        for x in range(x0, x1, 4):
            c = QColor(image.pixel(x, y))
            total += 1
            hits += all(abs(a - b) <= 8 for a, b in zip((c.red(), c.green(), c.blue()), colour))
    return hits / total


@pytest.fixture
def mapped(qgis_new_project, osbs_tif, tmp_path):
    project = QgsProject.instance()
    imagery = QgsRasterLayer(str(osbs_tif), "NEON OSBS_029")
    assert imagery.isValid()
    project.addMapLayer(imagery)
    layers = load_result_layers(_result_gpkg(tmp_path, imagery), "Land cover — 0.02 ha", project,
                                attribution=OSM_ATTRIBUTION)
    return project, imagery, layers


def test_the_map_exports_to_pdf_and_png_with_legend_scale_north_and_credits(mapped, tmp_path):
    project, imagery, layers = mapped
    title = "Land cover — 0.02 ha, landcover-base, 2026-12-06 14:05"
    layout = build_layout(project, layers, title, backdrop=[imagery])
    files = export_map(layout, tmp_path / "maps" / "landcover.pdf", tmp_path / "maps" / "landcover.png", dpi=100)

    assert files.pdf.read_bytes()[:5] == b"%PDF-" and files.pdf.stat().st_size > 10_000
    image = QImage(str(files.png))
    assert (image.width(), image.height()) == (int(PAGE_W / 25.4 * 100), int(PAGE_H / 25.4 * 100))  # A4 at 100 dpi
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["landcover.pdf", "landcover.png"]  # no partials
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(files.png, ARTIFACTS / "print_layout.png")  # for people to look at

    items = layout.items()
    legend, = [i for i in items if isinstance(i, QgsLayoutItemLegend)]
    assert [n.layer().name() for n in legend.model().rootGroup().findLayers()] == ["trees", "landcover"]
    map_item, = [i for i in items if isinstance(i, QgsLayoutItemMap)]
    assert [layer.name() for layer in map_item.layers()] == ["trees", "landcover", "NEON OSBS_029"]
    assert map_item.extent().contains(imagery.extent().buffered(-1))  # the results are all on the page
    scale, = [i for i in items if isinstance(i, QgsLayoutItemScaleBar)]
    assert scale.linkedMap() is map_item and scale.unitLabel() == "m"
    arrow, = [i for i in items if isinstance(i, QgsLayoutItemPicture)]
    assert arrow.linkedMap() is map_item and Path(arrow.evaluatedPath()).is_file()
    texts = [i.text() for i in items if isinstance(i, QgsLayoutItemLabel)]
    assert title in texts
    assert any(OSM_ATTRIBUTION in t and "Imagery: NEON OSBS_029" in t for t in texts)

    # The forest polygon is drawn in the map, and its legend patch beside the map.
    mm = image.width() / PAGE_W
    frame = map_item.sizeWithUnits()
    map_x1 = int((map_item.pos().x() + frame.width()) * mm)
    map_y0, map_y1 = int(map_item.pos().y() * mm), int((map_item.pos().y() + frame.height()) * mm)
    assert _share_of(image, FOREST, int(map_item.pos().x() * mm), map_x1, map_y0, map_y1) > 0.1
    assert 0 < _share_of(image, FOREST, map_x1 + 5, image.width(), map_y0, map_y1) < 0.05
    assert _share_of(image, (255, 255, 255), 0, image.width(), 0, image.height()) < 0.7  # not a blank page


def test_an_export_that_fails_leaves_the_old_map_and_no_partial_file(mapped, tmp_path):
    project, imagery, layers = mapped
    layout = build_layout(project, layers, "Trees", backdrop=[imagery])
    old = tmp_path / "map.png"
    old.write_bytes(b"the previous map")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the PDF's folder should be")
    with pytest.raises(OSError):
        export_map(layout, blocked / "map.pdf", old)
    assert old.read_bytes() == b"the previous map"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png", "not-a-folder", "result.gpkg"]


def test_a_result_without_geometries_is_refused(mapped):
    project, imagery, layers = mapped
    with pytest.raises(ValueError, match="No result layer with geometries"):
        build_layout(project, [layer for layer in layers if layer.name() == "class_stats"], "Stats")
