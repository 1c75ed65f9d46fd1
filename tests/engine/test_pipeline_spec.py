"""The plugin's pipeline file (core/pipeline_spec.py, pure Python) read by the engine's
load_pipeline: each label source the dock and the Processing algorithm offer."""
from __future__ import annotations

from pathlib import Path

import pytest

from landcover_plugin.core.pipeline_spec import OVERPASS_DEFAULT, PipelineSpec, presets_for_task, write_pipeline
from landcover_plugin.engine.pipeline import load_pipeline
from landcover_plugin.engine.presets import available_presets, load_preset


def _spec(tmp_path: Path, **labels) -> PipelineSpec:
    return PipelineSpec(task="landcover", aoi=(500000, 4000000, 500256, 4000256), aoi_crs="EPSG:32617",
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
    pipeline = load_pipeline(write_pipeline(_spec(tmp_path, **labels), tmp_path / "pipeline.yaml"))
    for key, value in expected.items():
        assert getattr(pipeline, key) == value, key
    if "osm_file" in labels:
        assert pipeline.osm_file == tmp_path / "area.osm.pbf"
    assert pipeline.model is None and pipeline.aoi is not None


def test_plugin_reads_the_presets_as_the_engine_does():
    """The plugin reads presets without PyYAML; it must agree with the engine's parser."""
    from landcover_plugin.core.pipeline_spec import read_presets

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
    assert load_pipeline(write_pipeline(spec, tmp_path / "pipeline.yaml")).task == task
