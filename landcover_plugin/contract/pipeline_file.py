"""The pipeline file: the one job description the plugin writes and `landcover run` reads.

Written as JSON, which is valid YAML (QGIS's Python may lack PyYAML); the engine
reads it with a YAML parser, so hand-written files may use YAML. Relative paths
are relative to the file's folder; `model:` is a model folder or .onnx file, or
the name of a shipped model (as `--model` on the command line). Its checks live
here, once: `from_dict` for the file's shape (unknown keys name the nearest valid
one), `problems` for what the job asks.

    task: trees | landcover | buildings | classification
    aoi: minx,miny,maxx,maxy          (in aoi_crs, default WGS84) or a vector file
    imagery: SOURCE or {source: SOURCE, gsd: M, zoom: Z, max_zoom: Z, headers: {NAME: VALUE}}
    labels: FILE or {path, class_field, reviewed_area} or {preset, osm_file} or {preset, overpass, date}
                                      (reviewed_area: minx,miny,maxx,maxy in aoi_crs or a vector file: the
                                       labels are complete there, e.g. corrected crowns; only it is trained on)
    model: MODEL                      (instead of labels: predict only)
    train: {epochs, batch_size, chip_size, seed, base: MODEL, remote: HOST, ssh_config, ssh_identity}
                                      (base: fine-tune this model; remote: over ssh)
    predict: {scheduler: tcp://HOST:PORT}  (predict on a Dask cluster; tls:// with Dask's TLS configuration)
    workdir: DIR                      (default OUT-work beside out)
    out: RESULT.gpkg
"""
from __future__ import annotations

import datetime
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .names import MODELS_DIR, OSM_SUFFIXES, OVERPASS_DEFAULT
from .tasks import TASK_IDS

KEYS = ("task", "aoi", "aoi_crs", "imagery", "labels", "model", "train", "predict", "workdir", "out")
IMAGERY_KEYS = ("source", "gsd", "zoom", "max_zoom", "headers")
LABEL_KEYS = ("path", "class_field", "reviewed_area", "preset", "osm_file", "overpass", "date")
TRAIN_NUMBERS = ("epochs", "batch_size", "chip_size", "seed")
TRAIN_KEYS = (*TRAIN_NUMBERS, "base", "remote", "ssh_config", "ssh_identity")
PREDICT_KEYS = ("scheduler",)
SCHEDULER_SCHEMES = ("tcp://", "tls://")
HINT = "See the pipeline file example in the README."
LABELS_HINT = ("E.g. labels: {path: crowns.gpkg}, or labels: {preset: landcover, overpass: "
               f"{OVERPASS_DEFAULT}, date: 2020-06-01}}, or {{preset: trees, osm_file: area.osm.pbf}}.")


class PipelineFileError(ValueError):
    """A pipeline file that cannot be run: what is wrong and how to fix it."""

    def __init__(self, message: str, hint: str = HINT) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass
class PipelineFile:
    task: str  # one of tasks.TASK_IDS
    imagery: str  # XYZ or WMS URL, or a raster path
    out: Path  # the result GeoPackage
    workdir: Path | None = None  # intermediate files, reused by a rerun (None: OUT-work beside out)
    aoi: str | tuple[float, float, float, float] | None = None  # "minx,miny,maxx,maxy" or a vector file
    aoi_crs: str = "EPSG:4326"
    gsd: float | None = None  # metres per pixel for tiles (None: the engine picks)
    zoom: int | None = None
    max_zoom: int | None = None  # the XYZ source's last zoom level (its QGIS connection's)
    headers: dict[str, str] = field(default_factory=dict)  # extra HTTP headers (no secrets: see HEADERS_ENV)
    labels: Path | None = None  # vector file, DeepForest CSV, VOC XML or points: train on them
    class_field: str | None = None
    # The labels are complete inside this area (the user reviewed it): training takes only it.
    reviewed_area: str | tuple[float, float, float, float] | None = None
    preset: str | None = None  # OSM labels: which features and classes (resources/presets)
    osm_file: Path | None = None  # OSM labels from a file (.osm, .osm.pbf, .osm.bz2)
    overpass: str | None = None  # ... or from an Overpass API endpoint
    date: str | None = None  # Overpass: OSM as it was on this day (YYYY-MM-DD), e.g. the imagery's
    model: Path | str | None = None  # or predict with an existing model (a path, or a shipped model's name)
    epochs: int = 20
    batch_size: int = 8
    chip_size: int | None = None  # written under train:, used by the dataset stage (None: from the labels)
    seed: int = 0
    base: Path | str | None = None  # fine-tune this model (a path, or a shipped model's name)
    remote: str | None = None  # train on this ssh host (`landcover remote setup HOST`)
    ssh_config: Path | None = None  # ... with this ssh config instead of ~/.ssh/config
    ssh_identity: Path | None = None  # ... and this private key file (its path only)
    scheduler: str | None = None  # a Dask scheduler's address: predict on its workers

    @property
    def osm(self) -> bool:
        """Labels come from OpenStreetMap (then the results carry its attribution)."""
        return self.osm_file is not None or bool(self.overpass)

    @property
    def is_remote(self) -> bool:
        return self.imagery.startswith(("http://", "https://"))

    @property
    def work(self) -> Path:
        return self.workdir or self.out.with_name(self.out.stem + "-work")

    def problems(self) -> list[str]:
        """What is wrong with the job, in words for the user (empty: fine)."""
        found = []
        if self.task not in TASK_IDS:
            found.append(f"Unknown task '{self.task}': use one of {', '.join(TASK_IDS)}.")
        if isinstance(self.aoi, tuple) and not (self.aoi[0] < self.aoi[2] and self.aoi[1] < self.aoi[3]):
            found.append("The area is empty: draw a rectangle on the map (or give aoi: minx,miny,maxx,maxy).")
        if not self.imagery:
            found.append("No imagery: choose a raster layer or an XYZ connection (imagery: in the file).")
        sources = [name for name, value in (("path", self.labels), ("osm_file", self.osm_file),
                                            ("overpass", self.overpass)) if value]
        if not sources and not self.model:
            found.append("The pipeline has neither labels nor a model: choose a labels layer (to train) or "
                         "a model file (to predict).")
        if len(sources) > 1:
            found.append(f"labels has {' and '.join(sources)}: give only one source.")
        if self.osm and not self.preset:
            found.append("OpenStreetMap labels need a preset: choose which features to take (e.g. landcover).")
        if self.overpass and not self.overpass.startswith(("http://", "https://")):
            found.append(f"The Overpass endpoint '{self.overpass}' is not an http(s) URL, e.g. {OVERPASS_DEFAULT}.")
        if self.osm_file is not None and not str(self.osm_file).lower().endswith(OSM_SUFFIXES):
            found.append(f"{self.osm_file.name} is not an OpenStreetMap file ({', '.join(OSM_SUFFIXES)}).")
        if self.date:
            found += _date_problems(self.date, sources)
        if (self.reviewed_area or self.base) and self.labels is None:
            found.append("A reviewed area and a base model go with labels of your own (labels: {path: ...}).")
        if self.base and self.model:
            found.append("Give either a model to predict with or a base model to fine-tune, not both.")
        if self.scheduler is not None and not self.scheduler.startswith(SCHEDULER_SCHEMES):
            found.append(f"The scheduler '{self.scheduler}' is not a Dask address: give tcp://HOST:PORT "
                         "(or tls://HOST:PORT).")
        return found

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "task": self.task,
            "imagery": {"source": self.imagery, "gsd": self.gsd, "zoom": self.zoom, "max_zoom": self.max_zoom,
                        "headers": self.headers},
            "train": {"epochs": self.epochs, "batch_size": self.batch_size, "chip_size": self.chip_size,
                      "seed": self.seed, **{k: str(v) for k, v in (("base", self.base), ("remote", self.remote),
                                                                   ("ssh_config", self.ssh_config),
                                                                   ("ssh_identity", self.ssh_identity)) if v}},
            "workdir": str(self.work),
            "out": str(self.out),
        }
        if self.aoi is not None:
            spec["aoi"] = _area_text(self.aoi)
            spec["aoi_crs"] = self.aoi_crs
        if self.labels is not None:
            spec["labels"] = {"path": str(self.labels), "class_field": self.class_field or None}
            if self.reviewed_area is not None:
                spec["labels"]["reviewed_area"] = _area_text(self.reviewed_area)
        elif self.osm_file is not None:
            spec["labels"] = {"preset": self.preset, "osm_file": str(self.osm_file)}
        elif self.overpass:  # the date applies to Overpass only (an OSM file is of its own date)
            spec["labels"] = {"preset": self.preset, "overpass": self.overpass,
                              **({"date": self.date} if self.date else {})}
        if self.model is not None:
            spec["model"] = str(self.model)
        if self.scheduler:
            spec["predict"] = {"scheduler": self.scheduler}
        return spec

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, spec: Any, base: Path) -> "PipelineFile":
        """A parsed pipeline file; relative paths are taken from `base`, the file's folder."""
        if not isinstance(spec, dict):
            raise PipelineFileError("The pipeline is not a mapping of keys to values.")
        _check_keys(spec, KEYS, "")
        missing = [k for k in ("task", "imagery", "out") if k not in spec]
        if missing:
            raise PipelineFileError(f"The pipeline lacks {', '.join(missing)}.")
        imagery = spec["imagery"] if isinstance(spec["imagery"], dict) else {"source": spec["imagery"]}
        labels = spec.get("labels") or {}
        labels = {"path": labels} if isinstance(labels, str) else labels
        train = spec.get("train") or {}
        predict = spec.get("predict") or {}
        for name, section, keys in (("imagery", imagery, IMAGERY_KEYS), ("labels", labels, LABEL_KEYS),
                                    ("train", train, TRAIN_KEYS), ("predict", predict, PREDICT_KEYS)):
            if not isinstance(section, dict):
                raise PipelineFileError(f"{name} is neither a value nor a mapping.",
                                        LABELS_HINT if name == "labels" else HINT)
            _check_keys(section, keys, name)
        source = str(imagery.get("source") or "")
        out = _path(base, spec["out"])
        return cls(
            task=str(spec["task"]),
            imagery=source if "://" in source else str(_path(base, source) or ""),
            out=out,
            workdir=_path(base, spec.get("workdir")),
            aoi=str(spec["aoi"]) if spec.get("aoi") not in (None, "") else None,
            aoi_crs=str(spec.get("aoi_crs") or "EPSG:4326"),
            gsd=_number(imagery, "gsd", float), zoom=_number(imagery, "zoom", int),
            max_zoom=_number(imagery, "max_zoom", int),
            headers={str(k): str(v) for k, v in (imagery.get("headers") or {}).items()},
            labels=_path(base, labels.get("path")),
            class_field=labels.get("class_field") or None,
            reviewed_area=_area(base, labels.get("reviewed_area")),
            preset=labels.get("preset"),
            osm_file=_path(base, labels.get("osm_file")),
            overpass=labels.get("overpass"),
            date=str(labels["date"]) if labels.get("date") else None,  # YAML reads 2020-06-01 as a date
            model=_model(base, spec.get("model")),
            base=_model(base, train.get("base")),
            remote=str(train["remote"]) if train.get("remote") else None,
            ssh_config=_path(base, train.get("ssh_config")),
            ssh_identity=_path(base, train.get("ssh_identity")),
            scheduler=str(predict["scheduler"]) if predict.get("scheduler") else None,
            **{k: _number(train, k, int, default=getattr(cls, k)) for k in TRAIN_NUMBERS},
        )


def _area_text(area: str | tuple[float, float, float, float]) -> str:
    return area if isinstance(area, str) else ",".join(repr(float(v)) for v in area)


def _area(base: Path, value: Any) -> str | None:
    """Four numbers as they are, else a vector file beside the pipeline file."""
    if value in (None, ""):
        return None
    text = str(value)
    return text if len(text.split(",")) == 4 else str(_path(base, text))


def _check_keys(section: dict, known: tuple[str, ...], where: str) -> None:
    """Typos are errors (an ignored `trian:` would train with defaults): name the nearest valid key."""
    unknown = sorted(str(k) for k in set(section) - set(known))
    if not unknown:
        return
    nearest = [f"'{k}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, known, 1, 0.6))
               else f"'{k}'" for k in unknown]
    label = f"{where} key(s)" if where else "key(s)"
    raise PipelineFileError(f"Unknown {label}: {', '.join(unknown)}; {', '.join(nearest)}. "
                            f"Known: {', '.join(known)}.", LABELS_HINT if where == "labels" else HINT)


def _date_problems(date: str, sources: list[str]) -> list[str]:
    found = []
    if sources != ["overpass"]:
        found.append("labels date applies to Overpass only (OSM as it was on that date): use date with "
                     "overpass: URL, or take an OSM file of that date.")
    try:
        datetime.datetime.fromisoformat(date)  # a day, or Overpass's full timestamp (2021-06-01T00:00:00Z)
    except ValueError:
        found.append(f"The date '{date}' is not a day as YYYY-MM-DD, e.g. 2021-06-01.")
    return found


def _number(section: dict, key: str, kind: type, default: Any = None) -> Any:
    value = section.get(key)
    if value in (None, ""):
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise PipelineFileError(f"{key} '{value}' is not a number.", f"Give e.g. {key}: {default or 1}.") from None


def _path(base: Path, value: Any) -> Path | None:
    return None if value in (None, "") else (Path(base) / str(value)).resolve()


def _model(base: Path, value: Any) -> Path | str | None:
    """A model beside the file, else a shipped model of that name (as `--model NAME`)."""
    if value in (None, ""):
        return None
    path = _path(base, value)
    if not path.exists() and len(Path(str(value)).parts) == 1 and (MODELS_DIR / str(value)).is_dir():
        return str(value)
    return path
