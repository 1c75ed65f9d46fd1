"""Train a U-Net on a dataset folder and export it as an ONNX model package.

The package folder holds model.onnx (metadata in metadata_props, see
model_package.py), model.keras (to fine-tune from with --base) and
MODEL_CARD.md. It is written atomically and only after the ONNX export has
been checked against Keras on a validation chip.

TensorFlow is imported inside the functions: the rest of the engine (and the
QGIS process) must not pay for it or clash with it.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from ...contract.tasks import TASK_IDS
from ..atomic import atomic_output, check_out_path
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..learn.dataset_folder import Manifest, chip_labels, dataset_hash, load_chips
from ..learn.export import check_onnx, export_onnx
from ..learn.fit import (PATIENCE, augmented, batched, checkpointer, device_name, fit_keeping_checkpoint,
                         freeze_encoder, load_base, max_batch_size, pick_batch_size, predict_eagerly,
                         progress_callback, use_mixed_precision)
from ..learn.losses import check_labels, class_weights, make_loss, make_metric, val_metrics
from ..learn.model_card import CURVES_NAME, model_card, plot_curves
from ..learn.model_package import KERAS_NAME, ONNX_NAME, ModelInfo, write_metadata
from ..learn.peer_export import write_peer_model

LEARNING_RATE, FINE_TUNE_LEARNING_RATE = 1e-3, 1e-4


@dataclass(frozen=True)
class TrainParams:
    """Everything a training run depends on: with the dataset folder, a run is
    reproducible anywhere (`--config` reads these from a YAML/JSON file)."""
    dataset: Path
    out: Path
    task: str | None = None  # default: the dataset's task
    base: Path | None = None  # model folder to fine-tune from
    epochs: int = 20
    batch_size: int = 8  # 0: pick from free GPU memory (8 on the CPU)
    seed: int = 0
    learning_rate: float | None = None  # default: 1e-3 from scratch, 1e-4 fine-tuning
    freeze_encoder: bool = False  # fine-tuning: train the decoder and heads only
    resume: bool = False  # go on from the checkpoint of an interrupted run
    patience: int = PATIENCE
    width: int = 16  # U-Net filters at full resolution
    depth: int = 3  # U-Net poolings
    encoder: str = "unet"  # or "mobilenetv2" (Keras applications), see unet.py
    encoder_weights: Path | None = None  # local ImageNet weights file for the encoder (never downloaded)


def params_from_config(path: Path | None, **overrides) -> TrainParams:
    """TrainParams from a YAML/JSON file (or none); `overrides` (not None) win over the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {} if path else {}
    except (OSError, yaml.YAMLError) as exc:
        raise EngineError("BAD_CONFIG", f"Cannot read training config {path}: {exc}",
                          "Give a YAML or JSON file of train options, e.g. `epochs: 30`.") from None
    known = set(TrainParams.__dataclass_fields__)
    unknown = set(data) - known if isinstance(data, dict) else {"<not a mapping>"}
    if unknown:
        raise EngineError("BAD_CONFIG", f"Unknown training option(s) in {path}: {', '.join(sorted(unknown))}.",
                          f"Known options: {', '.join(sorted(known))}.")
    data |= {k: v for k, v in overrides.items() if v is not None}
    for key in ("dataset", "out", "base", "encoder_weights"):
        if data.get(key) is not None:
            data[key] = Path(data[key])
    missing = {"dataset", "out"} - {k for k, v in data.items() if v is not None}
    if missing:
        raise EngineError("BAD_CONFIG", f"No {' or '.join(sorted(missing))} given.",
                          "Give --dataset and --out, or put them in the config file.")
    # A YAML value of the wrong kind ("epochs: ten") would fail deep in training.
    kinds = {"epochs": int, "batch_size": int, "seed": int, "patience": int, "width": int, "depth": int,
             "learning_rate": (int, float), "freeze_encoder": bool, "resume": bool}
    wrong = sorted(k for k, kind in kinds.items() if data.get(k) is not None
                   and (not isinstance(data[k], kind) or (kind is not bool and isinstance(data[k], bool))))
    if wrong:
        raise EngineError("BAD_CONFIG", f"Training option(s) {', '.join(wrong)} in {path} are not of the right kind.",
                          "Give whole numbers for epochs, batch_size, seed, patience, width and depth, a number "
                          "for learning_rate and true/false for freeze_encoder and resume.")
    return TrainParams(**data)


def _fingerprint(params: TrainParams, manifest_hash: str) -> dict:
    """What a resumed run must share with the interrupted one (epochs may grow)."""
    return {"dataset_hash": manifest_hash, "task": params.task, "base": str(params.base), "seed": params.seed,
            "batch_size": params.batch_size, "learning_rate": params.learning_rate,
            "freeze_encoder": params.freeze_encoder, "width": params.width, "depth": params.depth,
            "encoder": params.encoder, "encoder_weights": str(params.encoder_weights)}


def can_resume(params: TrainParams) -> bool:
    """Whether an interrupted run of these very options left its checkpoint, so that
    `--resume` goes on from it (`landcover run` asks; train refuses another run's)."""
    from ..learn.checkpoint import STATE, checkpoint_dir

    try:
        state = json.loads((checkpoint_dir(params.out) / STATE).read_text())
        return state.get("fingerprint") == _fingerprint(params, dataset_hash(params.dataset))
    except (OSError, ValueError):
        return False


def train(params: TrainParams, reporter: Reporter) -> StageResult:
    check_out_path(params.out, directory=True, inputs=[params.dataset, params.base, params.encoder_weights])
    manifest = Manifest.read(params.dataset)
    task = params.task or manifest.task
    if task not in TASK_IDS or task != manifest.task:
        raise EngineError("BAD_TASK", f"Cannot train a '{task}' model on a '{manifest.task}' dataset.",
                          f"Leave out --task, or build a dataset for the task (supported: {', '.join(TASK_IDS)}).")
    if params.epochs < 1 or params.batch_size < 0 or (params.learning_rate is not None
                                                      and not 0 < params.learning_rate < math.inf):
        raise EngineError("BAD_PARAMS", "Epochs must be at least 1, batch size at least 0 (0: automatic) and "
                          "the learning rate positive.", "Use e.g. --epochs 20 --batch-size 8.")
    most = max_batch_size(manifest.chip_size)
    if params.batch_size > most:  # far beyond: TensorFlow died of a segmentation fault, not an error
        raise EngineError("BAD_PARAMS", f"--batch-size {params.batch_size} of {manifest.chip_size} px chips "
                          f"needs more memory than this machine has (at most about {most}).",
                          f"Use e.g. --batch-size {min(8, most)}, or 0 to pick it from free GPU memory.")
    if params.freeze_encoder and not (params.base or params.encoder_weights):
        raise EngineError("BAD_PARAMS", "--freeze-encoder needs --base or --encoder-weights: a fresh encoder has "
                          "learnt nothing to keep.", "Give --base MODEL (or a pretrained encoder), or leave out "
                          "--freeze-encoder.")
    centres_only = manifest.centres_only
    if centres_only and not params.base:
        raise EngineError("CENTRES_ONLY_NEEDS_BASE", "This dataset holds tree positions only (no crowns): a new "
                          "model would learn where trees stand but not their crowns.",
                          "Fine-tune a model that knows crowns on it: --base trees-base (or a model of yours).")
    from ..learn.unet import ENCODERS

    if params.encoder not in ENCODERS or (params.encoder_weights and params.encoder == "unet"):
        raise EngineError("BAD_PARAMS", f"Unknown encoder '{params.encoder}', or weights for the plain U-Net.",
                          f"Use --encoder {' or '.join(ENCODERS)}; --encoder-weights goes with --encoder mobilenetv2.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import
    import keras

    from ..learn.checkpoint import BEST, RunState, checkpoint_dir, load_checkpoint, save_checkpoint
    from ..learn.unet import build_classifier, build_unet

    keras.utils.set_random_seed(params.seed)
    device = device_name()
    mixed = use_mixed_precision()
    batch_size = pick_batch_size(params.batch_size)
    reporter.log(f"training on {device}{' (mixed precision)' if mixed else ''}, batch {batch_size}")
    tile, bands, class_names = manifest.chip_size, manifest.band_count, manifest.class_names
    dead = task == "trees" and "dead" in class_names
    norm = manifest.norm
    if params.base:
        model, base_info, from_onnx = load_base(params.base, manifest, task)
        if from_onnx:
            reporter.log(f"fine-tuning {params.base}: weights taken from its ONNX file")
        rate = params.learning_rate or FINE_TUNE_LEARNING_RATE
        # Keep the base's input normalisation: its weights expect it.
        norm = {"input_scale": base_info.input_scale, "mean": base_info.mean, "std": base_info.std}
    elif task == "classification":
        model = build_classifier(tile, bands, len(class_names), params.width, params.depth, params.encoder,
                                 params.encoder_weights)
        rate = params.learning_rate or LEARNING_RATE
    else:
        model = build_unet(tile, bands, task, len(class_names), width=params.width, depth=params.depth, dead=dead,
                           encoder=params.encoder, encoder_weights=params.encoder_weights)
        rate = params.learning_rate or LEARNING_RATE
    if params.freeze_encoder:
        reporter.log(f"encoder frozen: {freeze_encoder(model)} of {model.count_params()} weights train")
    scaled = replace(manifest, **norm)  # the base model's normalisation when fine-tuning
    x_train, y_train = load_chips(params.dataset, scaled, "train")
    x_val, y_val = load_chips(params.dataset, scaled, "val")
    if params.base and from_onnx:
        from ..learn.onnx_weights import calibrate_batchnorm

        calibrate_batchnorm(model, x_train[:16])
    if task == "classification":  # one label per chip instead of the mask
        y_train, y_val = chip_labels(manifest, "train"), chip_labels(manifest, "val")
    check_labels(task, class_names, y_train, centres_only)
    weights = class_weights(y_train, len(class_names)) if task != "trees" else None
    optimizer = keras.optimizers.Adam(rate)
    model.compile(optimizer=optimizer, loss=make_loss(task, weights, dead, centres_only), metrics=[make_metric(task)])

    manifest_hash = dataset_hash(params.dataset)
    fingerprint = _fingerprint(params, manifest_hash)
    ckpt = checkpoint_dir(params.out)
    state = RunState(fingerprint=fingerprint)
    if params.resume:
        state = load_checkpoint(ckpt, model, optimizer, fingerprint)
        reporter.log(f"resuming after epoch {state.epoch} (best so far: epoch {state.best_epoch})")
    elif ckpt.exists():
        reporter.log(f"starting over: the checkpoint of an earlier run at {ckpt} will be replaced "
                     "(use --resume to go on from it)", level="warning")

    steps = math.ceil(len(x_train) / batch_size)
    val_data = batched(x_val, y_val, batch_size)
    train_data = augmented(x_train, y_train, batch_size, params.seed)
    if state.epoch < params.epochs and not state.stopped_early:
        fit_keeping_checkpoint(
            model, ckpt, reporter, state, train_data, validation_data=val_data, initial_epoch=state.epoch,
            epochs=params.epochs, steps_per_epoch=steps, verbose=0, shuffle=False,  # the tf.data pipeline shuffles
            callbacks=[progress_callback(reporter, params.epochs, steps),
                       checkpointer(ckpt, optimizer, state, params.patience, reporter, save_checkpoint)])
    reporter.progress("train", params.epochs * steps, params.epochs * steps, f"done after {state.epoch} epochs")
    model.load_weights(ckpt / BEST)  # early stopping keeps the best epoch's weights
    val_loss = float(model.evaluate(val_data, verbose=0)[0])
    metrics = {"val_loss": val_loss, **val_metrics(task, y_val, predict_eagerly(model, x_val, batch_size))}
    info = ModelInfo(task=task, class_names=class_names, class_colors=manifest.class_colors,
                     band_count=bands, resolution_m=manifest.resolution_m, tile_size=tile,
                     tile_overlap=0 if task == "classification" else tile // 8, **norm,
                     dataset=Path(params.dataset).resolve().name, metrics=metrics, dataset_hash=manifest_hash)
    summary = {"epochs": state.epoch, "best_epoch": state.best_epoch, **metrics, "device": device,
               "parameters": model.count_params(), "batch_size": batch_size, "learning_rate": rate}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.__dict__.items()} | {"batch_size": batch_size}
    with atomic_output(params.out, directory=True) as tmp:
        with warnings.catch_warnings():  # Keras 3 + TF under numpy 2 warn per variable on save
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save(tmp / KERAS_NAME)
        reporter.log("exporting to ONNX")
        export_onnx(model, tmp / ONNX_NAME, tile, bands)
        write_metadata(tmp / ONNX_NAME, info)
        summary["onnx_max_diff"] = check_onnx(tmp / ONNX_NAME, model, x_val[:1])
        write_peer_model(tmp / ONNX_NAME, info, tmp)  # model-peers.onnx: for Deepness and GeoDeep
        plot_curves(state.history, tmp / CURVES_NAME)
        (tmp / "train_config.json").write_text(json.dumps(config, indent=1))
        (tmp / "MODEL_CARD.md").write_text(model_card(info, manifest, summary, params))
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)  # the package is whole: the checkpoint has served
    return StageResult(outputs={"model": str(params.out), "onnx": str(Path(params.out) / ONNX_NAME)},
                       summary=summary)


