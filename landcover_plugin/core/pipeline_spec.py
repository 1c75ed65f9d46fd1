"""The pipeline file the plugin hands to `landcover run` (see engine/pipeline.py).

Written as JSON, which is valid YAML: QGIS's Python may lack PyYAML.
Pure Python, shared by the dock and the Processing algorithm.
"""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("trees", "landcover", "buildings", "classification")
OVERPASS_DEFAULT = "https://overpass-api.de/api/interpreter"  # the public instance; users may run their own
OSM_ATTRIBUTION = "© OpenStreetMap contributors"
OSM_SUFFIXES = (".osm", ".osm.pbf", ".osm.bz2", ".pbf")
PRESETS_DIR = Path(__file__).resolve().parents[1] / "resources" / "presets"


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


def presets_for_task(task: str, folder: Path = PRESETS_DIR) -> list[PresetInfo]:
    """Presets that fit a task: those made for it, and for trees the one named so
    (its tree polygons serve as crowns); the task's namesake first, then landcover."""
    fit = [p for p in read_presets(folder)
           if p.task == task or p.name == task or (task == "classification" and p.task == "landcover")]
    return sorted(fit, key=lambda p: (p.name != task, p.name != "landcover", p.name))


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
    preset: str | None = None  # OSM labels: which features and classes (resources/presets)
    osm_file: Path | None = None  # OSM labels from a file (.osm, .osm.pbf, .osm.bz2)
    overpass: str | None = None  # or from an Overpass API endpoint
    date: str | None = None  # Overpass: OSM as it was on this day (YYYY-MM-DD), e.g. the imagery's date
    model: Path | None = None  # or predict with an existing model
    epochs: int = 10
    chip_size: int = 128
    gsd: float | None = None  # metres per pixel for XYZ tiles (None: the engine picks)
    zoom: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def osm(self) -> bool:
        """Labels come from OpenStreetMap (then the results carry its attribution)."""
        return self.osm_file is not None or bool(self.overpass)

    def problems(self) -> list[str]:
        """What is wrong with the spec, in words for the user (empty: fine)."""
        found = []
        if self.task not in TASKS:
            found.append(f"Unknown task '{self.task}': choose one of {', '.join(TASKS)}.")
        minx, miny, maxx, maxy = self.aoi
        if not (minx < maxx and miny < maxy):
            found.append("The area is empty: draw a rectangle on the map.")
        if not self.imagery:
            found.append("No imagery: choose a raster layer or an XYZ connection.")
        if self.labels is None and self.model is None and not self.osm:
            found.append("No labels and no model: choose a labels layer (to train) or a model file (to predict).")
        found += self._osm_problems()
        if self.task in ("landcover", "classification") and self.labels is not None and not self.class_field \
                and self.labels.suffix.lower() != ".csv":
            found.append("Land cover needs the labels' class field: choose the attribute holding the class.")
        return found

    def _osm_problems(self) -> list[str]:
        found = []
        if self.osm and not self.preset:
            found.append("OpenStreetMap labels need a preset: choose which features to take (e.g. landcover).")
        if self.overpass and not self.overpass.startswith(("http://", "https://")):
            found.append(f"The Overpass endpoint '{self.overpass}' is not an http(s) URL, e.g. {OVERPASS_DEFAULT}.")
        if self.osm_file is not None and not str(self.osm_file).lower().endswith(OSM_SUFFIXES):
            found.append(f"{self.osm_file.name} is not an OpenStreetMap file (.osm, .osm.pbf, .osm.bz2).")
        elif self.osm_file is not None and not self.osm_file.is_file():
            found.append(f"The OpenStreetMap file {self.osm_file} does not exist.")
        if self.date:
            try:
                datetime.date.fromisoformat(self.date)
            except ValueError:
                found.append(f"The date '{self.date}' is not a day as YYYY-MM-DD, e.g. 2021-06-01.")
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
        elif self.osm_file is not None:
            spec["labels"] = {"preset": self.preset, "osm_file": str(self.osm_file)}
        elif self.overpass:  # the date applies to Overpass only (an OSM file is of its own date)
            date = {"date": self.date} if self.date else {}
            spec["labels"] = {"preset": self.preset, "overpass": self.overpass, **date}
        else:
            spec["model"] = str(self.model)
        return spec


def write_pipeline(spec: PipelineSpec, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return path
