"""Models as things a user keeps: each trained model in its own named, dated folder,
a list of the shipped and earlier ones, and the checks that refuse a model that
does not fit the job. No Qt here: the dock passes the folders in."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..contract.model_file import ModelSummary, NotAModel, read_summary
from ..contract.names import MODELS_DIR
from ..contract.tasks import task as task_info

MODELS_FOLDER = "models"  # under the project's landcover/ folder or the profile's


def list_models(folders: list[Path], shipped: Path = MODELS_DIR) -> list[ModelSummary]:
    """Every readable model in `folders` (each subfolder holding a model.onnx), newest
    first, then the shipped ones; unreadable folders are skipped."""
    found: list[ModelSummary] = []
    seen: set[Path] = set()
    for folder in [*folders, shipped]:
        candidates = sorted(Path(folder).glob("*/model.onnx"), key=lambda p: p.stat().st_mtime, reverse=True) \
            if Path(folder).is_dir() else []
        for onnx in candidates:
            if onnx.resolve() in seen:
                continue
            seen.add(onnx.resolve())
            try:
                found.append(read_summary(onnx))
            except (NotAModel, OSError):
                continue
    return found


def describe(model: ModelSummary) -> str:
    """One line for the model list: 'trees-20261206-1405 — trees, 0.1 m, 3 bands, crown F1 0.61'."""
    parts = [task_info(model.task).label if model.task else "unknown task",
             f"{model.resolution_m:g} m" if model.resolution_m else "",
             f"{model.band_count} bands" if model.band_count else "", model.score]
    return f"{model.folder.name} — {', '.join(p for p in parts if p)}"


def model_problems(model: ModelSummary, task: str, band_count: int | None) -> list[str]:
    """Why this model cannot run the job (empty: it can)."""
    found = []
    if model.task and model.task != task:
        found.append(f"The model {model.folder.name} maps {task_info(model.task).label.lower()}, not "
                     f"{task_info(task).label.lower()}: choose a {task_info(task).label.lower()} model or "
                     "change the task.")
    if band_count and model.band_count and band_count != model.band_count:
        found.append(f"The model {model.folder.name} reads {model.band_count} bands; the imagery has "
                     f"{band_count}: choose imagery with {model.band_count} bands or another model.")
    return found


def next_version(base: Path | str) -> str:
    """The name of a model fine-tuned from `base` on the user's corrections: trees-base -> trees-base-v2,
    trees-base-v2 -> trees-base-v3 (the base is version 1)."""
    name = Path(base).parent.name if Path(base).suffix == ".onnx" else Path(base).name
    stem, _, number = name.rpartition("-v")
    return f"{stem}-v{int(number) + 1}" if stem and number.isdigit() else f"{name}-v2"


def keep_model(model_folder: Path, models_dir: Path, task: str, when: float | None = None,
               name: str | None = None) -> Path:
    """Copy a run's trained model into its own folder under `models_dir` (the next run of the task
    overwrites the work folder's), named `name` or by task and date, whole or not at all; the new folder."""
    first = models_dir / (name or f"{task}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}")
    target, n = first, 1
    while target.exists():
        n += 1
        target = first.with_name(f"{first.name}-{n}")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(model_folder, partial, ignore=shutil.ignore_patterns(".landcover-output", "*.partial"))
    partial.rename(target)
    return target
