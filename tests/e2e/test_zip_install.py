"""`make zip` builds a plugin that installs in QGIS and lists its algorithm
in `qgis_process.bin list` (the Debian `qgis_process` wrapper is broken)."""
from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def qgis_env(config: Path) -> dict[str, str]:
    runtime = config / "xdg"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    return env | {"QGIS_CUSTOM_CONFIG_PATH": str(config), "QT_QPA_PLATFORM": "offscreen",
                  "XDG_RUNTIME_DIR": str(runtime)}


def test_zip_installs_and_lists_the_algorithm(tmp_path):
    subprocess.run(["make", "-s", "zip"], cwd=ROOT, check=True)
    archive = ROOT / "dist" / "landcover_plugin.zip"
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert "landcover_plugin/metadata.txt" in names
        assert "landcover_plugin/__init__.py" in names
        assert "landcover_plugin/engine/cli.py" in names
        assert "landcover_plugin/requirements/engine.txt" in names
        assert not [n for n in names if "__pycache__" in n or n.startswith("landcover_plugin/tests")]
        plugins = tmp_path / "profiles" / "default" / "python" / "plugins"
        z.extractall(plugins)
    env = qgis_env(tmp_path)
    enable = subprocess.run(["qgis_process.bin", "plugins", "enable", "landcover_plugin"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert enable.returncode == 0, enable.stdout + enable.stderr
    listing = subprocess.run(["qgis_process.bin", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert "landcover:mapfromimagery" in listing.stdout, listing.stdout[-2000:] + listing.stderr[-2000:]
