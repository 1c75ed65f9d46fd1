"""The pipeline file the plugin hands to `landcover run` (see engine/pipeline.py).

Written as JSON, which is valid YAML: QGIS's Python may lack PyYAML.
Pure Python, shared by the dock and the Processing algorithm.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("trees", "landcover")


@dataclass
class PipelineSpec:
    task: str  # one of TASKS
    aoi: tuple[float, float, float, float]  # minx, miny, maxx, maxy in aoi_crs
    aoi_crs: str  # "EPSG:xxxx"
    imagery: str  # XYZ URL template or raster path
    out: Path  # result GeoPackage
    workdir: Path  # intermediate files; reused by a rerun (the engine resumes)
    labels: Path | None = None  # vector file or DeepForest CSV: train on them
    class_field: str | None = None
    model: Path | None = None  # or predict with an existing model
    epochs: int = 10
    chip_size: int = 128
    gsd: float | None = None  # metres per pixel for XYZ tiles (None: the engine picks)
    zoom: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What is wrong with the spec, in words for the user (empty: fine)."""
        found = []
        if self.task not in TASKS:
            found.append(f"Unknown task '{self.task}': choose trees or land cover.")
        minx, miny, maxx, maxy = self.aoi
        if not (minx < maxx and miny < maxy):
            found.append("The area is empty: draw a rectangle on the map.")
        if not self.imagery:
            found.append("No imagery: choose a raster layer or an XYZ connection.")
        if self.labels is None and self.model is None:
            found.append("No labels and no model: choose a labels layer (to train) or a model file (to predict).")
        if self.task == "landcover" and self.labels is not None and not self.class_field \
                and self.labels.suffix.lower() != ".csv":
            found.append("Land cover needs the labels' class field: choose the attribute holding the class.")
        return found

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "task": self.task,
            "aoi": ",".join(repr(float(v)) for v in self.aoi),
            "aoi_crs": self.aoi_crs,
            "imagery": {"source": self.imagery, "gsd": self.gsd, "zoom": self.zoom, "headers": self.headers},
            "train": {"epochs": self.epochs, "chip_size": self.chip_size},
            "workdir": str(self.workdir),
            "out": str(self.out),
        }
        if self.labels is not None:
            spec["labels"] = {"path": str(self.labels), "class_field": self.class_field or None}
        else:
            spec["model"] = str(self.model)
        return spec


def write_pipeline(spec: PipelineSpec, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return path
