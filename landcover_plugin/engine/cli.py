"""The `landcover` command: one subcommand per pipeline stage.

Every subcommand builds its stage's parameter dataclass from the arguments,
runs the stage and reports through a Reporter (JSON lines with --json).
SIGTERM/SIGINT raise Cancelled in the main thread; stages write outputs
atomically, so a cancelled run leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType
from typing import NoReturn

from ..contract.protocol import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK
from ..contract.tasks import TASK_IDS
from .errors import Cancelled, EngineError
from .events import Reporter
from .vector.health import HealthThresholds


class _Parser(argparse.ArgumentParser):
    """A malformed command line is bad input like any other: an EngineError (with --json,
    an error event the plugin shows; exit 2), not only usage text on stderr."""

    def error(self, message: str) -> NoReturn:
        raise EngineError("BAD_ARGUMENTS", f"{self.prog}: {message}", f"See `{self.prog} --help`.")


def number(text: str) -> float:
    """A float option: NaN and infinity are never meant (and pass every `x > 0` check)."""
    value = float(text)  # argparse turns the ValueError into "invalid number value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="write one JSON event per line on stdout (for the QGIS plugin and scripts)")


def _add_aoi(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--aoi", required=required,
                   help="minx,miny,maxx,maxy (WGS84 unless --aoi-crs) or a vector file")
    p.add_argument("--aoi-crs", default="EPSG:4326", help="CRS of a minx,miny,maxx,maxy AOI (default WGS84)")


def _add_ssh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ssh-config", type=Path, metavar="FILE", help="ssh config file to use instead of ~/.ssh/config "
                   "(default: $LANDCOVER_SSH_CONFIG if set)")
    p.add_argument("--ssh-identity", type=Path, metavar="KEY", help="private key file for the host (ssh -i)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="landcover",
        description="Land cover and tree maps from imagery: fetch, dataset, train, predict, run.",
    )
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download imagery tiles for an AOI into a mosaic GeoTIFF")
    _add_common(p)
    _add_aoi(p, required=True)
    p.add_argument("--source", required=True, help="XYZ URL template ({x},{y},{z}) or a raster file")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--zoom", type=int, help="tile zoom level")
    res.add_argument("--gsd", type=number, help="ground resolution in metres per pixel (picks the nearest zoom)")
    p.add_argument("--max-zoom", type=int, help="the source's last zoom level: never ask it for more")
    p.add_argument("--cache", type=Path, help="tile cache folder (default: the user's cache folder)")
    p.add_argument("--workers", type=int, default=4, help="concurrent downloads (default 4)")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="extra HTTP header, e.g. Referer:https://example.org (repeatable)")
    p.add_argument("--max-tiles", type=int, default=20_000,
                   help="refuse fetches of more tiles (or WMS images) than this (default 20000)")
    p.add_argument("--max-bytes", type=number, default=2e9,
                   help="refuse fetches whose estimated download is larger (bytes, default 2e9)")
    p.add_argument("--rate", type=number, default=100.0,
                   help="at most this many requests per second to one host (default 100; 0: no limit)")
    p.add_argument("--cache-days", type=number, default=30.0,
                   help="download cached tiles again after this many days (default 30)")
    p.add_argument("--subdomains", default="abc", help="letters for {s} in the URL template (default abc)")
    p.add_argument("--mbtiles", type=Path, help="also write the tiles as this MBTiles file (offline use in QGIS)")
    p.add_argument("--wms-crs", default="EPSG:3857", help="CRS to request WMS images in (default EPSG:3857)")
    p.add_argument("--model", type=Path, help="model folder, .onnx file or shipped model name that will read the "
                   "imagery: its resolution is the default --gsd, and a resolution more than 25%% off warns")
    p.add_argument("--out", type=Path, required=True, help="mosaic GeoTIFF to write")

    p = sub.add_parser("labels", help="OpenStreetMap features of a preset -> labels GeoPackage (field class)")
    _add_common(p)
    _add_aoi(p, required=False)
    p.add_argument("--preset", required=True, help="preset name (landcover, buildings, trees) or YAML file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--osm-file", type=Path, help=".osm, .osm.bz2 or .osm.pbf file")
    src.add_argument("--overpass", metavar="URL", help="Overpass API interpreter URL, "
                     "e.g. https://overpass-api.de/api/interpreter")
    p.add_argument("--date", help="OSM as it was on this date (Overpass [date:]), e.g. the imagery's date")
    p.add_argument("--overpass-timeout", type=int, default=180, help="server-side query timeout in s")
    p.add_argument("--overpass-maxsize", type=int, default=512 * 1024 * 1024, help="server-side memory limit in bytes")
    p.add_argument("--cache", type=Path, help="Overpass answer cache (default: the user's cache folder)")
    p.add_argument("--out", type=Path, required=True, help="labels GeoPackage to write")

    p = sub.add_parser("dataset", help="cut imagery and labels into training chips")
    _add_common(p)
    p.add_argument("--imagery", type=Path, help="raster file")
    p.add_argument("--labels", type=Path,
                   help="vector file (polygons with a class field), DeepForest CSV or Pascal VOC XML of boxes; "
                   "for --task trees also tree positions: a vector file of points, or a CSV with columns x,y "
                   "(the imagery's CRS) or lon,lat (WGS84) -- detected by geometry type / header; only the "
                   "centre heatmap is learnt from points (the crown channel is ignored)")
    p.add_argument("--class-field", help="attribute holding the class (land cover)")
    p.add_argument("--class-map", metavar="VALUE=CLASS,...",
                   help="rename class values, e.g. \"1=water,2=forested\" (unmapped values are an error)")
    p.add_argument("--task", choices=TASK_IDS, default="landcover",
                   help="buildings: any polygons are buildings, the rest background; classification: "
                   "one class per chip, the majority of its labelled pixels (default landcover)")
    p.add_argument("--chip-size", type=int, help="chip size in pixels (default: from the scene and the labels' size)")
    p.add_argument("--val-share", type=number, default=0.25,
                   help="share of each class's polygons (land cover) or of spatial blocks for validation")
    p.add_argument("--seed", type=int, default=0, help="draws the validation split (default 0)")
    p.add_argument("--preset", help="preset the labels were made with: fixes classes, colours, overlap priority")
    p.add_argument("--complete", action="store_true",
                   help="the labels map the area completely: unlabelled pixels are background (else ignored)")
    p.add_argument("--offset", default="0,0", metavar="DX,DY",
                   help="move the labels by DX,DY metres (east, north) onto the imagery")
    p.add_argument("--crown-radius", type=number, default=2.0,
                   help="trees from points: crown radius in metres the centre heatmap assumes (default 2)")
    p.add_argument("--background-ratio", type=number, default=0.0,
                   help="with --complete: background-only chips kept per labelled chip (default 0)")
    p.add_argument("--from", dest="source", type=Path, metavar="DATASET",
                   help="make a snapshot of this dataset's chips matching --where")
    p.add_argument("--where", help="SQL condition on the catalog, e.g. \"split = 'train' OR frac_water > 0.1\"")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write")

    p = sub.add_parser("train", help="train a model on a dataset and export it to ONNX")
    _add_common(p)
    p.add_argument("--dataset", type=Path, help="dataset folder from `landcover dataset` (or in --config)")
    p.add_argument("--task", choices=TASK_IDS,
                   help="default: the dataset's task")
    p.add_argument("--base", type=Path, help="model folder, .onnx beside model.keras, or shipped model name "
                   "(e.g. trees-base) to fine-tune from")
    p.add_argument("--config", type=Path, help="YAML/JSON file of train options (options given here win)")
    p.add_argument("--epochs", type=int, help="default 20; fine-tuning trees (--base): 60, with early stopping")
    p.add_argument("--batch-size", type=int, help="default 8; 0 picks it from free GPU memory")
    p.add_argument("--learning-rate", type=number, help="default 1e-3, or 1e-4 with --base (3e-4 fine-tuning trees)")
    p.add_argument("--freeze-encoder", action="store_true", default=None,
                   help="with --base or --encoder-weights: train the decoder only")
    p.add_argument("--encoder", choices=("unet", "mobilenetv2"),
                   help="the network's encoder: the compact U-Net's own (default) or Keras's MobileNetV2")
    p.add_argument("--encoder-weights", type=Path, metavar="PATH",
                   help="local ImageNet weights for --encoder mobilenetv2 (Keras's "
                   "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5, or torchvision's "
                   "data/imagenet/mobilenet_v2-b0353104.pth); nothing is downloaded")
    p.add_argument("--resume", action="store_true", default=None,
                   help="go on from the checkpoint an interrupted run left beside --out")
    p.add_argument("--family", choices=("auto", "unet", "forest"),
                   help="model family: unet, forest (random forest over bands, indices and neighbourhood "
                   "statistics; land cover) or auto (default: land cover trains both and keeps the better on "
                   "the validation polygons; other tasks unet)")
    p.add_argument("--bands", metavar="ROLE=BAND,...",
                   help="band roles for the forest's spectral indices (NDVI, NDWI, NDBI), e.g. "
                   "blue=1,green=2,red=3,nir=4,swir1=5,swir2=6 (roles: blue green red nir swir1 swir2)")
    p.add_argument("--copy-paste", type=number, metavar="SHARE",
                   help="trees: add SHARE x the training chips as chips with labelled crowns of other chips "
                   "pasted in (few-shot augmentation; default 0, fine-tuning trees 0.5)")
    p.add_argument("--border-weight", type=number,
                   help="trees: extra loss weight on crown borders, to keep touching crowns apart (default 0)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--out", type=Path, help="model folder to write (or in --config)")
    p.add_argument("--remote", metavar="HOST", help="train on this ssh host (set up with `landcover remote "
                   "setup HOST`): the dataset goes there, the model comes back")
    _add_ssh(p)

    p = sub.add_parser("remote", help="a GPU host to train on over ssh: setup, jobs, attach, cancel")
    _add_common(p)
    remote = p.add_subparsers(dest="remote_command", required=True, metavar="ACTION")
    r = remote.add_parser("setup", help="install or update this engine on HOST and say what it has (GPUs)")
    r.add_argument("--accept-host-key", metavar="SHA256:...",
                   help="trust HOST's key with this fingerprint (check it with the host's administrator first)")
    r = remote.add_parser("jobs", help="the training jobs on HOST and their state")
    r = remote.add_parser("attach", help="follow a job on HOST again and fetch its model")
    r.add_argument("--out", type=Path, help="model folder to write (default: the one the training was started for)")
    r = remote.add_parser("cancel", help="stop a job on HOST")
    for action in remote.choices.values():
        _add_common(action)
        action.add_argument("host", metavar="HOST", help="ssh destination: a Host of your ssh config or [user@]host")
        if action.prog.endswith(("attach", "cancel")):
            action.add_argument("job", metavar="JOB", help="job id, as `landcover remote jobs HOST` lists it")
        _add_ssh(action)

    p = sub.add_parser("eval", help="evaluate a model on a dataset's validation chips: report.md + report.html")
    _add_common(p)
    p.add_argument("--model", type=Path, required=True, help="model folder, .onnx file or shipped model name")
    p.add_argument("--dataset", type=Path, required=True, help="dataset folder from `landcover dataset`")
    p.add_argument("--split", default="val", choices=("val", "train", "all"), help="chips to evaluate (default val)")
    p.add_argument("--out", type=Path, required=True, help="report folder to write")

    p = sub.add_parser("predict", help="run a model over imagery and write styled vector layers")
    _add_common(p)
    p.add_argument("--model", type=Path, required=True, help="model folder or .onnx file")
    p.add_argument("--imagery", type=Path, required=True, help="raster file")
    _add_aoi(p, required=False)
    p.add_argument("--out", type=Path, required=True, help="GeoPackage to write")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per model run (default 8)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: all cores)")
    p.add_argument("--precision", choices=("auto", "int8", "fp32"), default="auto",
                   help="auto (default): the model folder's model-int8.onnx where `landcover quantize --dataset` "
                        "found that it holds the accuracy, else model.onnx; fp32: always model.onnx")
    p.add_argument("--tile-size", type=int, default=0,
                   help="model tile side in pixels (default: 256 where the model runs tiles larger than its own; "
                        "its overlap is kept)")
    p.add_argument("--block-size", type=int, default=2048,
                   help="vectorization block in pixels (default 2048; memory stays flat with the area)")
    p.add_argument("--nir-band", type=int, help="trees: 1-based imagery band holding near infrared (NDVI)")
    h = HealthThresholds()
    stand = (f"default: relative to the stand, {h.stand_stressed_sd:g} (dead: {h.stand_dead_sd:g}) robust standard "
             "deviations below its median")
    p.add_argument("--vari-stressed", type=number,
                   help=f"trees: crowns with mean greenness (VARI) below this are stressed ({stand})")
    p.add_argument("--vari-dead", type=number, help="... and below this dead")
    p.add_argument("--ndvi-stressed", type=number, help="trees with a NIR band: NDVI below this is stressed (default: "
                   "relative to the stand)")
    p.add_argument("--ndvi-dead", type=number, help="... and below this dead")
    p.add_argument("--dead-prob", type=number, default=h.dead_prob,
                   help=f"trees, models with a dead channel: mean dead probability of a dead crown (default {h.dead_prob})")
    p.add_argument("--no-orchard", action="store_true", help="trees: skip the planting grid and missing trees")
    p.add_argument("--per-feature", action="store_true",
                   help="--aoi is a vector file of areas: predict each on its own, its id (field area_id) on every row")
    p.add_argument("--id-field", help="with --per-feature: the field holding each area's id (default: feature ids)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="predict on a Dask cluster: its scheduler, tcp://HOST:PORT or tls://HOST:PORT (TLS "
                        "certificates from Dask's configuration); workers read --model and --imagery at the same paths")

    p = sub.add_parser("quantize", help="write an int8 copy of a model (faster on CPUs)")
    _add_common(p)
    p.add_argument("--model", type=Path, required=True, help="model folder or .onnx file")
    p.add_argument("--imagery", type=Path, help="raster to calibrate on (static int8); without it, dynamic")
    p.add_argument("--calibration-tiles", type=int, default=16)
    p.add_argument("--dataset", type=Path, action="append", default=[],
                   help="the model's validation dataset (repeatable): both models scored on it; an int8 model "
                        "that holds the accuracy, saved as MODEL/model-int8.onnx, is what predict runs by default")
    p.add_argument("--out", type=Path, required=True, help="model folder (or .onnx file) to write")

    p = sub.add_parser("run", help="run a whole pipeline described in a YAML file")
    _add_common(p)
    p.add_argument("pipeline", type=Path, help="PIPELINE.yaml")
    return parser


def _aoi(args: argparse.Namespace):
    from .imagery.aoi import parse_aoi

    return parse_aoi(args.aoi, args.aoi_crs) if args.aoi else None


def _model_gsd(model: Path | None) -> float | None:
    from .learn.model_package import read_info

    return read_info(model).resolution_m if model else None


def _offset(text: str) -> tuple[float, float]:
    try:
        dx, dy = (number(v) for v in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise EngineError("BAD_OFFSET", f"Offset '{text}' is not DX,DY in metres.",
                          "Give e.g. --offset 1.5,-0.8 (east, north).") from None
    return dx, dy


def _headers(pairs: list[str]) -> dict[str, str]:
    """--header NAME:VALUE, repeatable."""
    bad = [h for h in pairs if ":" not in h or not h.split(":", 1)[0].strip()]
    if bad:
        raise EngineError("BAD_HEADERS", "A --header is not NAME:VALUE (not shown: it may hold a secret).",
                          "Give each header as NAME:VALUE, e.g. --header Referer:https://example.org")
    return {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in pairs)}


def _ssh_target(args: argparse.Namespace, host: str):
    from .remote.ssh import SshTarget

    # LANDCOVER_SSH_CONFIG: an ssh config for every landcover command (e.g. one kept for a project)
    config = args.ssh_config or (Path(os.environ["LANDCOVER_SSH_CONFIG"]) if os.environ.get("LANDCOVER_SSH_CONFIG")
                                 else None)
    return SshTarget(host, ssh_config=config, identity=args.ssh_identity)


def _remote(args: argparse.Namespace, reporter: Reporter):
    from .events import StageResult
    from .remote import client, setup, ssh

    target = _ssh_target(args, args.host)
    if args.remote_command == "setup":
        if args.accept_host_key:
            known = ssh.accept_host_key(target, args.accept_host_key)
            reporter.log(f"{args.host}: key {args.accept_host_key} added to {known}")
        info = setup.setup(target, reporter.log)
        return StageResult({}, {"host": args.host, "python": info.python, "engine": info.engine_version,
                                "device": info.device, "found": "; ".join(info.describe()[2:])})
    if args.remote_command == "jobs":
        jobs = client.list_jobs(target)
        return StageResult({}, {j["job"]: f"{j['state']} {j['progress']}".strip() for j in jobs} or {"jobs": "none"})
    if args.remote_command == "attach":
        return client.attach(target, args.job, args.out, reporter)
    return client.cancel(target, args.job)


def dispatch(args: argparse.Namespace, reporter: Reporter):
    """Run the subcommand; return its StageResult."""
    if args.command == "fetch":
        from .stages.fetch import FetchParams, fetch

        return fetch(FetchParams(aoi=_aoi(args), source=args.source, out=args.out, zoom=args.zoom,
                                 gsd=args.gsd, max_zoom=args.max_zoom, cache_dir=args.cache, workers=args.workers,
                                 headers=_headers(args.header),
                                 max_tiles=args.max_tiles, max_bytes=int(args.max_bytes), rate=args.rate,
                                 cache_days=args.cache_days, subdomains=args.subdomains, mbtiles=args.mbtiles,
                                 wms_crs=args.wms_crs, model_gsd=_model_gsd(args.model)), reporter)
    if args.command == "labels":
        from .stages.labels import LabelsParams, build_labels

        return build_labels(LabelsParams(aoi=_aoi(args), preset=args.preset, out=args.out, osm_file=args.osm_file,
                                         overpass=args.overpass, date=args.date,
                                         overpass_timeout=args.overpass_timeout,
                                         overpass_maxsize=args.overpass_maxsize, cache_dir=args.cache), reporter)
    if args.command == "dataset":
        from .stages.dataset import DatasetParams, build_dataset
        from .labels.read import parse_class_map

        return build_dataset(DatasetParams(imagery=args.imagery, labels=args.labels, task=args.task,
                                           out=args.out, class_field=args.class_field,
                                           chip_size=args.chip_size, val_share=args.val_share,
                                           preset=args.preset, complete=args.complete, offset=_offset(args.offset),
                                           background_ratio=args.background_ratio, source=args.source,
                                           where=args.where, class_map=parse_class_map(args.class_map),
                                           crown_radius_m=args.crown_radius, seed=args.seed),
                             reporter)
    if args.command == "train":
        from .stages.train import params_from_config, train

        options = {k: getattr(args, k) for k in ("dataset", "out", "task", "base", "epochs", "batch_size", "seed",
                                                 "learning_rate", "freeze_encoder", "resume", "encoder",
                                                 "encoder_weights", "family", "bands", "copy_paste", "border_weight")}
        if not args.config and (args.dataset is None or args.out is None):
            raise EngineError("BAD_PARAMS", "train needs --dataset and --out.",
                              "Give both, or a --config file that names them.")
        params = params_from_config(args.config, **options)
        if args.remote:
            from .remote.client import RemoteTrainParams, train_remote

            return train_remote(RemoteTrainParams(_ssh_target(args, args.remote), params), reporter)
        return train(params, reporter)
    if args.command == "remote":
        return _remote(args, reporter)
    if args.command == "eval":
        from .stages.evaluate import EvalParams, evaluate

        return evaluate(EvalParams(model=args.model, dataset=args.dataset, out=args.out, split=args.split), reporter)
    if args.command == "predict":
        from .imagery.aoi import parse_aoi_areas
        from .stages.predict import PredictParams, predict

        health = HealthThresholds(vari_stressed=args.vari_stressed, vari_dead=args.vari_dead,
                                  ndvi_stressed=args.ndvi_stressed, ndvi_dead=args.ndvi_dead, dead_prob=args.dead_prob)
        areas = parse_aoi_areas(args.aoi, args.aoi_crs, args.id_field) if args.per_feature else ()
        return predict(PredictParams(model=args.model, imagery=args.imagery, out=args.out,
                                     aoi=None if areas else _aoi(args), areas=areas,
                                     batch_size=args.batch_size, threads=args.threads, block_size=args.block_size,
                                     precision=args.precision, tile_size=args.tile_size,
                                     nir_band=args.nir_band, health=health, orchard=not args.no_orchard,
                                     scheduler=args.scheduler), reporter)
    if args.command == "quantize":
        from .stages.quantize import QuantizeParams, quantize

        return quantize(QuantizeParams(model=args.model, out=args.out, imagery=args.imagery,
                                       calibration_tiles=args.calibration_tiles, datasets=tuple(args.dataset)),
                        reporter)
    if args.command == "run":
        from .stages.pipeline import load_pipeline, run_pipeline

        return run_pipeline(load_pipeline(args.pipeline), reporter)
    raise AssertionError(args.command)


def _raise_cancelled(signum: int, frame: FrameType | None) -> None:
    raise Cancelled(signal.Signals(signum).name)


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--aoi -82.1,29.6,...` would read as an option to argparse: make it `--aoi=-82.1,...`."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in ("--aoi", "--gsd", "--offset") and arg[:1] == "-" and arg[1:2].isdigit():
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


# OSErrors that are the machine's state, never a bug of ours: reported as bad input.
_ENVIRONMENT_ERRORS = {
    errno.ENOSPC: ("DISK_FULL", "Free some disk space (or give --out on another disk), then run the command again."),
    errno.EDQUOT: ("DISK_FULL", "Free some disk space (or give --out on another disk), then run the command again."),
    errno.EACCES: ("NOT_PERMITTED", "Check the permissions of that path, or give --out a folder you can write to."),
    errno.EPERM: ("NOT_PERMITTED", "Check the permissions of that path, or give --out a folder you can write to."),
    errno.EROFS: ("READ_ONLY", "Give --out a folder on a writable disk."),
}


def user_error(exc: Exception) -> EngineError | None:
    """The error to report as bad input (exit 2): an EngineError, or an OSError of a
    full disk, a permission or a read-only file system; None for a bug."""
    if isinstance(exc, EngineError):
        return exc
    if not isinstance(exc, OSError) or exc.errno not in _ENVIRONMENT_ERRORS:
        return None
    code, hint = _ENVIRONMENT_ERRORS[exc.errno]
    return EngineError(code, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), hint)


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_values(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except EngineError as exc:  # a malformed command line
        Reporter(json_mode="--json" in argv).error(exc.code, exc.message, exc.hint)
        return EXIT_BAD_INPUT
    reporter = Reporter(json_mode=getattr(args, "json", False))
    signal.signal(signal.SIGTERM, _raise_cancelled)
    signal.signal(signal.SIGINT, _raise_cancelled)
    try:
        result = dispatch(args, reporter)
    except Cancelled:
        reporter.error("CANCELLED", "Cancelled; no partial output was kept.", "Run the command again to redo it.")
        # Partial outputs are gone already; skip the interpreter's teardown, which
        # takes TensorFlow over a second and would break the 2 s promise.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CANCELLED)
    except Exception as exc:
        error = user_error(exc)
        if error is not None:
            reporter.error(error.code, error.message, error.hint)
            return EXIT_BAD_INPUT
        # a bug: report it whole, for the log panel
        reporter.log(traceback.format_exc(), level="debug")
        reporter.error("INTERNAL", f"{type(exc).__name__}: {exc}",
                       "This is a bug in landcover; please report it with the log.")
        return EXIT_FAILED
    reporter.result(args.command, result.outputs, result.summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
