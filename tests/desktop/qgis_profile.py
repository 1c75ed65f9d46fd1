"""A fresh QGIS profile with the plugin linked in and enabled (as `make dev-install`
does), and the environment to start QGIS with it."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"


def install_plugin(profiles: Path) -> Path:
    """Link the plugin into profiles/default and enable it; the profile folder."""
    profile = profiles / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "landcover_plugin").symlink_to(ROOT / "landcover_plugin", target_is_directory=True)
    (profile / "QGIS").mkdir()
    (profile / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\nlandcover_plugin=true\n")
    return profile


def qgis_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment minus what would point QGIS at another profile."""
    env = {k: v for k, v in os.environ.items() if k not in ("QGIS_CUSTOM_CONFIG_PATH", "QT_QPA_PLATFORM")}
    runtime = tmp_path / "runtime"
    runtime.mkdir(exist_ok=True)
    runtime.chmod(0o700)  # Qt refuses a runtime dir others can read
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env.pop("LANDCOVER_ENGINE_PYTHON", None)  # the plugin must find the checkout's engine itself
    return env
