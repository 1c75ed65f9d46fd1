"""The one job recipe the dock and the Processing algorithm share: the user's
choices -> a pipeline file (contract/pipeline_file.py) -> an engine run, and
the engine's events -> progress, stage text and log lines."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsCoordinateTransformContext,
                       QgsRectangle, QgsSettings)

from ..contract.pipeline_file import PipelineFile
from ..contract.runner import EngineRun, OverallProgress
from .engine_env import EngineLocation

QUICK_EPOCHS = 10  # the dock's and Processing's default: a first result in minutes on a laptop
SCHEDULER_SETTING = "landcover/scheduler"  # optional Dask scheduler address: predict runs on its workers

# Where training labels come from; Processing's enum takes this order (its index 0 stays "layer").
LABEL_SOURCES = {"layer": "My vector layer",
                 "overpass": "OpenStreetMap (downloaded for the area)",
                 "osm_file": "OpenStreetMap file (.osm, .osm.pbf, .osm.bz2)",
                 "model": "No labels: map with an existing model"}

# The engine's command-line words, as the dock and Processing name the same things.
_DOCK_WORDS = (("--class-field", "Class field"), ("--osm-file", "OSM file"), ("--labels", "Labels layer"),
               ("--model", "Model"), ("--epochs", "Epochs"), ("--aoi", "Area"), ("--imagery", "Imagery"),
               ("--gsd", "Resolution"), ("--zoom", "Resolution"), ("--preset", "OSM features"),
               ("--overpass", "Overpass server"), ("--date", "OSM date"), ("--out", "Output folder"),
               ("made by `landcover train`", "trained by Landcover"), ("`landcover train`", "a Landcover training"))
_STAGES = {"fetch": "Fetching the imagery", "labels": "Downloading the OpenStreetMap labels",
           "dataset": "Cutting training chips", "train": "Training", "predict": "Mapping", "done": "Finishing"}

Bbox = tuple[float, float, float, float]


def aoi_for_engine(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                   context: QgsCoordinateTransformContext) -> tuple[Bbox, str]:
    """The area in its own CRS when that has an EPSG code (the engine reads those), else in WGS84."""
    if not crs.authid().upper().startswith("EPSG:"):
        wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
        rect = QgsCoordinateTransform(crs, wgs84, context).transformBoundingBox(rect)
        crs = wgs84
    return (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()), crs.authid()


def problems(job: PipelineFile) -> list[str]:
    """The pipeline file's own checks, and two the plugin makes before starting: land cover
    from the user's vectors needs the field holding the class, and the OSM file must exist."""
    found = job.problems()
    if job.task in ("landcover", "classification") and job.labels is not None and not job.class_field \
            and job.labels.suffix.lower() != ".csv":
        found.append("Land cover needs the labels' class field: choose the attribute holding the class.")
    if job.osm_file is not None and not job.osm_file.is_file():
        found.append(f"The OpenStreetMap file {job.osm_file} does not exist.")
    return found


def scheduler_setting() -> str | None:
    """The Dask scheduler the dock and Processing predict on (set in the dock), or None: here."""
    return str(QgsSettings().value(SCHEDULER_SETTING, "") or "").strip() or None


def workers_note(summary: dict) -> str:
    """What the result message adds when the prediction ran on a Dask cluster."""
    workers = (summary.get("predict") or {}).get("workers")
    return f"; predicted on {workers} Dask worker{'s' if workers != 1 else ''}" if workers else ""


def pipeline_path(job: PipelineFile) -> Path:
    """The pipeline file beside the result: a user finds it there to rerun or edit the job."""
    return job.out.with_name(job.out.stem + "-pipeline.yaml")


def engine_run(job: PipelineFile, location: EngineLocation, secrets: dict[str, str]) -> EngineRun:
    """Write the pipeline file and return the `landcover run` that runs it; credentials go
    in `secrets`, to the engine's environment only, never into the file, argv or a log."""
    path = job.write(pipeline_path(job))
    return EngineRun(location.python, ["run", str(path)], cwd=job.out.parent, extra_env=secrets)


def dock_words(text: str) -> str:
    """An engine message in the words of the dock (the full text goes to the log panel)."""
    for engine_word, dock_word in _DOCK_WORDS:
        text = text.replace(engine_word, f"'{dock_word}'" if engine_word.startswith("--") else dock_word)
    return text


def stage_text(stage: str, detail: str = "") -> str:
    """What the status line says while a stage runs: ("train", "epoch 3/300, 2m05s left (loss 0.21)") ->
    'Training: epoch 3/300, 2m05s left (loss 0.21)'; ("fetch",) -> 'Fetching the imagery…'."""
    name = _STAGES.get(stage, stage)
    return f"{name}: {detail}" if detail else f"{name}…"


@dataclass
class EventRelay:
    """Engine events -> a 0-100 progress value, what runs now (stage_text) and log lines:
    what a QgsTask and a Processing feedback both show."""

    set_progress: Callable[[float], None]
    log: Callable[[str, str], None]  # (message, level)
    set_stage: Callable[[str], None] = lambda name: None
    progress: OverallProgress = field(default_factory=OverallProgress)

    def __call__(self, event: dict) -> None:
        if event["event"] == "progress":
            value = self.progress.update(event)
            if value is not None:
                self.set_progress(value)
            if event.get("stage") == "pipeline" and event.get("message"):
                self.set_stage(stage_text(event["message"]))
            elif event.get("stage") == "train" and event.get("message"):  # epoch, time left and where it runs
                self.set_stage(stage_text("train", event["message"]))
        elif event["event"] == "log":
            self.log(event.get("message", ""), event.get("level", "info"))
