"""Fixtures for tests that start QGIS itself (the desktop under Xvfb, qgis_process.bin)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE_PYTHON = ROOT / ".venv" / "bin" / "python"


@pytest.fixture(scope="session")
def trees_result(tmp_path_factory, osbs_tif, osbs_csv) -> Path:
    """A real result GeoPackage: the engine's trees pipeline on the OSBS sample."""
    if not ENGINE_PYTHON.exists():
        pytest.fail(f"{ENGINE_PYTHON} is missing: run `make install`")
    folder = tmp_path_factory.mktemp("trees-result")
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(json.dumps({
        "task": "trees", "imagery": {"source": str(osbs_tif)}, "labels": {"path": str(osbs_csv)},
        "train": {"epochs": 8, "chip_size": 64}, "workdir": str(folder / "work"), "out": str(folder / "trees.gpkg")}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJ_LIB", "GDAL_DATA")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([str(ENGINE_PYTHON), "-m", "landcover_plugin.engine", "run", str(pipeline)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return folder / "trees.gpkg"
