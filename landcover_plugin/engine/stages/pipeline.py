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

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from ...contract.pipeline_file import LABELS_HINT, PipelineFile, PipelineFileError
from ...contract.protocol import STAGES_OSM, STAGES_PREDICT, STAGES_TRAIN
from ...contract.runner import EngineFailed, EngineRun
from ..atomic import run_lock, write_text_atomic
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..imagery.aoi import AOI, parse_aoi



def load_pipeline(path: Path) -> PipelineFile:
    """Read PIPELINE.yaml (contract/pipeline_file.py); relative paths are relative to its folder."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
        pipeline = PipelineFile.from_dict(spec, Path(path).resolve().parent)
    except (OSError, yaml.YAMLError) as exc:
        raise EngineError("BAD_PIPELINE", f"Cannot read pipeline {path}: {exc}",
                          "Give a YAML file like the one in the README.") from None
    except PipelineFileError as exc:
        raise EngineError("BAD_PIPELINE", f"Pipeline {path}: {exc.message}", exc.hint) from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # a value of the wrong kind in the YAML
        raise EngineError("BAD_PIPELINE", f"Pipeline {path} has a malformed value: {type(exc).__name__}: {exc}",
                          "Check the pipeline's keys and values against the example in the README "
                          "(numbers where numbers go, a mapping for imagery, labels and train).") from None
    problems = pipeline.problems()
    if problems:
        raise EngineError("BAD_PIPELINE", f"Pipeline {path}: {' '.join(problems)}", LABELS_HINT)
    return pipeline


def _imagery_aoi(imagery: Path) -> AOI:
    """The imagery's extent, where OSM labels are taken when the pipeline has no aoi."""
    from shapely.geometry import box

    from ..imagery.raster import open_raster

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


def run_pipeline(p: PipelineFile, reporter: Reporter) -> StageResult:
    if p.work.exists() and not p.work.is_dir():
        raise EngineError("BAD_WORKDIR", f"The pipeline's workdir {p.work} is a file, not a folder.",
                          "Give workdir: a folder (it is created), or move that file away.")
    # One run at a time per workdir: two would run the same stages into the same files.
    with run_lock(p.work / ".run.lock", f"the pipeline's workdir {p.work}"):
        return _run_pipeline(p, reporter)


def _run_pipeline(p: PipelineFile, reporter: Reporter) -> StageResult:
    from .dataset import DatasetParams, build_dataset
    from .fetch import FetchParams, fetch
    from .predict import PredictParams, predict

    workdir = p.work  # made by run_pipeline's lock
    aoi = parse_aoi(str(p.aoi), p.aoi_crs) if p.aoi else None
    stages = STAGES_PREDICT if p.model else STAGES_OSM if p.osm else STAGES_TRAIN
    summary: dict[str, Any] = {}
    outputs: dict[str, Any] = {}

    def begin(name: str) -> None:
        reporter.progress("pipeline", stages.index(name), len(stages), name)

    from ..learn.model_package import read_info

    info = read_info(p.model) if p.model else None
    if info is not None and info.task != p.task:  # e.g. land cover asked of a trees model: crowns would come back
        raise EngineError("MODEL_TASK_MISMATCH", f"The model {p.model} maps {info.task}, not {p.task}.",
                          f"Choose a {p.task} model, or set task: {info.task}.")
    begin("fetch")
    imagery = Path(p.imagery)
    if p.is_remote or aoi is not None:
        if aoi is None:
            raise EngineError("BAD_PIPELINE", "Tiles from a server need an area of interest.",
                              "Add aoi: minx,miny,maxx,maxy (WGS84) to the pipeline.")
        fp = FetchParams(aoi=aoi, source=p.imagery, out=workdir / "imagery.tif",
                         zoom=p.zoom, gsd=p.gsd, max_zoom=p.max_zoom, headers=p.headers,
                         model_gsd=info.resolution_m if info else None)
        res = _run_stage("fetch", fp, fp.out, lambda: fetch(fp, reporter), workdir, reporter)
        imagery = Path(res.outputs["mosaic"])
        summary["fetch"] = res.summary
    elif not imagery.exists():
        raise EngineError("BAD_IMAGERY", f"Imagery {imagery} does not exist.", "Give a raster file or an XYZ URL.")
    outputs["imagery"] = str(imagery)

    model = p.model
    attribution = ""
    if model is None:
        labels = p.labels
        if p.osm:
            begin("labels")
            from .labels import LabelsParams, build_labels

            lp = LabelsParams(aoi=aoi or _imagery_aoi(imagery), preset=str(p.preset), out=workdir / "labels.gpkg",
                              osm_file=p.osm_file, overpass=p.overpass, date=p.date)
            res = _run_stage("labels", lp, lp.out, lambda: build_labels(lp, reporter), workdir, reporter)
            labels = Path(res.outputs["labels"])
            summary["labels"] = res.summary
            outputs["labels"] = str(labels)
        from ..labels.read import read_info as labels_info

        attribution = labels_info(labels).get("attribution", "") if labels else ""
        begin("dataset")
        chip_size = p.chip_size or (read_info(p.base).tile_size if p.base else None)  # fine-tuning keeps its tiles
        # Corrections: the labels are complete in the reviewed area, so only it is trained on (the rest
        # of the imagery may hold crowns nobody checked) and its unlabelled pixels are background.
        reviewed = _reviewed_imagery(p, imagery, workdir, reporter) if p.reviewed_area else None
        dp = DatasetParams(imagery=reviewed or imagery, labels=labels, task=p.task, out=workdir / "dataset",
                           class_field=p.class_field, chip_size=chip_size, preset=p.preset,
                           complete=reviewed is not None)
        res = _run_stage("dataset", dp, dp.out, lambda: build_dataset(dp, reporter), workdir, reporter)
        summary["dataset"] = res.summary

        begin("train")
        from .train import TrainParams, can_resume

        tp = TrainParams(dataset=dp.out, out=workdir / "model", task=p.task, epochs=p.epochs,
                         batch_size=p.batch_size, seed=p.seed, base=p.base)
        config = workdir / "train.json"  # the child reads its parameters whole, not a rebuilt command line
        config.write_text(json.dumps(dataclasses.asdict(tp), default=str))
        args = ["train", "--config", str(config)]
        if p.remote:  # the host's job outlives this run: `landcover remote attach` fetches its model
            args += ["--remote", p.remote]
            args += [arg for flag, path in (("--ssh-config", p.ssh_config), ("--ssh-identity", p.ssh_identity))
                     if path for arg in (flag, str(path))]
        elif can_resume(tp):  # an interrupted training of the same options left its checkpoint
            reporter.log("train: going on from the checkpoint of an interrupted run")
            args.append("--resume")
        res = _run_stage("train", tp, tp.out, lambda: run_in_child(args, reporter), workdir, reporter)
        model = Path(res.outputs["model"])
        summary["train"] = res.summary
        if p.base:  # how the score changed: both models on the same validation chips, scored alike
            summary["train"]["compared"] = {"base": _val_scores(p.base, dp.out, workdir / "eval-base", reporter),
                                            "new": _val_scores(model, dp.out, workdir / "eval-new", reporter)}
    outputs["model"] = str(model)

    begin("predict")
    pp = PredictParams(model=model, imagery=imagery, out=p.out, aoi=aoi, scheduler=p.scheduler)
    res = predict(pp, reporter)  # always rerun: it is the user's final output
    summary["predict"] = res.summary
    outputs.update(res.outputs)
    if attribution:  # the model learnt from OSM: say so with the result (ODbL)
        reporter.log(f"Labels: data {attribution} (ODbL)")
        summary["attribution"] = attribution
    reporter.progress("pipeline", len(stages), len(stages), "done")
    return StageResult(outputs, summary)


def _reviewed_imagery(p: PipelineFile, imagery: Path, workdir: Path, reporter: Reporter) -> Path:
    """The imagery cut to the reviewed area (a box in aoi_crs, or a vector file's features)."""
    from .fetch import FetchParams, fetch

    area = parse_aoi(p.reviewed_area if isinstance(p.reviewed_area, str) else ",".join(map(str, p.reviewed_area)),
                     p.aoi_crs)
    fp = FetchParams(aoi=area, source=str(imagery), out=workdir / "reviewed.tif")
    return Path(_run_stage("reviewed", fp, fp.out, lambda: fetch(fp, reporter), workdir, reporter).outputs["mosaic"])


def _val_scores(model: Path | str, dataset: Path, out: Path, reporter: Reporter) -> dict[str, float]:
    """A model's headline scores on a dataset's validation chips (crown F1, precision, recall; or accuracy)."""
    from ..learn.model_package import onnx_path
    from .evaluate import EvalParams, evaluate

    metrics = evaluate(EvalParams(model=onnx_path(model), dataset=dataset, out=out), reporter).summary
    return {k: round(v, 4) for k, v in metrics.items()
            if k in ("crown_f1", "crown_precision", "crown_recall", "accuracy", "miou") and isinstance(v, float)}


def run_in_child(args: list[str], reporter: Reporter) -> StageResult:
    """Run a stage as `landcover --json ARGS` in a child process, relaying its events.

    Training runs apart so that TensorFlow never shares a process with
    onnxruntime (thread contention halves inference speed, docs/DESIGN.md).
    """
    # TensorFlow's C++ logging ignores TF_CPP_MIN_LOG_LEVEL for its first lines: the runner
    # keeps the child's stderr off the user's terminal, and its tail for a crash report.
    child = EngineRun(sys.executable, args, extra_env={"TF_CPP_MIN_LOG_LEVEL": "3"})

    def relay(event: dict[str, Any]) -> None:
        if event["event"] == "progress":
            reporter.progress(event["stage"], event["done"], event["total"], event.get("message", ""))
        elif event["event"] == "log":
            reporter.log(event["message"], event.get("level", "info"))

    try:
        result = child.run(relay)
    except EngineFailed as exc:
        if exc.code == "ENGINE_CRASHED":
            reporter.log("\n".join(child.stderr_tail), level="debug")
            raise EngineError("INTERNAL", f"`landcover {args[0]}` stopped with exit code {child.proc.returncode}.",
                              "See the log for its last lines.") from None
        raise EngineError(exc.code, exc.message, exc.hint) from None
    return StageResult(result["outputs"], result["summary"])
