"""The pipeline file (contract/pipeline_file.py) the plugin writes, read by the engine's
load_pipeline: each label source the dock and the Processing algorithm offer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from landcover_plugin.contract.names import OVERPASS_DEFAULT
from landcover_plugin.contract.pipeline_file import PipelineFile
from landcover_plugin.contract.tasks import presets_for_task
from landcover_plugin.engine.labels.presets import available_presets, load_preset
from landcover_plugin.engine.stages.pipeline import load_pipeline


def _spec(tmp_path: Path, **labels) -> PipelineFile:
    return PipelineFile(task="landcover", aoi=(500000, 4000000, 500256, 4000256), aoi_crs="EPSG:32617",
                        imagery=str(tmp_path / "scene.tif"), out=tmp_path / "lc.gpkg", workdir=tmp_path / "work",
                        **labels)


@pytest.mark.parametrize("labels, expected", [
    ({"preset": "landcover", "overpass": OVERPASS_DEFAULT, "date": "2021-06-01"},
     {"preset": "landcover", "overpass": OVERPASS_DEFAULT, "date": "2021-06-01", "osm_file": None, "labels": None}),
    ({"preset": "buildings", "overpass": "http://127.0.0.1:9/api/interpreter"},
     {"preset": "buildings", "overpass": "http://127.0.0.1:9/api/interpreter", "date": None}),
    ({"preset": "trees", "osm_file": Path("area.osm.pbf")}, {"preset": "trees", "overpass": None, "date": None}),
    ({"labels": Path("crowns.gpkg"), "class_field": "cover"},
     {"preset": None, "overpass": None, "osm_file": None, "class_field": "cover"}),
])
def test_each_label_source_reads_back_in_the_engine(tmp_path, labels, expected):
    labels = {k: tmp_path / v if isinstance(v, Path) else v for k, v in labels.items()}
    pipeline = load_pipeline(_spec(tmp_path, **labels).write(tmp_path / "pipeline.yaml"))
    for key, value in expected.items():
        assert getattr(pipeline, key) == value, key
    if "osm_file" in labels:
        assert pipeline.osm_file == tmp_path / "area.osm.pbf"
    assert pipeline.model is None and pipeline.aoi is not None


def test_plugin_reads_the_presets_as_the_engine_does():
    """The plugin reads presets without PyYAML; it must agree with the engine's parser."""
    from landcover_plugin.contract.tasks import read_presets

    assert [p.name for p in read_presets()] == available_presets()
    for info in read_presets():
        preset = load_preset(info.name)
        assert (info.name, info.description, info.task) == (preset.name, preset.description, preset.task)
    assert [p.name for p in presets_for_task("trees")] == ["trees"]
    assert [p.name for p in presets_for_task("landcover")][0] == "landcover"
    assert [p.name for p in presets_for_task("buildings")] == ["buildings"]
    assert [p.name for p in presets_for_task("classification")][0] == "landcover"


@pytest.mark.parametrize("task", ["buildings", "classification"])
def test_every_engine_task_can_be_asked_for_from_the_plugin(tmp_path, task):
    """The plugin offers each task the engine trains; the engine reads it back."""
    spec = _spec(tmp_path, preset="buildings" if task == "buildings" else "landcover",
                 overpass=OVERPASS_DEFAULT)
    spec.task = task
    assert spec.problems() == []
    assert load_pipeline(spec.write(tmp_path / "pipeline.yaml")).task == task


@pytest.mark.parametrize("spec, key, nearest", [
    ({"wrokdir": "w"}, "wrokdir", "workdir"),
    ({"trian": {"epochs": 1}}, "trian", "train"),
    ({"train": {"epoch": 1}}, "epoch", "epochs"),
    ({"imagery": {"source": "a.tif", "gds": 0.1}}, "gds", "gsd"),
    ({"predict": {"schedueler": "tcp://h:8786"}}, "schedueler", "scheduler"),
])
def test_a_typo_is_an_error_naming_the_nearest_key(tmp_path, spec, key, nearest):
    """An ignored `trian:` would train 20 epochs with defaults: refuse, and say what was meant."""
    from landcover_plugin.engine.errors import EngineError

    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({"task": "trees", "imagery": "a.tif", "out": "t.gpkg", "model": "m.onnx"} | spec))
    with pytest.raises(EngineError) as err:
        load_pipeline(path)
    assert err.value.code == "BAD_PIPELINE" and err.value.hint
    assert f"'{key}' (did you mean '{nearest}'?)" in err.value.message


def test_model_names_a_shipped_model_as_on_the_command_line(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("task: trees\nimagery: a.tif\nout: t.gpkg\nmodel: trees-base\n")
    assert load_pipeline(path).model == "trees-base"
    (tmp_path / "trees-base").mkdir()  # a model of the user's beside the file wins
    assert load_pipeline(path).model == tmp_path / "trees-base"


def test_what_the_plugin_writes_the_engine_reads_back_whole(tmp_path):
    """Every field survives the round trip, batch size and seed included."""
    spec = PipelineFile(task="trees", aoi=(1.0, 2.0, 3.0, 4.0), aoi_crs="EPSG:32617", imagery="https://t/{z}/{x}/{y}.png",
                        out=tmp_path / "t.gpkg", workdir=tmp_path / "w", labels=tmp_path / "c.gpkg", epochs=3,
                        batch_size=4, chip_size=64, seed=7, gsd=0.1, headers={"Referer": "https://x"},
                        scheduler="tls://10.0.0.5:8786")
    back = load_pipeline(spec.write(tmp_path / "p.yaml"))
    assert back.to_dict() == spec.to_dict()


def test_a_scheduler_that_is_no_dask_address_is_refused(tmp_path):
    from landcover_plugin.engine.errors import EngineError

    path = tmp_path / "pipeline.yaml"
    path.write_text("task: trees\nimagery: a.tif\nout: t.gpkg\nmodel: trees-base\npredict: {scheduler: 'h:8786'}\n")
    with pytest.raises(EngineError) as err:
        load_pipeline(path)
    assert err.value.code == "BAD_PIPELINE" and "tcp://HOST:PORT" in err.value.message
