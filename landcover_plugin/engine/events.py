"""The engine's side of the event stream (contract/protocol.py).

With `--json`, one JSON event per line on stdout; without it, a progress bar
and plain lines on stderr, results on stdout.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Reporter:
    json_mode: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    _last_bar: float = 0.0

    def _emit(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event, default=str) + "\n")
        self.out.flush()

    def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self.json_mode:
            self._emit({"event": "progress", "stage": stage, "done": done, "total": total, "message": message})
            return
        now = time.monotonic()
        if done < total and now - self._last_bar < 0.1:
            return  # redraw at most 10 times a second
        self._last_bar = now
        share = done / total if total else 1.0
        bar = "#" * int(30 * share)
        end = "\n" if done >= total else ""
        if self.err.isatty():
            self.err.write(f"\r{stage:>8} [{bar:<30}] {done}/{total} {message[:40]:<40}{end}")
        elif done >= total:
            self.err.write(f"{stage}: {done}/{total} {message}\n")
        self.err.flush()

    def log(self, message: str, level: str = "info") -> None:
        if self.json_mode:
            self._emit({"event": "log", "level": level, "message": message})
        else:
            self.err.write(f"{level if level != 'info' else ''}{': ' if level != 'info' else ''}{message}\n")
            self.err.flush()

    def result(self, stage: str, outputs: dict[str, Any], summary: dict[str, Any] | None = None) -> None:
        summary = summary or {}
        if self.json_mode:
            self._emit({"event": "result", "stage": stage, "outputs": outputs, "summary": summary})
            return
        self.out.write(f"{stage} done\n")
        for key, value in {**summary, **outputs}.items():
            if isinstance(value, dict):  # a pipeline's per-stage summaries
                value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            self.out.write(f"  {key}: {value}\n")
        self.out.flush()

    def error(self, code: str, message: str, hint: str = "") -> None:
        if self.json_mode:
            self._emit({"event": "error", "code": code, "message": message, "hint": hint})
        else:
            self.err.write(f"error: {message}\n" + (f"  hint: {hint}\n" if hint else ""))
            self.err.flush()


@dataclass
class StageResult:
    """What a stage returns: output paths and summary numbers for the result event."""

    outputs: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
