"""`landcover run PIPELINE.yaml`: the stages chained for one job.

imagery (fetch, or a local raster as is) -> [labels] -> dataset -> train -> predict.
With a `model` instead of `labels`, dataset and train are skipped. Labels are a
file (vector, DeepForest CSV, Pascal VOC, points), or OpenStreetMap: a preset
with an `osm_file` or an `overpass` endpoint (and `date`), made into a labels
GeoPackage by the labels stage, over the AOI (or the imagery's extent).

Each stage's output lands in `workdir` and is recorded with a fingerprint of
its inputs; a rerun (after a cancel or a failure) skips stages whose output
is already there for the same inputs, so interrupted work resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .aoi import AOI, parse_aoi
from .errors import EngineError
from .events import Reporter, StageResult, parse_event

STAGES_TRAIN = ("fetch", "dataset", "train", "predict")
STAGES_OSM = ("fetch", "labels", "dataset", "train", "predict")
STAGES_PREDICT = ("fetch", "predict")
LABEL_KEYS = ("path", "class_field", "preset", "osm_file", "overpass", "date")


@dataclass(frozen=True)
class Imagery:
    source: str  # XYZ URL template or raster path
    gsd: float | None = None
    zoom: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def is_remote(self) -> bool:
        return self.source.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Pipeline:
    task: str
    imagery: Imagery
    out: Path
    workdir: Path
    aoi: AOI | None = None
    labels: Path | None = None
    class_field: str | None = None
    preset: str | None = None  # fixes the classes; with osm_file/overpass, selects the OSM features
    osm_file: Path | None = None  # OSM labels: .osm, .osm.bz2, .osm.pbf
    overpass: str | None = None  # OSM labels: Overpass API interpreter URL
    date: str | None = None  # Overpass: OSM as it was on this date (the imagery's)
    model: Path | None = None
    epochs: int = 20
    batch_size: int = 8
    chip_size: int = 128
    seed: int = 0


def _path(base: Path, value: str | None) -> Path | None:
    return None if value in (None, "") else (base / str(value)).resolve()


def load_pipeline(path: Path) -> Pipeline:
    """Read PIPELINE.yaml; relative paths are relative to the file's folder."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EngineError("BAD_PIPELINE", f"Cannot read pipeline {path}: {exc}",
                          "Give a YAML file like the one in the README.") from None
    if not isinstance(spec, dict):
        raise EngineError("BAD_PIPELINE", f"Pipeline {path} is not a mapping.", "See the example in the README.")
    base = Path(path).resolve().parent
    missing = [k for k in ("task", "imagery", "out") if k not in spec]
    if missing:
        raise EngineError("BAD_PIPELINE", f"Pipeline {path} lacks {', '.join(missing)}.", "See the example in the README.")
    imagery = spec["imagery"] if isinstance(spec["imagery"], dict) else {"source": spec["imagery"]}
    source = str(imagery["source"])
    if not source.startswith(("http://", "https://")):
        source = str(_path(base, source))
    train = spec.get("train") or {}
    out = _path(base, spec["out"])
    labels, model = spec.get("labels") or {}, spec.get("model")
    if isinstance(labels, str):
        labels = {"path": labels}
    _check_labels(labels)
    if not (labels.get("path") or labels.get("osm_file") or labels.get("overpass")) and not model:
        raise EngineError("BAD_PIPELINE", "The pipeline has neither labels nor a model.",
                          "Give labels (to train a model) or a model (to predict with it).")
    if spec["task"] not in ("trees", "landcover", "buildings", "classification"):
        raise EngineError("BAD_PIPELINE", f"Unknown task '{spec['task']}'.",
                          "Use task: trees, landcover, buildings or classification.")
    return Pipeline(
        task=spec["task"],
        imagery=Imagery(source=source, gsd=imagery.get("gsd"), zoom=imagery.get("zoom"),
                        headers=dict(imagery.get("headers") or {})),
        out=out,
        workdir=_path(base, spec.get("workdir")) or out.with_name(out.stem + "-work"),
        aoi=parse_aoi(str(spec["aoi"]), spec.get("aoi_crs", "EPSG:4326")) if spec.get("aoi") else None,
        labels=_path(base, labels.get("path")),
        class_field=labels.get("class_field"),
        preset=labels.get("preset"),
        osm_file=_path(base, labels.get("osm_file")),
        overpass=labels.get("overpass"),
        date=str(labels["date"]) if labels.get("date") else None,  # YAML reads 2020-06-01 as a date
        model=_path(base, model),
        epochs=int(train.get("epochs", 20)),
        batch_size=int(train.get("batch_size", 8)),
        chip_size=int(train.get("chip_size", 128)),
        seed=int(train.get("seed", 0)),
    )


def _check_labels(labels: dict) -> None:
    """One source of labels: a file, or OSM (a preset with an OSM file or an Overpass endpoint)."""
    hint = ("E.g. labels: {path: crowns.gpkg}, or labels: {preset: landcover, overpass: "
            "https://overpass-api.de/api/interpreter, date: 2020-06-01}, or {preset: trees, osm_file: area.osm.pbf}.")
    if not isinstance(labels, dict):
        raise EngineError("BAD_PIPELINE", "labels is neither a file name nor a mapping.", hint)
    unknown = sorted(set(labels) - set(LABEL_KEYS))
    if unknown:
        raise EngineError("BAD_PIPELINE", f"Unknown labels key(s): {', '.join(unknown)}; "
                          f"known: {', '.join(LABEL_KEYS)}.", hint)
    sources = [k for k in ("path", "osm_file", "overpass") if labels.get(k)]
    if len(sources) > 1:
        raise EngineError("BAD_PIPELINE", f"labels has {' and '.join(sources)}: give only one source.", hint)
    if sources and sources[0] != "path" and not labels.get("preset"):
        raise EngineError("BAD_PIPELINE", "OpenStreetMap labels need a preset (which features, which classes).",
                          "Add preset: landcover, buildings or trees (or a preset YAML file). " + hint)
    if labels.get("date") and sources != ["overpass"]:
        raise EngineError("BAD_PIPELINE", "labels date applies to Overpass only (OSM as it was on that date).",
                          "Use date with overpass: URL, or take an OSM file of that date.")


def _imagery_aoi(imagery: Path) -> AOI:
    """The imagery's extent, where OSM labels are taken when the pipeline has no aoi."""
    from shapely.geometry import box

    from .imagery import open_raster

    with open_raster(imagery) as src:
        if src.crs is None:
            raise EngineError("BAD_IMAGERY", f"Imagery {imagery} has no CRS: OSM labels cannot be placed on it.",
                              "Georeference the imagery (e.g. gdal_translate -a_srs), or add aoi: to the pipeline.")
        return AOI(box(*src.bounds), src.crs.to_wkt())


def _fingerprint(params: Any) -> str:
    """Hash of a stage's parameters and of the files they name (size, mtime)."""
    def describe(value: Any) -> Any:
        if isinstance(value, Path) and value.exists():
            stat = value.stat()
            return [str(value), stat.st_size, stat.st_mtime_ns]
        if isinstance(value, AOI):
            return [value.geometry.wkt, value.crs]
        return str(value)
    # `out` is the stage's output, not an input: its name counts, its mtime must not
    items = {k: (str(v) if k == "out" else describe(v)) for k, v in vars(params).items()}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def _run_stage(name: str, params: Any, output: Path, run: Callable[[], StageResult],
               workdir: Path, reporter: Reporter) -> StageResult:
    """Run a stage unless its output exists for the same inputs (resume)."""
    from .atomic import write_text_atomic

    record = workdir / f".{name}.done.json"
    fingerprint = _fingerprint(params)
    if output.exists() and record.exists():
        try:  # a record torn by a crash or a full disk means "not done": the stage reruns
            saved = json.loads(record.read_text())
            done = saved["fingerprint"] == fingerprint
            result = StageResult(dict(saved["outputs"]), dict(saved["summary"]))
        except (OSError, ValueError, KeyError, TypeError):
            reporter.log(f"{name}: the record of an earlier run is unreadable; running the stage again",
                         level="warning")
            done = False
        if done:
            reporter.log(f"{name}: reusing {output} from an earlier run")
            return result
    result = run()
    # Whole or not at all: an empty record would otherwise block every later run.
    write_text_atomic(record, json.dumps({"fingerprint": fingerprint, "outputs": result.outputs,
                                          "summary": result.summary}, default=str))
    return result


def run_pipeline(p: Pipeline, reporter: Reporter) -> StageResult:
    from .atomic import run_lock

    if p.workdir.exists() and not p.workdir.is_dir():
        raise EngineError("BAD_WORKDIR", f"The pipeline's workdir {p.workdir} is a file, not a folder.",
                          "Give workdir: a folder (it is created), or move that file away.")
    # One run at a time per workdir: two would run the same stages into the same files.
    with run_lock(p.workdir / ".run.lock", f"the pipeline's workdir {p.workdir}"):
        return _run_pipeline(p, reporter)


def _run_pipeline(p: Pipeline, reporter: Reporter) -> StageResult:
    from .dataset import DatasetParams, build_dataset
    from .fetch import FetchParams, fetch
    from .predict import PredictParams, predict

    p.workdir.mkdir(parents=True, exist_ok=True)
    osm = p.osm_file is not None or p.overpass is not None
    stages = STAGES_PREDICT if p.model else STAGES_OSM if osm else STAGES_TRAIN
    summary: dict[str, Any] = {}
    outputs: dict[str, Any] = {}

    def begin(name: str) -> None:
        reporter.progress("pipeline", stages.index(name), len(stages), name)

    begin("fetch")
    imagery = Path(p.imagery.source)
    if p.imagery.is_remote or p.aoi is not None:
        if p.aoi is None:
            raise EngineError("BAD_PIPELINE", "Tiles from a server need an area of interest.",
                              "Add aoi: minx,miny,maxx,maxy (WGS84) to the pipeline.")
        from .model_package import read_info

        fp = FetchParams(aoi=p.aoi, source=p.imagery.source, out=p.workdir / "imagery.tif",
                         zoom=p.imagery.zoom, gsd=p.imagery.gsd, headers=p.imagery.headers,
                         model_gsd=read_info(p.model).resolution_m if p.model else None)
        res = _run_stage("fetch", fp, fp.out, lambda: fetch(fp, reporter), p.workdir, reporter)
        imagery = Path(res.outputs["mosaic"])
        summary["fetch"] = res.summary
    elif not imagery.exists():
        raise EngineError("BAD_IMAGERY", f"Imagery {imagery} does not exist.", "Give a raster file or an XYZ URL.")
    outputs["imagery"] = str(imagery)

    model = p.model
    attribution = ""
    if model is None:
        labels = p.labels
        if osm:
            begin("labels")
            from .labels import LabelsParams, build_labels

            lp = LabelsParams(aoi=p.aoi or _imagery_aoi(imagery), preset=str(p.preset), out=p.workdir / "labels.gpkg",
                              osm_file=p.osm_file, overpass=p.overpass, date=p.date)
            res = _run_stage("labels", lp, lp.out, lambda: build_labels(lp, reporter), p.workdir, reporter)
            labels = Path(res.outputs["labels"])
            summary["labels"] = res.summary
            outputs["labels"] = str(labels)
        from .labels import read_info as labels_info

        attribution = labels_info(labels).get("attribution", "") if labels else ""
        begin("dataset")
        dp = DatasetParams(imagery=imagery, labels=labels, task=p.task, out=p.workdir / "dataset",
                           class_field=p.class_field, chip_size=p.chip_size, preset=p.preset)
        res = _run_stage("dataset", dp, dp.out, lambda: build_dataset(dp, reporter), p.workdir, reporter)
        summary["dataset"] = res.summary

        begin("train")
        from .train import TrainParams, can_resume

        tp = TrainParams(dataset=dp.out, out=p.workdir / "model", task=p.task, epochs=p.epochs,
                         batch_size=p.batch_size, seed=p.seed)
        args = ["train", "--dataset", str(tp.dataset), "--out", str(tp.out), "--task", p.task,
                "--epochs", str(tp.epochs), "--batch-size", str(tp.batch_size), "--seed", str(tp.seed)]
        if can_resume(tp):  # an interrupted training of the same options left its checkpoint
            reporter.log("train: going on from the checkpoint of an interrupted run")
            args.append("--resume")
        res = _run_stage("train", tp, tp.out, lambda: run_in_child(args, reporter), p.workdir, reporter)
        model = Path(res.outputs["model"])
        summary["train"] = res.summary
    outputs["model"] = str(model)

    begin("predict")
    pp = PredictParams(model=model, imagery=imagery, out=p.out, aoi=p.aoi)
    res = predict(pp, reporter)  # always rerun: it is the user's final output
    summary["predict"] = res.summary
    outputs.update(res.outputs)
    if attribution:  # the model learnt from OSM: say so with the result (ODbL)
        reporter.log(f"Labels: data {attribution} (ODbL)")
        summary["attribution"] = attribution
    reporter.progress("pipeline", len(stages), len(stages), "done")
    return StageResult(outputs, summary)


def run_in_child(args: list[str], reporter: Reporter) -> StageResult:
    """Run a stage as `landcover --json ARGS` in a child process, relaying its events.

    Training runs apart so that TensorFlow never shares a process with
    onnxruntime (thread contention halves inference speed, DESIGN.md).
    """
    command = [sys.executable, "-m", "landcover_plugin.engine", "--json", *args]
    # TensorFlow's C++ logging ignores TF_CPP_MIN_LOG_LEVEL for its first lines: keep the
    # child's stderr off the user's terminal, but keep its tail for a crash report.
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    stderr_tail: deque[str] = deque(maxlen=20)
    drain = threading.Thread(target=lambda: stderr_tail.extend(child.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            event = parse_event(line)
            if event is None:
                continue
            kind = event["event"]
            if kind == "progress":
                reporter.progress(event["stage"], event["done"], event["total"], event.get("message", ""))
            elif kind == "log":
                reporter.log(event["message"], event.get("level", "info"))
            elif kind == "result":
                result = event
            elif kind == "error":
                error = event
        child.wait()
    except BaseException:  # Cancelled: stop the child too, it cleans up its partial output
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
        raise
    drain.join(timeout=1)
    if error is not None:
        raise EngineError(error["code"], error["message"], error.get("hint", ""))
    if result is None or child.returncode != 0:
        reporter.log("".join(stderr_tail), level="debug")
        raise EngineError("INTERNAL", f"`landcover {args[0]}` stopped with exit code {child.returncode}.",
                          "See the log for its last lines.")
    return StageResult(result["outputs"], result["summary"])
