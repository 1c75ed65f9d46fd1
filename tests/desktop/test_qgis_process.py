"""The algorithm from the command line: `qgis_process.bin` with the plugin enabled
in a fresh profile (the `qgis_process` wrapper fails on Debian, see docs/DESIGN.md)."""
from __future__ import annotations

import json
import subprocess

import pytest
from qgis_profile import install_plugin, qgis_env

ALG_ID = "landcover:mapfromimagery"


def _qgis_process(tmp_path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = qgis_env(tmp_path) | {"QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "qgis"), "QT_QPA_PLATFORM": "offscreen"}
    return subprocess.run(["qgis_process.bin", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def profile(tmp_path):
    return install_plugin(tmp_path / "qgis")


def test_lists_and_explains_the_algorithm(profile, tmp_path):
    listed = _qgis_process(tmp_path, "list")
    assert ALG_ID in listed.stdout, listed.stdout[-2000:] + listed.stderr[-2000:]
    helped = _qgis_process(tmp_path, "help", ALG_ID)
    assert helped.returncode == 0, helped.stderr
    for name in ("IMAGERY", "XYZ_URL", "EXTENT", "LABELS_FILE", "MODEL", "EPOCHS", "OUTPUT"):
        assert name in helped.stdout


def test_bad_input_fails_with_the_reason(profile, tmp_path, osbs_tif):
    out = tmp_path / "out.gpkg"
    proc = _qgis_process(tmp_path, "run", ALG_ID, "--", f"IMAGERY={osbs_tif}",
                         "EXTENT=404211.9,404251.9,3285102.9,3285142.9 [EPSG:32617]", f"OUTPUT={out}")
    assert proc.returncode != 0
    assert "labels" in (proc.stdout + proc.stderr) and not out.exists()


@pytest.mark.slow
def test_runs_the_pipeline(profile, tmp_path, osbs_tif, osbs_csv):
    out = tmp_path / "trees.gpkg"
    proc = _qgis_process(tmp_path, "run", ALG_ID, "--json", "--", f"IMAGERY={osbs_tif}", f"LABELS_FILE={osbs_csv}",
                         "EXTENT=404211.9,404251.9,3285102.9,3285142.9 [EPSG:32617]", "TASK=0", "EPOCHS=1",
                         f"OUTPUT={out}", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]
    assert results["OUTPUT"] == str(out) and out.exists()
    assert {uri.split("layername=")[1] for uri in results["LAYERS"]} >= {"crowns", "trees"}


@pytest.mark.slow
def test_exports_the_map_from_the_command_line(profile, tmp_path, osbs_tif):
    """MAP works without a desktop too: qgis_process predicts with the shipped model and writes the PDF and PNG."""
    from landcover_plugin.contract.names import MODELS_DIR

    pdf = tmp_path / "trees-map.pdf"
    proc = _qgis_process(tmp_path, "run", ALG_ID, "--json", "--", f"IMAGERY={osbs_tif}", "LABEL_SOURCE=3",
                         f"MODEL={MODELS_DIR / 'trees-base' / 'model.onnx'}", "TASK=0",
                         "EXTENT=404211.9,404251.9,3285102.9,3285142.9 [EPSG:32617]",
                         f"OUTPUT={tmp_path / 'trees.gpkg'}", f"MAP={pdf}", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]
    assert results["MAP"] == str(pdf) and pdf.read_bytes()[:5] == b"%PDF-"
    assert pdf.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
