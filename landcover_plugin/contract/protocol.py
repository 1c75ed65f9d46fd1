"""The engine's event stream: `landcover --json COMMAND ...` writes one JSON object per line.

    {"event": "progress", "stage": "fetch", "done": 3, "total": 12, "message": ""}
    {"event": "log", "level": "info", "message": "..."}
    {"event": "result", "stage": "predict", "outputs": {...}, "summary": {...}}
    {"event": "error", "code": "AOI_OUTSIDE_IMAGERY", "message": "...", "hint": "..."}

`stage: "pipeline"` progress marks the start of stage `done` of `total` (`message`
names it). `result` is the last line of a successful run, `error` of a failed one.
Exit codes: 0 done, 1 a bug, 2 bad input (the error says how to fix it), 130 cancelled.
"""
from __future__ import annotations

import json
from typing import Any

Event = dict[str, Any]

# The stages of `landcover run`, in order: training on labels (from a file or OSM), or predicting with a model.
STAGES_TRAIN = ("fetch", "dataset", "train", "predict")
STAGES_OSM = ("fetch", "labels", "dataset", "train", "predict")
STAGES_PREDICT = ("fetch", "predict")
# Each stage's share of a run's time, for one honest progress bar. Measured on the dock's first run
# (trees, 10 epochs, a 35 m area, 2 cores): fetch 3 %, dataset 2 %, train 91 %, predict 4 %; fetch,
# labels and predict get more room because they grow with the area, training does not.
STAGE_WEIGHTS = {"fetch": 8.0, "labels": 4.0, "dataset": 4.0, "train": 76.0, "predict": 8.0}
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


def parse_event(line: str) -> Event | None:
    """Parse one line of the stream; None for a line that is not an event
    (a library printing to stdout must not break the reader)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
