"""Run the engine as a subprocess and read its JSON-lines events (protocol.py).

Standard library only: the plugin's QgsTask and Processing algorithm run the
engine with it, and so does the engine itself for a pipeline's training child.
The engine is `PYTHON -m landcover_plugin.engine --json ...`.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .protocol import STAGE_WEIGHTS, STAGES_OSM, STAGES_PREDICT, STAGES_TRAIN, Event, parse_event

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding landcover_plugin/

# Variables QGIS may set for its own GDAL/PROJ/Python; the engine's wheels
# bring their own, and a mismatched proj.db or PYTHONPATH breaks them.
_STRIP_ENV = ("PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "GDAL_DRIVER_PATH", "PROJ_LIB", "PROJ_DATA")
_EOF = object()
MISSING_HINT = ("Run `make install` in the plugin's source folder, or 'Create environment' in the Landcover "
                "dock, or set LANDCOVER_ENGINE_PYTHON to the engine's Python.")


class EngineFailed(Exception):
    """The engine reported an error (or died): code, message and hint for the user."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


def engine_env(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _STRIP_ENV}
    env["PYTHONPATH"] = str(root)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(stream, sink: Callable[[Any], None], end: object = None) -> None:
    """Copy a pipe's lines into `sink`, then `end` (if given) at end of file."""
    for line in stream:
        sink(line.rstrip("\n"))
    if end is not None:
        sink(end)


@dataclass
class OverallProgress:
    """Maps stage progress to one 0-100 value across a pipeline's stages, each stage
    weighted by its usual share of the time (protocol.STAGE_WEIGHTS).

    The pipeline emits stage "pipeline" with done = stages finished so far, total =
    stage count and message = the starting stage's name; other stages' progress fills
    the current stage's share.
    """

    base: float = 0.0
    span: float = 1.0

    def update(self, event: Event) -> float | None:
        total = event.get("total") or 0
        done = min(event.get("done") or 0, total) if total else 0
        if event.get("stage") == "pipeline" and total:
            weights = _stage_weights(total, done, event.get("message", ""))
            self.base = sum(weights[:done]) / sum(weights)
            self.span = weights[done] / sum(weights) if done < total else 0.0
            return 100.0 * self.base
        if not total:
            return None
        return 100.0 * min(1.0, self.base + self.span * done / total)


def _stage_weights(total: int, done: int, name: str) -> list[float]:
    """The weights of a pipeline of `total` stages whose stage `done` is `name`; equal when unknown."""
    for stages in (STAGES_TRAIN, STAGES_OSM, STAGES_PREDICT):
        if len(stages) == total and (done >= total or stages[done] == name):
            return [STAGE_WEIGHTS[s] for s in stages]
    return [1.0] * total


@dataclass
class EngineRun:
    """One engine command. `run()` blocks; `cancel()` may be called from any thread."""

    python: Path | str
    args: list[str]
    root: Path = PACKAGE_ROOT
    cwd: Path | None = None
    # Extra environment for the engine, e.g. LANDCOVER_HTTP_HEADERS with credentials:
    # never on the command line or in a file, and kept out of repr (logs).
    extra_env: dict[str, str] = field(default_factory=dict, repr=False)
    # Filled in while it runs:
    proc: subprocess.Popen | None = field(default=None, init=False)
    result: Event | None = field(default=None, init=False)
    error: Event | None = field(default=None, init=False)
    stderr_tail: deque = field(default_factory=lambda: deque(maxlen=40), init=False)  # for crash reports
    _lines: queue.Queue = field(default_factory=queue.Queue, init=False)
    _cancel_requested: bool = field(default=False, init=False)
    _readers: list = field(default_factory=list, init=False)

    @property
    def command(self) -> list[str]:
        return [str(self.python), "-m", "landcover_plugin.engine", "--json", *self.args]

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, bufsize=1, cwd=self.cwd, env={**engine_env(self.root), **self.extra_env},
                start_new_session=(sys.platform != "win32"))  # own group: cancel reaches its children
        except OSError as exc:
            raise EngineFailed("ENGINE_MISSING", f"The landcover engine environment is missing: {self.python} "
                               f"cannot be started ({exc.strerror}). {MISSING_HINT}", "") from None
        # Reader threads: the caller's loop never blocks on a silent engine, so
        # it can notice a cancel at any time (select() does not work on Windows pipes).
        self._readers = [threading.Thread(target=_pump, args=(self.proc.stdout, self._lines.put, _EOF), daemon=True),
                         threading.Thread(target=_pump, args=(self.proc.stderr, self.stderr_tail.append), daemon=True)]
        for reader in self._readers:
            reader.start()

    def events(self, poll_s: float = 0.2) -> Iterator[Event | None]:
        """Parsed events as they come; None after each `poll_s` of silence."""
        while True:
            try:
                line = self._lines.get(timeout=poll_s)
            except queue.Empty:
                yield None
                continue
            if line is _EOF:
                return
            event = parse_event(line)
            if event is None:
                if line.strip():
                    self.stderr_tail.append(line)  # stray print from a library
                continue
            if event["event"] == "result":
                self.result = event
            elif event["event"] == "error":
                self.error = event
            yield event

    def cancel(self, grace_s: float = 5.0) -> None:
        """SIGTERM (the engine removes its partial output and exits), then kill."""
        self._cancel_requested = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        if sys.platform != "win32":
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                return
            except OSError:
                pass
        self.proc.kill()

    def run(self, on_event: Callable[[Event], None] | None = None,
            is_cancelled: Callable[[], bool] = lambda: False, poll_s: float = 0.2) -> Event:
        """Start, relay events to `on_event`, stop on `is_cancelled()`; return the
        result event or raise EngineFailed."""
        self.start()
        cancel_deadline = None
        try:
            for event in self.events(poll_s):
                if event is not None and on_event is not None:
                    on_event(event)
                if cancel_deadline is None and is_cancelled():
                    threading.Thread(target=self.cancel, daemon=True).start()
                    cancel_deadline = time.monotonic() + 6.0
                if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                    break  # a killed engine's grandchild may hold the pipe open: stop reading
        except BaseException:
            self.cancel()  # the caller itself failed (e.g. on_event raised): leave no engine behind
            raise
        self.proc.wait(timeout=10 if cancel_deadline is not None else None)
        self._close_pipes()
        return self.outcome()

    def _close_pipes(self) -> None:
        """Close our ends once the readers are done (else each run leaves a ResourceWarning).
        A reader still blocked (a killed engine's grandchild holds the pipe) keeps its pipe."""
        for reader, stream in zip(self._readers, (self.proc.stdout, self.proc.stderr)):
            reader.join(timeout=1.0)
            if not reader.is_alive():
                stream.close()

    def outcome(self) -> Event:
        if self._cancel_requested:
            raise EngineFailed("CANCELLED", "Cancelled; the engine stopped and kept no partial output.",
                               "Run it again to redo it; finished stages are reused.")
        if self.error is not None:
            raise EngineFailed(self.error.get("code", "INTERNAL"), self.error.get("message", ""),
                               self.error.get("hint", ""))
        if self.proc.returncode != 0 or self.result is None:
            tail = "\n".join(list(self.stderr_tail)[-10:])
            raise EngineFailed("ENGINE_CRASHED", f"The engine stopped with exit code {self.proc.returncode} "
                               "without reporting a result.", f"Its last output:\n{tail}" if tail else "")
        return self.result
