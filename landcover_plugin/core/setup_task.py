"""CreateEnvTask: create the engine environment (a venv + pip) as a QgsTask.

The offer the dock makes when the engine is missing. It installs into a venv
of its own, never into QGIS's Python (docs/DESIGN.md).
"""
from __future__ import annotations

import subprocess
from typing import Callable

from qgis.core import Qgis, QgsMessageLog, QgsTask

from .task import LOG_TAG


class CreateEnvTask(QgsTask):
    def __init__(self, commands: list[list[str]], on_done: Callable[[bool, str], None] | None = None) -> None:
        super().__init__("Create the Landcover engine environment", QgsTask.Flag.CanCancel)
        self.commands = commands
        self.on_done = on_done
        self.message = ""

    def run(self) -> bool:  # worker thread
        for i, command in enumerate(self.commands):
            QgsMessageLog.logMessage("$ " + " ".join(command), LOG_TAG, Qgis.MessageLevel.Info)
            try:
                proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            except OSError as exc:
                self.message = f"Cannot run {command[0]}: {exc.strerror}"
                return False
            for line in proc.stdout:
                QgsMessageLog.logMessage(line.rstrip(), LOG_TAG, Qgis.MessageLevel.Info)
                if self.isCanceled():
                    proc.terminate()
            if proc.wait() != 0:
                self.message = (f"`{' '.join(command[:4])} ...` failed (exit {proc.returncode}); "
                                "see the Landcover log panel.")
                return False
            self.setProgress(100.0 * (i + 1) / len(self.commands))
        self.message = "The engine environment is ready."
        return True

    def finished(self, ok: bool) -> None:  # main thread
        if self.on_done:
            self.on_done(ok, self.message or "Cancelled.")
