"""CreateEnvTask: create the engine environment (engine_env.plan_env) as a QgsTask.

The offer the dock makes when the engine is missing. It installs into a venv of its
own, never into QGIS's Python (docs/DESIGN.md): built beside the target and renamed
into place only when whole, so a failed or cancelled creation leaves nothing that
check_engine would take for an engine.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from qgis.core import Qgis, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from .engine_env import LAST_LINES, EnvPlan, InstallProgress, building_dir, failure_message
from .task import LOG_TAG

STAGES = {"venv": "Creating the Python environment", "--upgrade": "Updating pip in it"}
CANCELLED = "Cancelled: no engine environment was created."


class CreateEnvTask(QgsTask):
    stageChanged = pyqtSignal(str)  # noqa: N815 (Qt's naming) what it is doing, for the dock's status line

    def __init__(self, plan: EnvPlan, on_done: Callable[[bool, str], None] | None = None) -> None:
        super().__init__("Create the Landcover engine environment", QgsTask.Flag.CanCancel)
        self.plan = plan
        self.on_done = on_done
        self.message = ""
        self.stage = ""

    def run(self) -> bool:  # worker thread
        building = building_dir(self.plan.venv)
        try:
            shutil.rmtree(building, ignore_errors=True)  # a killed earlier try
            ok = self._run_commands()
            if ok:
                _replace_dir(building, self.plan.venv)
                self.message = f"The engine environment is ready: {self.plan.venv}"
            return ok
        except Exception as exc:  # noqa: BLE001 (the user reads it instead of a silent failure)
            self.message = f"Creating the engine environment failed: {exc}"
            return False
        finally:
            shutil.rmtree(building, ignore_errors=True)  # gone already when it became the venv

    def _run_commands(self) -> bool:
        progress = InstallProgress(self.plan.commands, self.plan.requirements)
        for command in self.plan.commands:
            self._stage(next((text for key, text in STAGES.items() if key in command),
                             "Installing the engine's packages"))
            QgsMessageLog.logMessage("$ " + " ".join(command), LOG_TAG, Qgis.MessageLevel.Info)
            last: deque[str] = deque(maxlen=LAST_LINES)
            try:
                returncode = self._run(command, progress, last)
            except OSError as exc:
                self.message = failure_message(command, None, [exc.strerror or str(exc)])
                return False
            if self.isCanceled():
                self.message = CANCELLED
                return False
            if returncode != 0:
                self.message = failure_message(command, returncode, list(last))
                return False
            self.setProgress(progress.next_command())
        return True

    def _run(self, command: list[str], progress: InstallProgress, last: deque[str]) -> int:
        """Run one command; its lines to the log panel, the progress bar and `last`."""
        # pip's lines as they happen and whole (a buffered stdout is cut mid-line by stderr's
        # warnings in the one pipe), in UTF-8 on any Windows code page; uv trusts the system's
        # certificates as pip does (a company proxy's CA), under its old and new names.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8",
               "UV_NATIVE_TLS": "1", "UV_SYSTEM_CERTS": "1"}
        no_window = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              encoding="utf-8", errors="replace", env=env, creationflags=no_window) as proc:
            # Cancel also during long silent steps (unpacking TensorFlow prints nothing).
            threading.Thread(target=self._stop_when_cancelled, args=(proc,), daemon=True).start()
            for line in proc.stdout:
                line = line.rstrip()
                QgsMessageLog.logMessage(line, LOG_TAG, Qgis.MessageLevel.Info)
                last.append(line)
                percent = progress.update(line)
                if percent is not None:
                    self.setProgress(percent)
                    self._stage(progress.stage)
            return proc.wait()

    def _stop_when_cancelled(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            if self.isCanceled():
                proc.terminate()
                return
            time.sleep(0.2)

    def _stage(self, text: str) -> None:
        if text and text != self.stage:
            self.stage = text
            self.stageChanged.emit(text)

    def finished(self, ok: bool) -> None:  # main thread
        if self.on_done:
            self.on_done(ok, self.message or CANCELLED)


def _replace_dir(new: Path, target: Path) -> None:
    """`new` becomes `target`; an earlier environment there is removed only afterwards."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
