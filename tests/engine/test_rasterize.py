"""Rasterization checked pixel by pixel against hand-computed masks: priority,
line buffer, ignore, --complete, offset. The labels come from a hand-written OSM
file through `landcover labels`, the masks from `landcover dataset`."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import box, mapping

from landcover_plugin.contract.names import IGNORE
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.labels.read import read_labels
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset
from landcover_plugin.engine.stages.labels import LabelsParams, build_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from osm_xml import osm_file  # noqa: E402

CRS = "EPSG:32617"  # the labels' UTM zone too (x0 is its central meridian): no reprojection
X0, Y0 = 500000.0, 4000064.0  # top-left corner; 1 m pixels, 64 rows x 128 columns
LC = ["barren", "cultivated", "developed", "forested", "herbaceous", "shrub", "water"]


def ring(col0: int, row0: int, col1: int, row1: int) -> list[tuple[float, float]]:
    """The closed outline of pixels [row0:row1, col0:col1]."""
    x0, x1, y0, y1 = X0 + col0, X0 + col1, Y0 - row1, Y0 - row0
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("raster")
    osm = osm_file(tmp / "scene.osm", crs=CRS, ways=[
        (ring(0, 0, 32, 32), {"landuse": "forest"}),
        (ring(16, 16, 24, 24), {"building": "yes"}),  # on the forest and the road: wins both
        # A residential road (5 m wide) along y = Y0 - 23.5: rows 21..25, columns 5..59 (flat ends).
        ([(X0 + 5, Y0 - 23.5), (X0 + 60, Y0 - 23.5)], {"highway": "residential"}),
        (ring(40, 48, 56, 64), {"natural": "water"}),
        (ring(80, 0, 100, 64), {"natural": "water"}),
        (ring(96, 10, 110, 20), {"landuse": "farmland"}),  # under the water (priority 30 < 60) but for 100..109
    ])
    labels = tmp / "labels.gpkg"
    build_labels(LabelsParams(aoi=None, preset="landcover", out=labels, osm_file=osm), Reporter(out=io.StringIO()))
    imagery = tmp / "image.tif"
    rng = np.random.default_rng(0)
    with rasterio.open(imagery, "w", driver="GTiff", width=128, height=64, count=3, dtype="uint8", crs=CRS,
                       transform=from_origin(X0, Y0, 1, 1)) as dst:
        dst.write(rng.integers(0, 255, (3, 64, 128), dtype=np.uint8))
    return labels, imagery


def expected(complete: bool = False) -> np.ndarray:
    """The hand-computed mask of the scene (64 x 128)."""
    idx = {n: i + complete for i, n in enumerate(LC)}
    e = np.full((64, 128), 0 if complete else IGNORE, np.uint8)
    e[0:32, 0:32] = idx["forested"]
    e[21:26, 5:60] = idx["developed"]  # road over forest
    e[16:24, 16:24] = idx["developed"]  # building over both
    e[48:64, 40:56] = idx["water"]
    e[10:20, 96:110] = idx["cultivated"]
    e[0:64, 80:100] = idx["water"]  # water over farmland
    return e


def mosaic(dataset: Path) -> np.ndarray:
    """The chips' masks put back together (IGNORE where no chip labels a pixel). Land cover
    is validated on whole polygons: a window can give a train and a val chip, each labelled
    with its own split's polygons only, so a pixel is labelled in one chip at most."""
    manifest = json.loads((dataset / "dataset.json").read_text())
    out = np.full((64, 128), IGNORE, np.uint8)
    for chip in manifest["chips"]:
        with rasterio.open(dataset / chip["mask"]) as src:
            col, row = ~from_origin(X0, Y0, 1, 1) * (src.bounds.left, src.bounds.top)
            window = np.s_[int(row):int(row) + 64, int(col):int(col) + 64]
            mask = src.read(1)
        labelled = mask != IGNORE
        assert not (labelled & (out[window] != IGNORE) & (out[window] != mask)).any(), "two labels for one pixel"
        out[window] = np.where(labelled, mask, out[window])
    return out


def build(scene, tmp: Path, **kw) -> tuple[Path, dict]:
    labels, imagery = scene
    params = DatasetParams(imagery=imagery, labels=labels, task="landcover", out=tmp / "ds", chip_size=64,
                           preset="landcover", **kw)
    build_dataset(params, Reporter(json_mode=True, out=io.StringIO()))
    return params.out, json.loads((params.out / "dataset.json").read_text())


def test_labels_buffer_and_priority(scene):
    labels, _ = scene
    with fiona.open(labels) as src:
        feats = {f["properties"]["osm_id"]: f for f in src}
    road = feats["w3"]
    assert road["properties"]["class"] == "developed" and road["properties"]["priority"] == 65
    from shapely.geometry import shape

    assert shape(road["geometry"]).bounds == pytest.approx((X0 + 5, Y0 - 26, X0 + 60, Y0 - 21), abs=0.01)  # OSM: 1e-7 degrees
    assert feats["w2"]["properties"]["priority"] == 70 and feats["w1"]["properties"]["priority"] == 40


def test_mask_pixels_priority_buffer_ignore(scene, tmp_path):
    dataset, manifest = build(scene, tmp_path)
    assert manifest["class_names"] == LC
    got = mosaic(dataset)
    np.testing.assert_array_equal(got, expected())


def test_complete_makes_uncovered_pixels_background(scene, tmp_path):
    dataset, manifest = build(scene, tmp_path, complete=True)
    assert manifest["class_names"] == ["background", *LC] and manifest["complete"] is True
    np.testing.assert_array_equal(mosaic(dataset), expected(complete=True))


def test_offset_moves_labels_onto_the_imagery(scene, tmp_path):
    dataset, manifest = build(scene, tmp_path, offset=(2.0, -3.0))  # 2 m east, 3 m south
    shifted = np.full((64, 128), IGNORE, np.uint8)
    shifted[3:, 2:] = expected()[:-3, :-2]
    np.testing.assert_array_equal(mosaic(dataset), shifted)
    assert manifest["offset_m"] == [2.0, -3.0]


def test_unknown_class_and_repaired_geometry(scene, tmp_path):
    _, imagery = scene
    bad = tmp_path / "bad.gpkg"
    schema = {"geometry": "Polygon", "properties": {"class": "str"}}
    bowtie = {"type": "Polygon", "coordinates": [[(X0, Y0), (X0 + 20, Y0 - 20), (X0 + 20, Y0), (X0, Y0 - 20), (X0, Y0)]]}
    with fiona.open(bad, "w", driver="GPKG", schema=schema, crs=CRS) as dst:
        dst.write({"geometry": bowtie, "properties": {"class": "forested"}})
        dst.write({"geometry": mapping(box(X0 + 70, Y0 - 60, X0 + 120, Y0 - 4)), "properties": {"class": "lava"}})
    labels = read_labels(bad, imagery, "landcover")
    assert labels.repaired == 1 and labels.geometries[0].is_valid
    assert labels.geometries[0].area == pytest.approx(200.0)  # two triangles of the bow-tie
    with pytest.raises(EngineError) as err:
        build_dataset(DatasetParams(imagery=imagery, labels=bad, task="landcover", out=tmp_path / "ds",
                                    chip_size=64, preset="landcover"), Reporter(out=io.StringIO()))
    assert err.value.code == "UNKNOWN_CLASS" and "'lava'" in err.value.message
    assert not list(tmp_path.glob(".ds*")) and not (tmp_path / "ds").exists()
