"""Training chips on crops of the real sample data: masks, split, manifest, catalog."""
from __future__ import annotations

import io
import json
from itertools import product
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from shapely.geometry import box, shape

from landcover_plugin.contract.names import IGNORE
from landcover_plugin.contract.protocol import parse_event
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.labels.read import read_labels
from landcover_plugin.engine.learn.dataset_folder import input_scale, split_cells
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset, class_color

CHIP = 64


def run(params: DatasetParams) -> tuple[dict, list[dict], dict]:
    out = io.StringIO()
    result = build_dataset(params, Reporter(json_mode=True, out=out))
    events = [parse_event(line) for line in out.getvalue().splitlines()]
    manifest = json.loads((params.out / "dataset.json").read_text())
    return manifest, events, result.summary


def sample(dataset: Path, manifest: dict, x: float, y: float) -> tuple[dict, np.ndarray] | None:
    """The chip holding map point (x, y) and the mask values there (one per band); of a land-cover
    window's train and val chips, the one labelled there."""
    found = None
    for chip in manifest["chips"]:
        if box(*chip["bounds"]).contains(box(x, y, x, y).buffer(1e-6)):
            with rasterio.open(dataset / chip["mask"]) as src:
                row, col = src.index(x, y)
                found = chip, src.read()[:, row, col]
            if found[1][0] != IGNORE:
                return found
    return found


@pytest.fixture(scope="module")
def landcover_ds(landsat_stack, landsat_polygons, tmp_path_factory, crop):
    tmp = tmp_path_factory.mktemp("lc")
    imagery = crop(landsat_stack, Window(64, 64, 256, 256), tmp / "crop.tif")
    params = DatasetParams(imagery=imagery, labels=landsat_polygons, task="landcover", out=tmp / "ds",
                           class_field="label", chip_size=CHIP)
    return params, *run(params)


@pytest.fixture(scope="module")
def trees_ds(osbs_tif, osbs_csv, tmp_path_factory):
    """The orthophoto padded by 64 px of mirrored imagery on each side: the CSV's
    annotations are complete only inside the original image."""
    tmp = tmp_path_factory.mktemp("trees")
    with rasterio.open(osbs_tif) as src:
        data = np.pad(src.read(), ((0, 0), (64, 64), (64, 64)), mode="reflect")
        t = src.transform
        profile = src.profile | {"width": data.shape[2], "height": data.shape[1],
                                 "transform": rasterio.Affine(t.a, 0, t.c - 64 * t.a, 0, t.e, t.f - 64 * t.e)}
    imagery = tmp / "padded.tif"
    with rasterio.open(imagery, "w", **profile) as dst:
        dst.write(data)
    params = DatasetParams(imagery=imagery, labels=osbs_csv, task="trees", out=tmp / "ds", chip_size=CHIP)
    return params, *run(params)


def test_landcover_manifest_and_files(landcover_ds):
    params, manifest, events, summary = landcover_ds
    names = manifest["class_names"]
    assert names == sorted(names) and "forest" in names and "water" in names
    assert manifest["class_colors"][names.index("forest")] == "#68ab5f"
    assert manifest["class_colors"][names.index("water")] == "#466b9f"
    assert manifest["band_count"] == 6 and manifest["chip_size"] == CHIP
    assert manifest["resolution_m"] == pytest.approx(28.5)
    assert manifest["input_scale"] == 255.0  # float Landsat values in 0..255
    assert manifest["nodata"] == -99999.0
    assert len(manifest["mean"]) == len(manifest["std"]) == 6
    assert all(0 < m < 1 for m in manifest["mean"]) and all(0 < s < 1 for s in manifest["std"])
    assert summary["chips"] == len(manifest["chips"]) == summary["train"] + summary["val"] + summary["buffer"]
    assert summary["train"] >= 1 and summary["val"] >= 1
    for chip in manifest["chips"]:
        with rasterio.open(params.out / chip["image"]) as img, rasterio.open(params.out / chip["mask"]) as msk:
            assert img.shape == msk.shape == (CHIP, CHIP) and img.count == 6 and msk.count == 1
            assert img.transform == msk.transform and tuple(img.bounds) == pytest.approx(chip["bounds"])
            assert msk.dtypes[0] == "uint8"
    # a progress event per chip of the 4x4 grid
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["done"] for e in progress] == list(range(1, 17)) and progress[-1]["total"] == 16
    assert not list(params.out.parent.glob(".*partial*"))


def test_landcover_mask_has_the_polygon_class_and_ignores_unlabelled(landcover_ds, landsat_polygons):
    params, manifest, _, _ = landcover_ds
    labels = read_labels(landsat_polygons, params.imagery, "landcover", "label")
    checked = 0
    for geom, name in zip(labels.geometries, labels.classes):
        point = geom.representative_point()  # inside the polygon, like a centroid but always in it
        if not geom.contains(point.buffer(28.5)):
            continue  # the pixel there is not wholly inside
        hit = sample(params.out, manifest, point.x, point.y)
        if hit:
            assert manifest["class_names"][hit[1][0]] == name
            checked += 1
    assert checked >= 3
    union = labels.geometries[0].union(labels.geometries[1]).buffer(0)
    for g in labels.geometries[2:]:
        union = union.union(g)
    unlabelled = 0
    for chip in manifest["chips"]:
        x, y = chip["bounds"][0] + 28.5 * 0.5, chip["bounds"][3] - 28.5 * 0.5  # top-left pixel centre
        if not union.intersects(box(x, y, x, y).buffer(60)):
            assert sample(params.out, manifest, x, y)[1][0] == IGNORE
            unlabelled += 1
    assert unlabelled >= 1


def test_block_split_keeps_train_and_val_apart(trees_ds):
    _, manifest, _, _ = trees_ds
    train = [box(*c["bounds"]) for c in manifest["chips"] if c["split"] == "train"]
    val = [box(*c["bounds"]) for c in manifest["chips"] if c["split"] == "val"]
    assert train and val
    # shapely: boxes sharing an edge or a corner intersect
    assert not any(t.intersects(v) for t in train for v in val)


def test_landcover_split_keeps_each_polygon_whole(landcover_ds, landsat_polygons):
    """A polygon is labelled in train chips or in val chips, never both, and every class
    with two or more separate polygons is in both splits (issue 16)."""
    params, manifest, _, _ = landcover_ds
    labels = read_labels(landsat_polygons, params.imagery, "landcover", "label")
    seen: dict[str, set] = {}
    for geom, name in zip(labels.geometries, labels.classes):
        x, y = geom.representative_point().coords[0]
        for chip in manifest["chips"]:
            if box(*chip["bounds"]).contains(box(x, y, x, y).buffer(1e-6)):
                with rasterio.open(params.out / chip["mask"]) as src:
                    if src.read(1)[src.index(x, y)] != IGNORE:
                        seen.setdefault(name, set()).add((id(geom), chip["split"]))
    splits_of = {}
    for name, pairs in seen.items():
        for g, split in pairs:
            splits_of.setdefault(g, set()).add(split)
    assert splits_of and all(len(s) == 1 for s in splits_of.values())
    assert "by polygon" in manifest["split"]


def test_catalog_has_one_polygon_per_chip(landcover_ds):
    params, manifest, _, _ = landcover_ds
    with fiona.open(params.out / "catalog.gpkg", layer="chips") as src:
        feats = list(src)
        crs = rasterio.crs.CRS.from_wkt(src.crs_wkt)
    with rasterio.open(params.imagery) as img:
        assert crs == img.crs
    assert [f["properties"]["id"] for f in feats] == [c["id"] for c in manifest["chips"]]
    assert [f["properties"]["split"] for f in feats] == [c["split"] for c in manifest["chips"]]
    for f, c in zip(feats, manifest["chips"]):
        assert shape(f["geometry"]).bounds == pytest.approx(c["bounds"])
        assert 0 < f["properties"]["labelled"] <= 1


def test_trees_masks_crown_and_heatmap(trees_ds, osbs_csv, osbs_tif):
    params, manifest, _, _ = trees_ds
    assert manifest["class_names"] == ["crown"] and manifest["class_colors"] == ["#2ca02c"]
    assert manifest["input_scale"] == 255.0 and manifest["band_count"] == 3
    labels = read_labels(osbs_csv, params.imagery, "trees", None)
    checked = 0
    for geom in labels.geometries:
        c = geom.centroid
        hit = sample(params.out, manifest, c.x, c.y)
        if hit is None:
            continue
        chip, (crown, heat) = hit
        assert crown == 1
        # the heatmap peaks within a pixel of the box centre
        with rasterio.open(params.out / chip["mask"]) as src:
            row, col = src.index(c.x, c.y)
            heatmap = src.read(2)
        near = heatmap[max(row - 3, 0):row + 4, max(col - 3, 0):col + 4]
        peak_row, peak_col = np.unravel_index(np.argmax(near), near.shape)
        assert abs(peak_row + max(row - 3, 0) - row) <= 1 and abs(peak_col + max(col - 3, 0) - col) <= 1
        assert heat >= 200
        checked += 1
    assert checked >= 20
    footprint = box(*rasterio.open(osbs_tif).bounds)
    outside = inside_background = 0
    for chip in manifest["chips"]:
        with rasterio.open(params.out / chip["image"]) as img:
            valid = (img.read_masks() > 0).all(axis=0)  # OSBS_029 has a few nodata (255) pixels
        with rasterio.open(params.out / chip["mask"]) as src:
            crown = src.read(1)
            assert (crown[~valid] == IGNORE).all()
            for row, col in product(range(0, CHIP, 8), range(0, CHIP, 8)):
                if not valid[row, col]:
                    continue
                x, y = src.xy(row, col)
                pixel = box(x - 0.05, y - 0.05, x + 0.05, y + 0.05)
                if not footprint.intersects(pixel.buffer(0.1)):
                    assert crown[row, col] == IGNORE  # not annotated there: unknown
                    outside += 1
                elif footprint.contains(pixel) and not any(g.intersects(pixel.buffer(0.2))
                                                           for g in labels.geometries):
                    assert crown[row, col] == 0  # annotated image, no crown: real background
                    inside_background += 1
    assert outside > 0 and inside_background > 0


def test_tiny_image_falls_back_and_logs(osbs_tif, osbs_csv, tmp_path, crop):
    imagery = crop(osbs_tif, Window(0, 0, 128, 64), tmp_path / "tiny.tif")
    params = DatasetParams(imagery=imagery, labels=osbs_csv, task="trees", out=tmp_path / "ds", chip_size=CHIP)
    manifest, events, summary = run(params)
    assert (summary["chips"], summary["train"], summary["val"]) == (2, 1, 1)
    assert any("touching" in e["message"] for e in events if e["event"] == "log")


def test_split_cells_strategies():
    for rows, cols in ((6, 6), (3, 3), (10, 4), (1, 7)):
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        split, how = split_cells(cells, 0.25, seed=1)
        assert "buffer" in how
        val = [c for c in cells if split[c] == "val"]
        train = [c for c in cells if split[c] == "train"]
        assert train and val
        assert not any(max(abs(t[0] - v[0]), abs(t[1] - v[1])) <= 1 for t in train for v in val)
    split, how = split_cells([(0, 0), (0, 1), (1, 0), (1, 1)], 0.25)
    assert sorted(split.values()) == ["train", "train", "train", "val"] and "touching" in how
    with pytest.raises(EngineError) as err:
        split_cells([(0, 0)], 0.25)
    assert err.value.code == "TOO_FEW_CHIPS"


def test_scale_and_colours():
    assert input_scale("uint8", 17) == 255 and input_scale("float32", 219) == 255
    assert input_scale("uint16", 4000) == 4000 and input_scale("float32", 0.8) == 0.8
    assert class_color("Forested") == "#68ab5f" and class_color("shrubland") == "#ccb879"
    assert class_color("vineyard") == class_color("vineyard") != class_color("orchard")


def test_bad_input_leaves_no_folder(landsat_polygons, osbs_tif, tmp_path):
    params = DatasetParams(imagery=osbs_tif, labels=landsat_polygons, task="landcover", out=tmp_path / "ds",
                           class_field="label", chip_size=CHIP)
    with pytest.raises(EngineError) as err:
        build_dataset(params, Reporter(json_mode=True, out=io.StringIO()))
    assert err.value.code == "LABELS_OUTSIDE_IMAGERY"
    with pytest.raises(EngineError) as err:
        build_dataset(DatasetParams(imagery=osbs_tif, labels=landsat_polygons, task="landcover",
                                    out=tmp_path / "ds", chip_size=100), Reporter(json_mode=True, out=io.StringIO()))
    assert err.value.code == "BAD_CHIP_SIZE"
    assert list(tmp_path.iterdir()) == []


def test_imagery_with_an_internal_mask(osbs_tif, osbs_csv, tmp_path):
    """Like fetch's mosaics: RGB without a nodata value, holes in an internal mask band."""
    with rasterio.open(osbs_tif) as src:
        data = src.read(window=Window(0, 0, 128, 128))
        profile = src.profile | {"width": 128, "height": 128, "nodata": None, "tiled": False,
                                 "transform": src.window_transform(Window(0, 0, 128, 128))}
    hole = np.full((128, 128), 255, np.uint8)
    hole[:, :20] = 0  # the left 20 columns have no imagery
    imagery = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(imagery, "w", **profile) as dst:
        dst.write(data)
        dst.write_mask(hole)
    params = DatasetParams(imagery=imagery, labels=osbs_csv, task="trees", out=tmp_path / "ds", chip_size=CHIP)
    manifest, _, _ = run(params)
    assert manifest["nodata"] is None
    left = [c for c in manifest["chips"] if c["bounds"][0] == pytest.approx(404211.9)]
    assert left  # 44 of 64 columns valid: kept
    for chip in left:
        with rasterio.open(params.out / chip["image"]) as img, rasterio.open(params.out / chip["mask"]) as msk:
            valid = (img.read_masks() > 0).all(axis=0)
            crown = msk.read(1)
        assert not valid[:, :20].any() and valid[:, 20:].all()
        assert (crown[:, :20] == IGNORE).all() and (crown[:, 20:] != IGNORE).all()
    assert not list((params.out / "images").glob("*.msk"))  # the mask is inside the GeoTIFF
