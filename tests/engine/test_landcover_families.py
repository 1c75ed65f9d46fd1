"""Land cover from a few polygons (issue 16), on the real Landsat sample: a VRT stack of
separate band files of mixed types, datasets sized to the labels, the random-forest family
through the one predict path, --family auto, and the bad inputs each with its message."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import fiona
import numpy as np
import onnxruntime as ort
import pytest
import rasterio
from shapely.geometry import mapping, shape

from landcover_plugin.contract.names import IGNORE
from landcover_plugin.contract.protocol import parse_event
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.learn import forest as rf
from landcover_plugin.engine.learn.dataset_folder import Manifest, load_chips
from landcover_plugin.engine.learn.model_package import read_info
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset, touching_groups
from landcover_plugin.engine.stages.predict import PredictParams, predict
from landcover_plugin.engine.stages.train import TrainParams, params_from_config, train

LANDSAT_ROLES = "blue=1,green=2,red=3,nir=4,swir1=5,swir2=6"  # TM/ETM+ bands 1-5 and 7


def run(stage, params) -> tuple[dict, list[dict]]:
    out = io.StringIO()
    result = stage(params, Reporter(json_mode=True, out=out))
    return result.summary, [parse_event(line) for line in out.getvalue().splitlines()]


def warnings_of(events: list[dict]) -> str:
    return "\n".join(e["message"] for e in events if e["event"] == "log" and e["level"] == "warning")


@pytest.fixture(scope="module")
def vrt(landsat_bands, tmp_path_factory) -> Path:
    """The stack a QGIS user makes: Build Virtual Raster, separate bands (five Float32, one Int16)."""
    out = tmp_path_factory.mktemp("vrt") / "stack.vrt"
    subprocess.run(["gdalbuildvrt", "-q", "-separate", str(out), *map(str, landsat_bands)], check=True)
    with rasterio.open(out) as src:
        assert set(src.dtypes) == {"float32", "int16"}  # the mix rasterio refuses to read at once
    return out


@pytest.fixture(scope="module")
def default_ds(vrt, landsat_polygons, tmp_path_factory):
    """`landcover dataset --labels ... --class-field label` with every default."""
    out = tmp_path_factory.mktemp("ds") / "ds"
    summary, events = run(build_dataset, DatasetParams(imagery=vrt, labels=landsat_polygons, task="landcover",
                                                       out=out, class_field="label"))
    return out, summary, events


@pytest.fixture(scope="module")
def forest_model(default_ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("forest") / "model"
    summary, events = run(train, TrainParams(dataset=default_ds[0], out=out, family="forest", bands=LANDSAT_ROLES))
    return out, summary, events


def test_vrt_of_mixed_types_makes_chips_with_its_nodata(default_ds, vrt):
    out, summary, _ = default_ds
    manifest = Manifest.read(out)
    assert manifest.dtype == "float32" and manifest.band_count == 6
    with rasterio.open(vrt) as src:
        band7_nodata = int((src.read_masks(6) == 0).sum())
    assert band7_nodata > 0  # the sample's band 7 lacks data where the others have it
    assert "band 6 of the imagery has no data on 22% of the scene" in warnings_of(default_ds[2])
    # A pixel without data in any band is neither labelled nor counted valid in the chips.
    for chip in manifest.chips:
        with rasterio.open(vrt) as src, rasterio.open(out / chip["image"]) as img, \
                rasterio.open(out / chip["mask"]) as msk:
            window = rasterio.windows.from_bounds(*chip["bounds"], transform=src.transform).round_offsets()
            invalid = (src.read_masks(6, window=window, boundless=True) == 0)
            assert (msk.read(1)[invalid] == IGNORE).all()
            assert (img.read_masks()[:, invalid] == 0).all()


def test_default_chips_fit_the_labels_and_every_class_with_two_polygons_is_validated(default_ds, landsat_polygons):
    out, summary, events = default_ds
    manifest = Manifest.read(out)
    assert summary["chip_size"] == 32  # polygons of 10-20 px on a 489 x 443 px scene
    assert "by polygon" in manifest.extra["split"]
    with fiona.open(landsat_polygons) as src:
        feats = [(f["properties"]["label"], shape(f["geometry"])) for f in src]
    groups = touching_groups([g for _, g in feats])
    separate = {name: len({groups[i] for i, (n, _) in enumerate(feats) if n == name}) for name, _ in feats}
    share = dict(zip(manifest.class_names, manifest.extra["class_balance"]))
    x_val, y_val = load_chips(out, manifest, "val")
    in_val = set(np.unique(y_val[y_val != IGNORE]).astype(int))
    notes = manifest.extra["class_notes"]
    for name, n in separate.items():
        i = manifest.class_names.index(name)
        if name in notes:  # each class left out says why, in the manifest and as a warning
            assert f"class '{name}'" in warnings_of(events)
            continue
        assert share[name] > 0, name
        if n >= 2:
            assert i in in_val, name
    # agriculture's only polygon lies where band 7 has no data: named, not silently dropped
    assert "agriculture" in notes and "valid imagery" in notes["agriculture"]


def test_forest_package_runs_like_the_unet(forest_model, default_ds, vrt, tmp_path):
    out, summary, _ = forest_model
    info = read_info(out)
    manifest = Manifest.read(default_ds[0])
    assert info.class_names == manifest.class_names and info.band_count == 6
    assert summary["family"] == "forest" and 0 <= summary["val_accuracy"] <= 1
    assert set(summary["val_classes"]) <= set(manifest.class_names) and summary["weakest_class"]
    assert np.array(summary["val_confusion"]).shape == (7, 7)
    # NCHW in, (N, C, H, W) class probabilities out, like the U-Net
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _ = load_chips(default_ds[0], manifest, "val")
    probs = session.run(None, {"input": x[:3].transpose(0, 3, 1, 2)})[0]
    assert probs.shape == (3, 7, 32, 32)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the forest inside the ONNX file and its features computed for training agree
    roles = rf.parse_roles(LANDSAT_ROLES, 6)
    (features,) = rf.feature_batches(rf.features_model(6, manifest.mean, manifest.std, roles), x[:3])
    assert features.shape == (3, 32, 32, len(rf.feature_names(6, roles))) and features.shape[-1] == 21
    card = (out / "MODEL_CARD.md").read_text()
    assert "random forest" in card and "Confusion matrix" in card and "Weakest class" in card
    # the one predict path, on the VRT stack
    gpkg = tmp_path / "map.gpkg"
    result, _ = run(predict, PredictParams(model=out, imagery=vrt, out=gpkg))
    with fiona.open(gpkg, layer="landcover") as layer:
        assert len(layer) > 0
    assert result["hectares"]["forest"] > 0


def test_auto_keeps_the_better_family_and_says_by_how_much(default_ds, tmp_path):
    out = tmp_path / "model"
    summary, events = run(train, TrainParams(dataset=default_ds[0], out=out, epochs=2))
    scores = summary["family_scores"]
    assert set(scores) == {"unet", "forest"}
    assert summary["family"] == max(scores, key=scores.get)
    assert summary["family_margin"] == pytest.approx(abs(scores["unet"] - scores["forest"]), abs=1e-4)
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Model family" in card and f"kept **{summary['family']}**" in card
    assert read_info(out).task == "landcover"
    assert not list(tmp_path.glob(".model.forest*"))  # the loser's package is gone


# --- bad input: each a clear message ------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_labels(landsat_polygons, tmp_path_factory) -> Path:
    """The sample polygons with: forest cut to one polygon, class values with spaces and
    non-ASCII letters, and a class given only as points."""
    out = tmp_path_factory.mktemp("labels") / "odd.gpkg"
    rename = {"developed": "zone urbaine", "herbaceous": "prairie sèche"}
    with fiona.open(landsat_polygons) as src:
        feats = [(rename.get(f["properties"]["label"], f["properties"]["label"]), shape(f["geometry"])) for f in src]
        crs = src.crs
    forest = [g for n, g in feats if n == "forest"]
    feats = [(n, g) for n, g in feats if n != "forest"] + [("forest", forest[0])]
    wells = [("puits", g.centroid) for n, g in feats[:3]]
    schema = {"geometry": "Unknown", "properties": {"label": "str"}}
    with fiona.open(out, "w", driver="GPKG", schema=schema, crs=crs) as dst:
        for name, geom in feats + wells:
            dst.write({"geometry": mapping(geom), "properties": {"label": name}})
    return out


def test_single_polygon_points_only_and_non_ascii_classes(odd_labels, vrt, tmp_path):
    ds = tmp_path / "ds"
    summary, events = run(build_dataset, DatasetParams(imagery=vrt, labels=odd_labels, task="landcover", out=ds,
                                                       class_field="label"))
    notes = summary["class_notes"]
    assert "one polygon only" in notes["forest"]
    assert "only as points" in notes["puits"]
    text = warnings_of(events)
    assert "class 'forest'" in text and "class 'puits'" in text
    manifest = Manifest.read(ds)
    assert {"zone urbaine", "prairie sèche"} <= set(manifest.class_names)
    assert "puits" not in manifest.class_names
    model = tmp_path / "model"
    run(train, TrainParams(dataset=ds, out=model, family="forest"))
    assert read_info(model).class_names == manifest.class_names  # spaces and accents survive the ONNX metadata
    assert "prairie sèche" in (model / "MODEL_CARD.md").read_text()


def test_labels_under_one_percent_of_the_scene_warn(landsat_polygons, vrt, tmp_path):
    labels = tmp_path / "few.gpkg"
    with fiona.open(landsat_polygons) as src:
        feats = sorted(((f["properties"]["label"], shape(f["geometry"])) for f in src), key=lambda f: f[1].area)
        with fiona.open(labels, "w", driver="GPKG", schema={"geometry": "Polygon", "properties": {"label": "str"}},
                        crs=src.crs) as dst:
            for name, geom in feats[:6]:
                dst.write({"geometry": mapping(geom), "properties": {"label": name}})
    _, events = run(build_dataset, DatasetParams(imagery=vrt, labels=labels, task="landcover", out=tmp_path / "ds",
                                                 class_field="label"))
    assert "the labels cover 0." in warnings_of(events) and "under 1%" in warnings_of(events)


def test_one_band_raster_trains_without_indices_and_refuses_roles_it_lacks(landsat_bands, landsat_polygons,
                                                                           tmp_path):
    ds = tmp_path / "ds"
    run(build_dataset, DatasetParams(imagery=landsat_bands[3], labels=landsat_polygons, task="landcover", out=ds,
                                     class_field="label"))
    summary, events = run(train, TrainParams(dataset=ds, out=tmp_path / "model", family="forest"))
    assert read_info(tmp_path / "model").band_count == 1 and summary["val_accuracy"] >= 0
    assert "no spectral indices on a one-band raster" in warnings_of(events)
    with pytest.raises(EngineError) as err:
        train(TrainParams(dataset=ds, out=tmp_path / "model2", family="forest", bands="red=3,nir=1"),
              Reporter(json_mode=True, out=io.StringIO()))
    assert err.value.code == "BAD_BANDS" and "between 1 and 1" in err.value.message


def test_forest_family_refuses_fine_tuning_and_unknown_families(default_ds, tmp_path):
    with pytest.raises(EngineError) as err:
        train(TrainParams(dataset=default_ds[0], out=tmp_path / "m", family="forest", base=tmp_path / "unet"),
              Reporter(json_mode=True, out=io.StringIO()))
    assert err.value.code == "BAD_PARAMS" and "from scratch" in err.value.message
    with pytest.raises(EngineError) as err:
        train(TrainParams(dataset=default_ds[0], out=tmp_path / "m", family="gbm"),
              Reporter(json_mode=True, out=io.StringIO()))
    assert err.value.code == "BAD_PARAMS" and "auto, unet, forest" in err.value.hint


def test_band_roles_in_a_config_file_must_be_text(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("dataset: ds\nout: model\nfamily: forest\nbands: {red: 3, nir: 4}\n")
    with pytest.raises(EngineError) as err:
        params_from_config(config)
    assert err.value.code == "BAD_CONFIG" and "bands" in err.value.message
    config.write_text("dataset: ds\nout: model\nfamily: forest\nbands: red=3,nir=4\n")
    assert params_from_config(config).bands == "red=3,nir=4"
