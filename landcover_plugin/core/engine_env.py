"""Where the engine's Python is, and what to tell the user when it is missing.

The engine runs in its own virtual environment, never in QGIS's Python
(docs/DESIGN.md), so the plugin only needs the path of that environment's python.
No Qt or qgis import here: callers read QgsSettings and pass the values in.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ENV_VAR = "LANDCOVER_ENGINE_PYTHON"
SETTINGS_KEY = "landcover/engine_python"


def plugin_dir() -> Path:
    """The landcover_plugin package folder, symlinks followed (a dev install
    links it into the QGIS profile; resolving leads back to the checkout)."""
    return Path(__file__).resolve().parents[1]


def package_root() -> Path:
    """The folder holding the landcover_plugin package: the engine's PYTHONPATH,
    so the engine code always matches the plugin's (also for a zip install)."""
    return plugin_dir().parent


def find_resource(relative: str) -> Path | None:
    """A file shipped with the plugin: inside the plugin folder (zip install)
    or beside it (the git checkout, where resources/ and requirements/ live)."""
    for base in (plugin_dir(), package_root()):
        if (base / relative).exists():
            return base / relative
    return None


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def user_venv(user_data_dir: Path) -> Path:
    """The environment 'Create environment' makes, in the QGIS profile folder."""
    return Path(user_data_dir) / "landcover" / "venv"


@dataclass(frozen=True)
class EngineLocation:
    python: Path
    origin: str  # where the path came from, for messages: env var, settings, checkout, user data


def find_engine_python(setting: str | None = None, user_data_dir: Path | None = None,
                       environ: Mapping[str, str] = os.environ) -> EngineLocation:
    """The engine's python: env var, else the QGIS setting, else the checkout's
    .venv, else the user-data venv. An explicit choice (env var, setting) is
    returned even when missing, so the message names what the user chose."""
    if environ.get(ENV_VAR):
        return EngineLocation(Path(environ[ENV_VAR]), f"the {ENV_VAR} environment variable")
    if setting:
        return EngineLocation(Path(setting), f"the QGIS setting {SETTINGS_KEY}")
    checkout = venv_python(package_root() / ".venv")
    if checkout.exists() or user_data_dir is None:
        return EngineLocation(checkout, "the plugin's source folder")
    return EngineLocation(venv_python(user_venv(user_data_dir)), "the QGIS profile folder")


def check_engine(location: EngineLocation) -> str | None:
    """None when the engine's python is there; else the message for the user."""
    if location.python.is_file() and os.access(location.python, os.X_OK):
        return None
    return missing_message(location)


def missing_message(location: EngineLocation) -> str:
    return (f"The landcover engine environment is missing: {location.python} (from {location.origin}) "
            "does not exist. Run `make install` in the plugin's source folder, or press "
            "'Create environment' in the Landcover dock (it installs the engine in its own "
            f"environment, never in QGIS's Python), or set {ENV_VAR} to an engine environment's python.")


def requirement_files() -> list[Path] | None:
    """requirements/engine.txt + the accelerated (an NVIDIA GPU answers nvidia-smi)
    or CPU builds, next to the plugin (zip install) or in the checkout; None when
    they cannot be found. The same choice as scripts/install.sh."""
    accel = "accel-gpu.txt" if _nvidia_gpu() else "accel-cpu.txt"
    files = [find_resource(f"requirements/{name}") for name in ("engine.txt", accel)]
    return None if None in files else files


def _nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi], capture_output=True).returncode == 0


def base_python() -> str:
    """A system python to create the venv with (not QGIS's: on some platforms
    sys.executable is the QGIS binary itself)."""
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else (shutil.which("python3") or "python3")


def create_env_commands(venv: Path, requirements: list[Path], python: str | None = None) -> list[list[str]]:
    """The commands that create the engine environment at `venv`."""
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    return [[python or base_python(), "-m", "venv", str(venv)],
            pip + ["--upgrade", "pip"],
            pip + [arg for req in requirements for arg in ("-r", str(req))]]
