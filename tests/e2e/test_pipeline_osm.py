"""End to end: `landcover run` with OpenStreetMap labels from an Overpass endpoint (the
loopback stand-in), on a tiny synthetic scene: labels -> dataset -> train -> predict,
with "© OpenStreetMap contributors" in the run's output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.stages.pipeline import load_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from osm_xml import osm_file  # noqa: E402
from overpass_server import serve_overpass  # noqa: E402

CRS = "EPSG:32617"
X0, Y0 = 500000.0, 4000128.0  # top-left corner; 1 m pixels, 128 x 128: four 64-px chips
LC = ["barren", "cultivated", "developed", "forested", "herbaceous", "shrub", "water"]
ATTRIBUTION = "© OpenStreetMap contributors"


def scene_osm(path: Path) -> Path:
    """A forest over the left part of the image and a lake over the right part (closed ways)."""
    def ring(c0: int, r0: int, c1: int, r1: int) -> list[tuple[float, float]]:
        xs, ys = [X0 + c0, X0 + c1, X0 + c1, X0 + c0], [Y0 - r1, Y0 - r1, Y0 - r0, Y0 - r0]
        return list(zip(xs, ys)) + [(xs[0], ys[0])]

    return osm_file(path, [(ring(2, 2, 56, 126), {"landuse": "forest"}),
                           (ring(72, 2, 126, 126), {"natural": "water"})], CRS)


def scene_image(path: Path) -> Path:
    """Green noise on the forest's side, blue noise on the lake's."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (3, 128, 128)).astype(np.uint8)
    image[1, :, :64] += 120
    image[2, :, 64:] += 150
    with rasterio.open(path, "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8", crs=CRS,
                       transform=from_origin(X0, Y0, 1, 1)) as dst:
        dst.write(image)
    return path


def write_pipeline(folder: Path, **spec) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_pipeline_with_overpass_labels(tmp_path):
    imagery = scene_image(tmp_path / "scene.tif")
    with serve_overpass(scene_osm(tmp_path / "scene.osm")) as server:
        pipeline = write_pipeline(tmp_path, task="landcover", imagery=str(imagery), out="landcover.gpkg",
                                  labels={"preset": "landcover", "overpass": server.url, "date": "2021-06-01"},
                                  train={"epochs": 1, "chip_size": 64, "batch_size": 4})
        env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # the Overpass cache: this test's own
        proc = subprocess.run([sys.executable, "-m", "landcover_plugin.engine", "--json", "run", str(pipeline)],
                              capture_output=True, text=True, timeout=600, env=env)
        queries = list(server.queries)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, [e for e in events if e["event"] in ("error", "log")] or proc.stderr[-2000:]
    assert len(queries) == 1 and '[date:"2021-06-01T00:00:00Z"]' in queries[0]
    result = events[-1]
    assert result["event"] == "result" and result["summary"]["attribution"] == ATTRIBUTION
    assert any(e["event"] == "log" and ATTRIBUTION in e["message"] for e in events)
    stages = [e["message"] for e in events if e["event"] == "progress" and e["stage"] == "pipeline"]
    assert stages == ["fetch", "labels", "dataset", "train", "predict", "done"]
    assert result["summary"]["labels"]["class_forested"] == 1 and result["summary"]["labels"]["class_water"] == 1
    manifest = json.loads((tmp_path / "landcover-work" / "dataset" / "dataset.json").read_text())
    assert manifest["class_names"] == LC and manifest["attribution"] == ATTRIBUTION
    provenance = manifest["provenance"]
    assert provenance["label_source"] == f"Overpass API {server.url}"
    assert provenance["preset"] == "landcover" and provenance["label_date"] == "2021-06-01"
    with fiona.open(tmp_path / "landcover.gpkg", layer="landcover") as layer:
        assert layer.crs.to_epsg() == 32617 and {f["properties"]["class"] for f in layer} <= set(LC)


@pytest.mark.parametrize("labels, words", [
    ({"preset": "landcover"}, "neither labels nor a model"),
    ({"overpass": "http://x/api/interpreter"}, "need a preset"),
    ({"preset": "trees", "osm_file": "a.osm.pbf", "overpass": "http://x/api/interpreter"}, "only one source"),
    ({"path": "crowns.gpkg", "osm_file": "a.osm.pbf", "preset": "trees"}, "only one source"),
    ({"preset": "trees", "osm_file": "a.osm.pbf", "date": "2020-01-01"}, "Overpass only"),
    ({"preset": "trees", "overpas": "http://x/api/interpreter"}, "Unknown labels key(s): overpas"),
])
def test_bad_osm_labels_sections_are_refused(tmp_path, labels, words):
    pipeline = write_pipeline(tmp_path, task="trees", imagery="image.tif", out="t.gpkg", labels=labels)
    with pytest.raises(EngineError) as err:
        load_pipeline(pipeline)
    assert err.value.code == "BAD_PIPELINE" and words in err.value.message and err.value.hint


def test_osm_file_labels_section(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("task: trees\nimagery: image.tif\nout: t.gpkg\n"
                        "labels:\n  preset: trees\n  osm_file: area.osm.pbf\n")
    p = load_pipeline(pipeline)
    assert p.osm_file == tmp_path / "area.osm.pbf" and p.preset == "trees" and p.overpass is None
    pipeline.write_text("task: trees\nimagery: image.tif\nout: t.gpkg\n"
                        "labels: {preset: trees, overpass: 'http://x/api/interpreter', date: 2020-06-01}\n")
    assert load_pipeline(pipeline).date == "2020-06-01"  # YAML's date, as Overpass wants it
