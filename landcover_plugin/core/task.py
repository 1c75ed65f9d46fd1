"""EngineTask: one engine run as a QgsTask (progress bar, cancel, message bar).

run() happens in a worker thread and never touches the GUI; finished() runs
in the main thread and reports to the message bar and the callbacks.
"""
from __future__ import annotations

from typing import Any, Callable

from qgis.core import Qgis, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..contract.runner import EngineFailed, EngineRun
from .job import EventRelay, dock_words

LOG_TAG = "Landcover"
_QUIET = {"seconds", "tiles", "provider"}  # bookkeeping, not results
_LEVELS = {"debug": Qgis.MessageLevel.Info, "info": Qgis.MessageLevel.Info, "warning": Qgis.MessageLevel.Warning,
           "error": Qgis.MessageLevel.Critical}


def summary_text(summary: dict[str, Any]) -> str:
    """The result's headline numbers for the message bar: the predict stage's
    (crowns, canopy m², hectares per class), or a single command's own, and the
    labels' attribution when they came from OpenStreetMap."""
    main = summary.get("predict", summary)
    text = ", ".join(f"{k.replace('_m2', ' m²').replace('_', ' ')}: {_fmt(v)}" for k, v in main.items()
                     if k not in _QUIET | {"attribution"} and not isinstance(v, (dict, list)))
    text += training_text(summary.get("train", {}))
    if summary.get("train", {}).get("host"):  # trained over ssh: say where
        text += f"; trained on {summary['train']['host']} ({summary['train'].get('device') or 'its CPU'})"
    if summary.get("attribution"):  # labels from OSM: its licence asks for the credit where results show
        text += f"{'. ' if text else ''}Labels: {summary['attribution']}"
    if main.get("provider"):  # a GPU user sees whether it was used (onnxruntime falls back to the CPU silently)
        text += f" (model ran on {str(main['provider']).removesuffix('ExecutionProvider')})"
    return text


def training_text(train: dict[str, Any]) -> str:
    """How far to trust a land-cover model: its validation accuracy, the weakest class, the
    classes it never learnt and whether it was still improving (the `train` stage's summary)."""
    if "val_accuracy" not in train:
        return ""
    text = f". Validation accuracy {train['val_accuracy']:.2f}"
    text += f" ({train['family']})" if train.get("family") else ""
    text += f", weakest class: {train['weakest_class']}" if train.get("weakest_class") else ""
    if train.get("classes_not_learnt"):
        text += f"; not learnt: {', '.join(train['classes_not_learnt'])}"
    if train.get("still_improving"):
        text += "; still improving at the last epoch: train longer"
    return text


def result_level(summary: dict[str, Any]):
    """A warning, not a success, when the model lacks a class or was still improving."""
    train = summary.get("train", {})
    still_short = train.get("classes_not_learnt") or train.get("still_improving")
    return Qgis.MessageLevel.Warning if still_short else Qgis.MessageLevel.Success


def _log(message: str, level: str) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, _LEVELS.get(level, Qgis.MessageLevel.Info))


def _fmt(value: Any) -> str:
    return f"{value:,.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


class EngineTask(QgsTask):
    """Runs `engine` and reports; `on_success(result_event)` / `on_failure(EngineFailed)`
    are called in the main thread when it ends. `stage_changed` says what runs now
    (the stage; the epoch and where training runs), queued to the main thread."""

    stage_changed = pyqtSignal(str)

    def __init__(self, description: str, engine: EngineRun, message_bar=None,
                 on_success: Callable[[dict], None] | None = None,
                 on_failure: Callable[[EngineFailed], None] | None = None) -> None:
        # Silent (QGIS >= 3.26): the plugin reports the outcome itself, no second "Task complete/failed".
        flags = QgsTask.Flag.CanCancel | QgsTask.Flag.Silent if hasattr(QgsTask.Flag, "Silent") \
            else QgsTask.Flag.CanCancel
        super().__init__(description, flags)
        self.engine = engine
        self.message_bar = message_bar
        self.on_success, self.on_failure = on_success, on_failure
        self.result_event: dict | None = None
        self.failure: EngineFailed | None = None
        self._relay = EventRelay(self.setProgress, _log, self.stage_changed.emit)

    def run(self) -> bool:  # worker thread
        try:
            self.result_event = self.engine.run(self._relay, self.isCanceled)  # worker thread: thread-safe calls only
            return True
        except EngineFailed as exc:
            self.failure = exc
            if exc.code == "CANCELLED":  # ending "complete": QGIS 3.22 would add its own "Task failed"
                self.setDescription(f"{self.description()} (cancelled)")
                return True
        except Exception as exc:  # a bug in the plugin: report it rather than lose it in the thread
            self.failure = EngineFailed("PLUGIN_ERROR", f"{type(exc).__name__}: {exc}",
                                        "This is a bug in the Landcover plugin; please report it.")
        return False

    def finished(self, ok: bool) -> None:  # main thread
        if ok and self.failure is None and self.result_event is not None:
            summary = self.result_event.get("summary", {})
            text = summary_text(summary)
            what = self.description().removeprefix(f"{LOG_TAG}: ")  # the message bar's title says Landcover
            self._push(f"{what} done" + (f": {text}" if text else "."), result_level(summary))
            if self.on_success:
                self.on_success(self.result_event)
            return
        failure = self.failure or EngineFailed("CANCELLED", "Cancelled.", "")
        level = Qgis.MessageLevel.Info if failure.code == "CANCELLED" else Qgis.MessageLevel.Critical
        QgsMessageLog.logMessage(f"{failure.code}: {failure}", LOG_TAG, level)
        self._push(dock_words(str(failure)), level)
        if self.on_failure:
            self.on_failure(failure)

    def _push(self, text: str, level) -> None:
        if self.message_bar is not None:
            duration = 0 if level == Qgis.MessageLevel.Critical else 10
            self.message_bar.pushMessage(LOG_TAG, text, level=level, duration=duration)
