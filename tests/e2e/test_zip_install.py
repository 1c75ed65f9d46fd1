"""`make zip` builds a plugin that installs in QGIS and lists its algorithm
in `qgis_process.bin list` (the Debian `qgis_process` wrapper is broken); from
that zip install, 'Create environment' makes the engine's environment and the
plugin finds it."""
from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QGIS_PYTHON = "/usr/bin/python3"  # Debian's QGIS runs on it


def qgis_env(config: Path) -> dict[str, str]:
    runtime = config / "xdg"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    return env | {"QGIS_CUSTOM_CONFIG_PATH": str(config), "QT_QPA_PLATFORM": "offscreen",
                  "XDG_RUNTIME_DIR": str(runtime)}


def install_zip(config: Path) -> Path:
    """`make zip`, unzipped into a fresh profile's plugins folder (returned)."""
    subprocess.run(["make", "-s", "zip"], cwd=ROOT, check=True)
    plugins = config / "profiles" / "default" / "python" / "plugins"
    with zipfile.ZipFile(ROOT / "dist" / "landcover_plugin.zip") as z:
        z.extractall(plugins)
    return plugins


def test_zip_installs_and_lists_the_algorithm(tmp_path):
    install_zip(tmp_path)
    with zipfile.ZipFile(ROOT / "dist" / "landcover_plugin.zip") as z:
        names = z.namelist()
    assert "landcover_plugin/metadata.txt" in names
    assert "landcover_plugin/__init__.py" in names
    assert "landcover_plugin/engine/cli.py" in names
    assert "landcover_plugin/requirements/engine.txt" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("landcover_plugin/tests")]
    env = qgis_env(tmp_path)
    enable = subprocess.run(["qgis_process.bin", "plugins", "enable", "landcover_plugin"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert enable.returncode == 0, enable.stdout + enable.stderr
    listing = subprocess.run(["qgis_process.bin", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert "landcover:mapfromimagery" in listing.stdout, listing.stdout[-2000:] + listing.stderr[-2000:]


@pytest.mark.slow  # installs the engine's packages (about a minute and a half from a local index)
def test_create_environment_from_a_zip_install(tmp_path):
    plugins = install_zip(tmp_path)
    env = {k: v for k, v in qgis_env(tmp_path).items() if k != "LANDCOVER_ENGINE_PYTHON"}
    done = subprocess.run([QGIS_PYTHON, str(Path(__file__).with_name("zip_env_script.py")), str(plugins)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    venv = tmp_path / "profiles" / "default" / "landcover" / "venv"
    assert report["plugin"].startswith(str(plugins))  # the zip's copy, not the checkout
    assert report["before"] and "Create environment" in report["before"]
    create = report["commands"][0]  # no uv here: QGIS's base Python makes the venv, pip fills it
    assert Path(create[0]).name.startswith("python") and create[1:3] == ["-m", "venv"]
    assert report["ok"], report["message"]
    assert report["message"] == f"The engine environment is ready: {venv}"
    assert report["percents"] == sorted(report["percents"]) and report["percents"][-1] == pytest.approx(100)
    assert len(report["percents"]) > 20  # one step per requirement at least, not only per command
    assert any("of 21" in text for _, text in report["stages"])
    assert report["python"] == str(venv / "bin" / "python") and report["origin"] == "the QGIS profile folder"
    assert report["after"] is None and report["validated"] is None  # found, and it runs this engine
    assert not (venv.parent / ".venv.building").exists()
