"""Train a model on a dataset folder and export it as an ONNX model package.

Families (`--family`): `unet` (Keras U-Net), `forest` (a random forest over per-pixel
features, learn/forest.py, land cover only) and `auto`, the land-cover default: both are
trained and the one with the better accuracy on the dataset's validation polygons is kept;
the card and the summary say which won and by how much.

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
from ..learn.losses import (check_labels, class_scores, class_weights, make_loss, make_metric, missing_classes,
                            val_metrics)
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
    epochs: int | None = None  # default: DEFAULTS, or FEW_SHOT when fine-tuning trees
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
    family: str = "auto"  # one of FAMILIES
    bands: str | None = None  # band roles for the forest's indices, e.g. "blue=1,green=2,red=3,nir=4,swir1=5"
    copy_paste: float | None = None  # trees: share of extra samples with crowns pasted from other chips (augment.py)
    border_weight: float | None = None  # trees: extra loss weight on the pixels of crown borders (losses.py)


FAMILIES = ("auto", "unet", "forest")
DEFAULTS = {"epochs": 20, "copy_paste": 0.0, "border_weight": 0.0}
# Fine-tuning a trees model on a few hundred crowns (issue 19's few-shot recipe): the
# options left open take these. Measured with scripts/fewshot_eval.py (README, "Few-shot").
FEW_SHOT = {"epochs": 60, "learning_rate": 3e-4, "copy_paste": 0.5, "border_weight": 0.0}


def resolved(params: TrainParams, task: str) -> TrainParams:
    """The options left open (None) filled in: the few-shot recipe when fine-tuning trees."""
    recipe = FEW_SHOT if task == "trees" and params.base else DEFAULTS
    return replace(params, **{k: v for k, v in recipe.items() if getattr(params, k) is None})


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
             "learning_rate": (int, float), "freeze_encoder": bool, "resume": bool, "family": str, "bands": str,
             "copy_paste": (int, float), "border_weight": (int, float)}
    wrong = sorted(k for k, kind in kinds.items() if data.get(k) is not None
                   and (not isinstance(data[k], kind) or (kind is not bool and isinstance(data[k], bool))))
    if wrong:
        raise EngineError("BAD_CONFIG", f"Training option(s) {', '.join(wrong)} in {path} are not of the right kind.",
                          "Give whole numbers for epochs, batch_size, seed, patience, width and depth, a number "
                          "for learning_rate, true/false for freeze_encoder and resume, and text for family and "
                          "bands.")
    return TrainParams(**data)


def _fingerprint(params: TrainParams, manifest_hash: str) -> dict:
    """What a resumed run must share with the interrupted one (epochs may grow)."""
    return {"dataset_hash": manifest_hash, "task": params.task, "base": str(params.base), "seed": params.seed,
            "batch_size": params.batch_size, "learning_rate": params.learning_rate,
            "freeze_encoder": params.freeze_encoder, "width": params.width, "depth": params.depth,
            "encoder": params.encoder, "encoder_weights": str(params.encoder_weights),
            "copy_paste": params.copy_paste, "border_weight": params.border_weight}


def _tuned_post(y_val, val_pred, resolution_m: float) -> dict:
    """The crown post-processing (threshold, seed distance, smallest crown) with the best
    crown F1 on the validation chips, and the crowns' confidence calibrated on them (its
    decoded crowns' mean probabilities against which matched), stored in the model; {}
    without validation crowns."""
    import numpy as np

    from ...contract.names import IGNORE
    from ..vector.confidence import fit_calibration
    from ..vector.crown_metrics import crown_confidences, truth_boxes_from_mask, tune_post

    truths = [truth_boxes_from_mask(y.transpose(2, 0, 1)) for y in y_val]
    if not any(truths):
        return {}
    predictions = [(p[..., 0], p[..., 1], y[..., 0] != IGNORE) for p, y in zip(val_pred, y_val)]
    post, score = tune_post(predictions, truths, resolution_m)
    probs, matched = zip(*(crown_confidences(p, t, post, resolution_m) for p, t in zip(predictions, truths)))
    scale, shift = fit_calibration(np.concatenate(probs), np.concatenate(matched))
    return {**post, "val_crown_f1_tuned": score.f1, "confidence_scale": scale, "confidence_shift": shift}


def can_resume(params: TrainParams) -> bool:
    """Whether an interrupted run of these very options left its checkpoint, so that
    `--resume` goes on from it (`landcover run` asks; train refuses another run's)."""
    from ..learn.checkpoint import STATE, checkpoint_dir

    try:
        state = json.loads((checkpoint_dir(params.out) / STATE).read_text())
        params = resolved(params, params.task or Manifest.read(params.dataset).task)
        return state.get("fingerprint") == _fingerprint(params, dataset_hash(params.dataset))
    except (OSError, ValueError, EngineError):
        return False


def train(params: TrainParams, reporter: Reporter) -> StageResult:
    check_out_path(params.out, directory=True, inputs=[params.dataset, params.base, params.encoder_weights])
    manifest = Manifest.read(params.dataset)
    task = params.task or manifest.task
    if task not in TASK_IDS or task != manifest.task:
        raise EngineError("BAD_TASK", f"Cannot train a '{task}' model on a '{manifest.task}' dataset.",
                          f"Leave out --task, or build a dataset for the task (supported: {', '.join(TASK_IDS)}).")
    params = resolved(params, task)
    family = _family(params, task)
    if family == "forest":
        return train_forest(params, manifest, reporter)
    result = train_unet(params, manifest, reporter)
    return result if family == "unet" else _keep_best(params, manifest, result, reporter)


def _family(params: TrainParams, task: str) -> str:
    """The family to train: auto is both for land cover from scratch, the U-Net otherwise."""
    if params.family not in FAMILIES:
        raise EngineError("BAD_PARAMS", f"Unknown model family '{params.family}'.",
                          f"Use --family {', '.join(FAMILIES)}.")
    if params.family == "forest" and (task != "landcover" or params.base):
        raise EngineError("BAD_PARAMS", "--family forest trains land-cover models from scratch only.",
                          "Use --family unet (or leave --family out) for this task or with --base.")
    if params.family == "auto":
        return "auto" if task == "landcover" and not params.base else "unet"
    return params.family


def _keep_best(params: TrainParams, manifest: Manifest, unet: StageResult, reporter: Reporter) -> StageResult:
    """--family auto: the forest is trained too, and the package of the better one (validation
    accuracy on the held-out polygons) is kept at --out, its card saying by how much it won."""
    import shutil

    from ..atomic import write_text_atomic

    side = Path(params.out).with_name(f".{Path(params.out).name}.forest")
    try:
        forest = train_forest(replace(params, out=side), manifest, reporter)
        scores = {"unet": unet.summary["val_accuracy"], "forest": forest.summary["val_accuracy"]}
        winner = max(scores, key=lambda f: (scores[f], f == "forest"))  # a tie: the smaller, faster model
        if winner == "forest":
            with atomic_output(params.out, directory=True) as tmp:
                for f in side.iterdir():
                    shutil.copy2(f, tmp / f.name)
    finally:
        shutil.rmtree(side, ignore_errors=True)
    margin = abs(scores["unet"] - scores["forest"])
    loser = "unet" if winner == "forest" else "forest"
    reporter.log(f"model family: {winner} kept (validation accuracy {scores[winner]:.3f}, {loser} "
                 f"{scores[loser]:.3f})")
    card = Path(params.out) / "MODEL_CARD.md"
    write_text_atomic(card, card.read_text() + f"""
## Model family
`--family auto` trained both; kept **{winner}**: validation accuracy {scores[winner]:.4f} against \
{scores[loser]:.4f} for {loser} ({margin:+.4f}), on the same held-out polygons.
""")
    result = forest if winner == "forest" else unet
    return StageResult(outputs={"model": str(params.out), "onnx": str(Path(params.out) / ONNX_NAME)},
                       summary=result.summary | {"family": winner, "family_scores": scores,
                                                 "family_margin": round(margin, 4)})


def train_forest(params: TrainParams, manifest: Manifest, reporter: Reporter) -> StageResult:
    """The random forest (learn/forest.py): features of the train chips' labelled pixels, fit,
    export to ONNX, validation metrics from the exported model itself."""
    import time

    from ..learn import forest as rf

    check_out_path(params.out, directory=True, inputs=[params.dataset])
    roles = rf.parse_roles(params.bands, manifest.band_count)
    if not rf.index_names(roles):
        reporter.log("forest: no spectral indices (NDVI, NDWI, NDBI): give the band roles with --bands, e.g. "
                     "blue=1,green=2,red=3,nir=4,swir1=5,swir2=6" if manifest.band_count > 1 else
                     "forest: no spectral indices on a one-band raster: the band and its neighbourhood only",
                     level="warning")
    class_names = manifest.class_names
    x_train, y_train = load_chips(params.dataset, manifest, "train")
    x_val, y_val = load_chips(params.dataset, manifest, "val")
    check_labels("landcover", class_names, y_train)
    _warn_missing(class_names, y_train, reporter)
    start = time.perf_counter()
    reporter.progress("train", 0, 2, "forest: features")
    features = rf.features_model(manifest.band_count, manifest.mean, manifest.std, roles)
    f, c = rf.training_pixels(features, x_train, y_train, params.seed)
    names = rf.feature_names(manifest.band_count, roles)
    reporter.log(f"forest: {len(c)} training pixels, features: {', '.join(names)}")
    reporter.progress("train", 1, 2, "forest: fitting")
    forest = rf.fit_forest(f, c, rf.ForestParams(seed=params.seed))
    seconds = time.perf_counter() - start
    with atomic_output(params.out, directory=True) as tmp:
        rf.export_forest(forest, tmp / ONNX_NAME, manifest.band_count, len(class_names), manifest.mean,
                         manifest.std, roles)
        pred = rf.predict_onnx(tmp / ONNX_NAME, x_val)
        metrics = val_metrics("landcover", y_val, pred)
        tile = max(manifest.chip_size, rf.TILE)  # pixel features: any tile works, larger ones run faster
        info = ModelInfo(task="landcover", class_names=class_names, class_colors=manifest.class_colors,
                         band_count=manifest.band_count, resolution_m=manifest.resolution_m, tile_size=tile,
                         tile_overlap=tile // 8, **manifest.norm, dataset=Path(params.dataset).resolve().name,
                         metrics=metrics, dataset_hash=dataset_hash(params.dataset))
        write_metadata(tmp / ONNX_NAME, info)
        summary = {"family": "forest", **metrics, **class_scores(y_val, pred, class_names),
                   "classes_not_learnt": missing_classes(y_train, class_names), "training_pixels": len(c),
                   "trees": forest.n_estimators, "fit_seconds": round(seconds, 2), "band_roles": roles,
                   "device": "cpu"}
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.__dict__.items()} | {"family": "forest"}
        (tmp / "train_config.json").write_text(json.dumps(config, indent=1))
        (tmp / "MODEL_CARD.md").write_text(model_card(info, manifest, summary, params))
    reporter.progress("train", 2, 2, "forest: done")
    return StageResult(outputs={"model": str(params.out), "onnx": str(Path(params.out) / ONNX_NAME)},
                       summary=summary)


def _warn_missing(class_names: list[str], y_train, reporter: Reporter) -> None:
    for name in missing_classes(y_train, class_names):
        reporter.log(f"class '{name}' has no training pixels: the model cannot predict it (see the dataset's "
                     "class_notes for why)", level="warning")


def train_unet(params: TrainParams, manifest: Manifest, reporter: Reporter) -> StageResult:
    task = params.task or manifest.task
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
    if task == "landcover":
        _warn_missing(class_names, y_train, reporter)
    weights = class_weights(y_train, len(class_names)) if task != "trees" else None
    optimizer = keras.optimizers.Adam(rate)
    if task == "trees" and params.copy_paste > 0 and not centres_only:
        from ..learn.augment import paste_crowns

        n = len(x_train)
        x_train, y_train = paste_crowns(x_train, y_train, params.copy_paste, params.seed)
        reporter.log(f"copy-paste: {len(x_train) - n} training samples with crowns pasted from other chips")
    model.compile(optimizer=optimizer, loss=make_loss(task, weights, dead, centres_only, params.border_weight),
                  metrics=[make_metric(task)])

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
    pred = predict_eagerly(model, x_val, batch_size)
    metrics = {"val_loss": val_loss, **val_metrics(task, y_val, pred)}
    scores = class_scores(y_val, pred, class_names) | {"classes_not_learnt": missing_classes(y_train, class_names)} \
        if task == "landcover" else {}
    post = _tuned_post(y_val, pred, manifest.resolution_m) if task == "trees" and not centres_only else {}
    still_improving = not state.stopped_early and state.best_epoch == state.epoch
    if still_improving:
        reporter.log(f"validation loss was still improving at the last epoch ({state.epoch}): more epochs "
                     "(--epochs) may give a better model", level="warning")
    info = ModelInfo(task=task, class_names=class_names, class_colors=manifest.class_colors,
                     band_count=bands, resolution_m=manifest.resolution_m, tile_size=tile,
                     tile_overlap=0 if task == "classification" else tile // 8, **norm,
                     dataset=Path(params.dataset).resolve().name, metrics=metrics, dataset_hash=manifest_hash,
                     **{k: v for k, v in post.items() if k in ModelInfo.__dataclass_fields__})
    summary = {"family": "unet", "epochs": state.epoch, "best_epoch": state.best_epoch, **metrics, **scores, **post,
               "still_improving": still_improving, "device": device,
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


