"""Tree positions (points) as labels: a trees mask with the centre heatmap only and the
crown channel ignored, checked pixel by pixel on a hand-computed case; the same from a
CSV of x,y; and `landcover dataset` end to end on the real OSBS orthophoto."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform as warp
from shapely.geometry import Point, mapping

from landcover_plugin.contract.names import IGNORE
from landcover_plugin.contract.protocol import parse_event
from landcover_plugin.engine.cli import main
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.labels.read import read_labels
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset

CRS = "EPSG:32617"
X0, Y0 = 500000.0, 4000064.0  # top-left corner; 1 m pixels, 64 rows x 128 columns: two 64-px chips
# Tree positions at pixel centres (row, col); the last one sits by the chips' border at column 64.
TREES = [(20, 10), (40, 100), (5, 63)]
# A 3 m crown radius at 1 m pixels: sigma = 3 / 1 / 3 = 1 pixel, so a pixel (dr, dc) from a
# centre holds round(255 * exp(-(dr² + dc²) / 2)): 255 at the centre, 155 beside it, 94 on
# the diagonal, 35 two pixels away, 21 at (1, 2), 5 at (2, 2), 3 at (0, 3), 2 at (1, 3), 0 further.
STAMP = {0: 255, 1: 155, 2: 94, 4: 35, 5: 21, 8: 5, 9: 3, 10: 2}  # by dr² + dc²


def expected_heat() -> np.ndarray:
    heat = np.zeros((64, 128), np.uint8)
    for row, col in TREES:
        for dr in range(-3, 4):
            for dc in range(-3, 4):
                value = STAMP.get(dr * dr + dc * dc, 0)
                if 0 <= row + dr < 64 and 0 <= col + dc < 128:
                    heat[row + dr, col + dc] = max(heat[row + dr, col + dc], value)
    return heat


def test_stamp_is_the_gaussian():
    for d2, value in STAMP.items():
        assert value == round(255 * math.exp(-d2 / 2))
    assert round(255 * math.exp(-13 / 2)) == 0  # (2, 3) and beyond: nothing


@pytest.fixture(scope="module")
def imagery(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("points") / "image.tif"
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", width=128, height=64, count=3, dtype="uint8", crs=CRS,
                       transform=from_origin(X0, Y0, 1, 1)) as dst:
        dst.write(rng.integers(0, 255, (3, 64, 128), dtype=np.uint8))
    return path


def centres_utm() -> list[tuple[float, float]]:
    return [(X0 + col + 0.5, Y0 - row - 0.5) for row, col in TREES]


def points_gpkg(path: Path) -> Path:
    """The tree positions in WGS84 (not the imagery's CRS), with a MultiPoint among them."""
    xs, ys = warp(CRS, "EPSG:4326", *zip(*centres_utm()))
    schema = {"geometry": "Unknown", "properties": {"name": "str"}}
    with fiona.open(path, "w", driver="GPKG", crs="EPSG:4326", schema=schema) as dst:
        dst.write({"geometry": mapping(Point(xs[0], ys[0])), "properties": {"name": "a"}})
        dst.write({"geometry": {"type": "MultiPoint", "coordinates": list(zip(xs[1:], ys[1:]))},
                   "properties": {"name": "b"}})
    return path


def mosaic(dataset: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    manifest = json.loads((dataset / "dataset.json").read_text())
    crown, heat = np.full((64, 128), 7, np.uint8), np.full((64, 128), 7, np.uint8)
    for chip in manifest["chips"]:
        with rasterio.open(dataset / chip["mask"]) as src:
            col, row = (int(v) for v in ~from_origin(X0, Y0, 1, 1) * (src.bounds.left, src.bounds.top))
            crown[row:row + 64, col:col + 64], heat[row:row + 64, col:col + 64] = src.read()
    return crown, heat, manifest


@pytest.mark.parametrize("kind", ["gpkg", "csv"])
def test_points_give_the_hand_computed_heatmap_and_an_ignored_crown(imagery, tmp_path, kind):
    if kind == "gpkg":
        labels = points_gpkg(tmp_path / "trees.gpkg")
    else:
        labels = tmp_path / "trees.csv"
        labels.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in centres_utm()))
    params = DatasetParams(imagery=imagery, labels=labels, task="trees", out=tmp_path / "ds", chip_size=64,
                           crown_radius_m=3.0)
    out = io.StringIO()
    build_dataset(params, Reporter(json_mode=True, out=out))
    crown, heat, manifest = mosaic(params.out)
    assert len(manifest["chips"]) == 2 and manifest["centres_only"] is True
    assert (crown == IGNORE).all()  # crowns unknown: not background
    np.testing.assert_array_equal(heat, expected_heat())
    assert heat[5, 64] == 155 and heat[5, 66] == 3  # the border tree reaches into the next chip
    assert all(c["labelled"] == 1.0 for c in manifest["chips"])
    assert "3 tree positions (points)" in out.getvalue()


def test_lon_lat_csv_and_offset(imagery, tmp_path):
    lons, lats = warp(CRS, "EPSG:4326", *zip(*[(x - 2, y + 1) for x, y in centres_utm()]))
    labels = tmp_path / "gps.csv"
    labels.write_text("id,lon,lat\n" + "".join(f"{i},{x!r},{y!r}\n" for i, (x, y) in enumerate(zip(lons, lats))))
    params = DatasetParams(imagery=imagery, labels=labels, task="trees", out=tmp_path / "ds", chip_size=64,
                           crown_radius_m=3.0, offset=(2.0, -1.0))  # the GPS was 2 m west, 1 m north
    build_dataset(params, Reporter(out=io.StringIO()))
    np.testing.assert_array_equal(mosaic(params.out)[1], expected_heat())


def test_points_bad_input(imagery, tmp_path):
    gpkg = points_gpkg(tmp_path / "trees.gpkg")
    with pytest.raises(EngineError) as err:
        read_labels(gpkg, imagery, "landcover", class_field="name")
    assert err.value.code == "LABELS_EMPTY" and "--task trees" in err.value.hint
    csv = tmp_path / "trees.csv"
    csv.write_text("x,y\n500010.5,4000043.5\n")
    with pytest.raises(EngineError) as err:
        read_labels(csv, imagery, "landcover")
    assert err.value.code == "POINT_LABELS_NEED_TREES"
    csv.write_text("x,y\n500010.5,north\n")
    with pytest.raises(EngineError) as err:
        read_labels(csv, imagery, "trees")
    assert err.value.code == "BAD_LABELS" and "line 2" in err.value.message
    csv.write_text("x,y\n1.5,2.5\n")
    with pytest.raises(EngineError) as err:
        read_labels(csv, imagery, "trees")
    assert err.value.code == "LABELS_OUTSIDE_IMAGERY"
    with pytest.raises(EngineError) as err:
        build_dataset(DatasetParams(imagery=imagery, labels=gpkg, task="trees", out=tmp_path / "ds",
                                    crown_radius_m=0), Reporter(out=io.StringIO()))
    assert err.value.code == "BAD_CROWN_RADIUS"


def test_dataset_command_from_tree_positions(osbs_tif, osbs_csv, tmp_path, capsys):
    """`landcover dataset --task trees --labels points.gpkg` on the real orthophoto: tree
    positions (the centres of the DeepForest boxes) in WGS84."""
    crowns = read_labels(osbs_csv, osbs_tif, "trees")
    centres = [g.centroid for g in crowns.geometries]
    with rasterio.open(osbs_tif) as src:
        crs = src.crs
    lons, lats = warp(crs, "EPSG:4326", [p.x for p in centres], [p.y for p in centres])
    labels = tmp_path / "positions.gpkg"
    with fiona.open(labels, "w", driver="GPKG", crs="EPSG:4326", schema={"geometry": "Point", "properties": {}}) as dst:
        dst.writerecords({"geometry": mapping(Point(x, y)), "properties": {}} for x, y in zip(lons, lats))
    code = main(["--json", "dataset", "--imagery", str(osbs_tif), "--labels", str(labels), "--task", "trees",
                 "--chip-size", "128", "--crown-radius", "2", "--out", str(tmp_path / "ds")])
    events = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and events[-1]["event"] == "result" and events[-1]["summary"]["chips"] >= 9
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["centres_only"] is True and manifest["class_names"] == ["crown"]
    peaks = 0
    for chip in manifest["chips"]:
        with rasterio.open(tmp_path / "ds" / chip["mask"]) as src:
            crown, heat = src.read()
            assert (crown == IGNORE).all()
            for p in centres:
                row, col = src.index(p.x, p.y)
                if 0 <= row < 128 and 0 <= col < 128:
                    assert heat[row, col] >= 200  # a peak at every tree
                    peaks += 1
    with rasterio.open(osbs_tif) as src:  # 400 px: the chips cover the first 384 (the rest is under half a chip)
        in_chips = sum(all(0 <= v < 384 for v in src.index(p.x, p.y)) for p in centres)
    assert peaks == in_chips > 40
    with fiona.open(tmp_path / "ds" / "catalog.gpkg") as cat:
        assert len(cat) == len(manifest["chips"])


def test_training_on_tree_positions_learns_the_heatmap_only_and_needs_a_base(imagery, tmp_path):
    from landcover_plugin.engine.learn.losses import check_labels, make_loss
    from landcover_plugin.engine.stages.train import TrainParams, train

    params = DatasetParams(imagery=imagery, labels=points_gpkg(tmp_path / "trees.gpkg"), task="trees",
                           out=tmp_path / "ds", chip_size=64, crown_radius_m=3.0)
    build_dataset(params, Reporter(out=io.StringIO()))
    with pytest.raises(EngineError) as err:  # refused before TensorFlow loads
        train(TrainParams(dataset=params.out, out=tmp_path / "model"), Reporter(out=io.StringIO()))
    assert err.value.code == "CENTRES_ONLY_NEEDS_BASE" and "--base" in err.value.hint

    import tensorflow as tf

    y = np.stack(mosaic(params.out)[:2], axis=-1)[None, :, :64].astype(np.float32)  # (1, 64, 64, 2)
    check_labels("trees", ["crown"], y, centres_only=True)  # tree positions, no crown: accepted
    with pytest.raises(EngineError):
        check_labels("trees", ["crown"], y)
    right = np.stack([np.full((64, 64), 0.5), y[0, ..., 1] / 255], axis=-1)[None].astype(np.float32)
    wrong = np.stack([np.full((64, 64), 0.5), np.zeros((64, 64))], axis=-1)[None].astype(np.float32)
    loss = make_loss("trees", centres_only=True)
    assert float(loss(tf.constant(y), tf.constant(right))) < 1e-6  # crowns count for nothing, the heatmap fits
    assert float(loss(tf.constant(y), tf.constant(wrong))) > 0.05  # a missed tree costs
    # Without the flag every pixel is IGNORE: nothing would be learnt.
    plain = make_loss("trees")
    assert float(plain(tf.constant(y), tf.constant(wrong))) == float(plain(tf.constant(y), tf.constant(right)))
