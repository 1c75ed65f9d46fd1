"""The QGIS desktop itself, under Xvfb, with the plugin enabled in a fresh profile:
the dock opens and the result layers show, its area choices and model list open, and
a training run shows its stage, epoch and time left; screenshots are saved to
tests/artifacts/desktop*.png for a person to look at."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from qgis_profile import ARTIFACTS, install_plugin, qgis_env

SCRIPT = Path(__file__).with_name("desktop_script.py")


def test_desktop_shows_the_dock_and_the_results(tmp_path, osbs_tif, osbs_csv, trees_result):
    for tool in ("xvfb-run", "qgis", "import"):
        assert shutil.which(tool), f"{tool} is missing: run `make install`"
    install_plugin(tmp_path / "qgis")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot, marker = ARTIFACTS / "desktop.png", tmp_path / "marker.json"
    shot.unlink(missing_ok=True)
    env = qgis_env(tmp_path) | {"LANDCOVER_DESKTOP_MARKER": str(marker), "LANDCOVER_DESKTOP_SHOT": str(shot),
                                "LANDCOVER_DESKTOP_RASTER": str(osbs_tif), "LANDCOVER_DESKTOP_GPKG": str(trees_result),
                                "LANDCOVER_DESKTOP_CSV": str(osbs_csv), "LANDCOVER_DESKTOP_OUT": str(tmp_path / "out")}
    proc = subprocess.Popen(["xvfb-run", "-a", "-s", "-screen 0 1400x900x24", "qgis", "--noversioncheck", "--nologo",
                             "--profiles-path", str(tmp_path / "qgis"), "--code", str(SCRIPT)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: Xvfb and QGIS go together on timeout
    try:
        output, _ = proc.communicate(timeout=480)  # a training and a prediction run inside, on a shared machine
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert marker.exists(), f"the script did not run (exit {proc.returncode}):\n{output[-3000:]}"
    report = json.loads(marker.read_text())
    assert report["errors"] == [], report["errors"]
    assert report["plugin_loaded"] and report["dock_found"] and report["dock_visible"], report
    assert report["engine_found"], "the dock did not find the checkout's engine environment"
    assert report["raster_valid"] and {"crowns", "trees"} <= set(report["result_layers"]), report
    assert report["screenshot_rc"] == 0 and shot.exists()
    assert shot.stat().st_size > 50_000  # a 1400x900 screen with QGIS on it, not a blank image
    for name in ("area", "models", "progress"):
        assert report[f"{name}_shot"] == 0 and (ARTIFACTS / f"desktop-{name}.png").stat().st_size > 50_000
    assert any(item.startswith("trees-base — Trees, 0.1 m, 3 bands") for item in report["models_listed"]), report
    # mid-training: the stage, the epoch of the total and the time left; the bar not yet past training
    assert re.match(r"Training: epoch 2/50, \d+m\d\ds left", report["progress_status"]), report
    assert 5 < report["progress_value"] < 90, report
    assert "Cancelled" in report["cancel_status"], report
    # the shipped model from the list, then the report's map: legend, scale bar, north arrow, credits
    assert report["predict_status"].startswith("Done"), report
    assert report["export_status"].startswith("Map exported"), report
    assert (ARTIFACTS / "desktop-report.png").stat().st_size > 100_000 and report["result_shot"] == 0
    assert proc.returncode == 0, f"QGIS did not quit cleanly:\n{output[-3000:]}"
