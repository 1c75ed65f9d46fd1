"""Runs that recover from what an earlier run left: a torn stage record, the hidden
temporary files of a killed run, a second run on the same output (issue 13).

Through the real `landcover` command, on the NEON sample image and the shipped model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from landcover_plugin.engine.model_package import SHIPPED_MODELS

ENGINE = [sys.executable, "-m", "landcover_plugin.engine", "--json"]
# Inside OSBS_029 (EPSG:32617, 404211.9..404251.9 E, 3285102.9..3285142.9 N): 30 m x 30 m.
OSBS_AOI = "404215,3285105,404245,3285135"


def landcover(*args: str | Path) -> tuple[int, dict]:
    proc = subprocess.run([*ENGINE, *map(str, args)], capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout.splitlines()[-1])


def predict_pipeline(folder: Path, imagery: Path) -> Path:
    """A pipeline that crops the imagery to an AOI (the fetch stage, recorded) and predicts."""
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps({"task": "trees", "imagery": str(imagery), "aoi": OSBS_AOI, "aoi_crs": "EPSG:32617",
                                "model": str(SHIPPED_MODELS / "trees-base"), "out": str(folder / "trees.gpkg"),
                                "workdir": str(folder / "work")}))
    return path


def test_an_empty_stage_record_reruns_the_stage_instead_of_failing(osbs_tif, tmp_path):
    """A full disk while writing the record left it empty: the next run redoes the stage."""
    pipeline = predict_pipeline(tmp_path, osbs_tif)
    code, event = landcover("run", pipeline)
    assert code == 0, event
    record = tmp_path / "work" / ".fetch.done.json"
    assert json.loads(record.read_text())["outputs"]["mosaic"]
    record.write_bytes(b"")
    code, event = landcover("run", pipeline)
    assert code == 0, event
    assert json.loads(record.read_text())["outputs"]["mosaic"]  # written whole again
    assert not list((tmp_path / "work").glob(".*partial*"))
