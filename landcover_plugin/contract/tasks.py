"""The tasks: one row each, read by the command line, the pipeline file, the dock,
Processing, the dataset, training, prediction and the styles."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .names import PRESETS_DIR


@dataclass(frozen=True)
class Task:
    id: str  # in pipeline files, on the command line, in model metadata
    label: str  # in the dock and Processing
    help: str  # one line for tooltips and help


TASKS: tuple[Task, ...] = (
    Task("trees", "Trees", "one polygon per crown and one point per tree"),
    Task("landcover", "Land cover", "polygons with a class, and hectares per class"),
    Task("buildings", "Buildings", "building footprints"),
    Task("classification", "Land cover per chip",
         "one class per square chip, for very large areas at coarse resolution"),
)
TASK_IDS: tuple[str, ...] = tuple(t.id for t in TASKS)


def task(task_id: str) -> Task:
    """The task of this id; ValueError names the known ones."""
    for t in TASKS:
        if t.id == task_id:
            return t
    raise ValueError(f"Unknown task '{task_id}': use one of {', '.join(TASK_IDS)}.")


@dataclass(frozen=True)
class PresetInfo:
    name: str
    description: str
    task: str


def read_presets(folder: Path = PRESETS_DIR) -> list[PresetInfo]:
    """The presets' names, descriptions and tasks, read from their top-level keys
    (QGIS's Python may lack PyYAML; the engine parses the rest)."""
    found = []
    for path in sorted(Path(folder).glob("*.yaml")):
        keys = dict(re.findall(r"^(name|description|task):[ \t]*(.*?)[ \t]*$", path.read_text(), re.M))
        found.append(PresetInfo(keys.get("name", path.stem).strip("'\""), keys.get("description", "").strip("'\""),
                                keys.get("task", "landcover").strip("'\"")))
    return found


def presets_for_task(task_id: str, folder: Path = PRESETS_DIR) -> list[PresetInfo]:
    """Presets that fit a task: those made for it, and for trees the one named so
    (its tree polygons serve as crowns); the task's namesake first, then landcover."""
    fit = [p for p in read_presets(folder)
           if p.task == task_id or p.name == task_id or (task_id == "classification" and p.task == "landcover")]
    return sorted(fit, key=lambda p: (p.name != task_id, p.name != "landcover", p.name))
