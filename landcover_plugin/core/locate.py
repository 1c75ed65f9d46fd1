"""The engine's location as QGIS sees it: QgsSettings and the profile folder."""
from __future__ import annotations

import tempfile
from pathlib import Path

from qgis.core import QgsApplication, QgsSettings

from .engine_env import SETTINGS_KEY, EngineLocation, find_engine_python, validate_engine_python


def user_data_dir() -> Path:
    """The active QGIS profile folder (where 'Create environment' puts the venv)."""
    return Path(QgsApplication.qgisSettingsDirPath() or tempfile.gettempdir())


def engine_location() -> EngineLocation:
    return find_engine_python(QgsSettings().value(SETTINGS_KEY, "") or None, user_data_dir())


def choose_engine_python(chosen: Path) -> str | None:
    """'Browse to engine': keep the chosen environment's python in the QGIS setting when
    it runs this engine (None); else the message saying why it was not kept."""
    python, problem = validate_engine_python(chosen)
    if problem is None:
        QgsSettings().setValue(SETTINGS_KEY, str(python))
    return problem
