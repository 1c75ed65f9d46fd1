"""`landcover eval`: score a model package on a dataset's chips, as report.md + report.html.

Runs the ONNX model with onnxruntime (no TensorFlow), on the chips of one split,
normalised the way the model's metadata says. Land cover: per-class IoU, mIoU
and the pixel confusion matrix. Trees: crown pixel confusion (background /
crown, and dead when the model has that channel) and crown precision / recall /
F1 at IoU 0.4 (one-to-one box matching, crown_metrics.py). Buildings: as land
cover (IoU of class building). Classification: chip accuracy, balanced accuracy,
per-class recall and the chip confusion matrix. Plots: confusion
matrix, the model's training curves, predictions over imagery. Written whole or
not at all.
"""
from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...contract.names import IGNORE
from ..atomic import atomic_output, check_out_path
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..learn.dataset_folder import Manifest, read_chip
from ..learn.model_package import ModelInfo, onnx_path, read_info
from ..vector.crown_metrics import CrownScore, crown_boxes, match_boxes, truth_boxes_from_mask

BATCH = 8
EXAMPLES = 4


@dataclass(frozen=True)
class EvalParams:
    model: Path
    dataset: Path
    out: Path
    split: str = "val"  # "val" | "train" | "all"


def confusion(truth: np.ndarray, guess: np.ndarray, n: int) -> np.ndarray:
    """(n, n) pixel counts, rows truth, columns prediction; IGNORE truth left out."""
    keep = truth != IGNORE
    return np.bincount(truth[keep].astype(np.int64) * n + guess[keep].astype(np.int64),
                       minlength=n * n).reshape(n, n)


def class_iou(matrix: np.ndarray) -> np.ndarray:
    """IoU per class from a confusion matrix (NaN for a class absent from truth and prediction)."""
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def _classes(info: ModelInfo, channels: int) -> list[str]:
    if info.task == "trees":
        return ["background", "crown", "dead"] if channels > 2 else ["background", "crown"]
    return list(info.class_names)


def _labels(info: ModelInfo, out: np.ndarray) -> np.ndarray:
    """Model output (C, h, w) -> class index per pixel in _classes order."""
    if info.task != "trees":
        return out.argmax(0)
    crown = out[0] >= info.threshold
    labels = crown.astype(np.int64)
    if out.shape[0] > 2:
        labels[crown & (out[2] >= 0.5)] = 2
    return labels


def evaluate(params: EvalParams, reporter: Reporter) -> StageResult:
    import onnxruntime as ort


    check_out_path(params.out, directory=True, inputs=[params.model, params.dataset])
    info = read_info(params.model)
    manifest = Manifest.read(params.dataset)
    if manifest.task != info.task or manifest.band_count != info.band_count:
        raise EngineError("MODEL_DATASET_MISMATCH",
                          f"The model ({info.task}, {info.band_count} bands) does not fit the dataset "
                          f"({manifest.task}, {manifest.band_count} bands).",
                          "Evaluate on a dataset made for this model's task and imagery bands.")
    if info.task != "trees" and manifest.class_names != info.class_names:
        raise EngineError("MODEL_DATASET_MISMATCH", f"The model's classes {info.class_names} are not the "
                          f"dataset's {manifest.class_names}.", "Evaluate on a dataset with the same classes.")
    chips = [c for c in manifest.chips if params.split == "all" and c["split"] != "buffer" or c["split"] == params.split]
    if not chips:
        raise EngineError("EMPTY_VAL_SPLIT" if params.split == "val" else "NO_CHIPS",
                          f"The dataset has no {params.split} chips to evaluate.", "Use --split all, or rebuild it.")
    session = ort.InferenceSession(str(onnx_path(params.model)), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2:]  # fixed (ints) or free (names) height and width
    if all(isinstance(d, int) for d in size) and list(size) != [manifest.chip_size] * 2:
        raise EngineError("MODEL_DATASET_MISMATCH", f"The model reads {size[0]} x {size[1]} px tiles; the dataset's "
                          f"chips are {manifest.chip_size} px.",
                          f"Evaluate on a dataset made with --chip-size {size[0]}, or with a model trained on "
                          "chips of this size.")
    norm = {"input_scale": info.input_scale, "mean": info.mean or [0.0] * info.band_count,
            "std": info.std or [1.0] * info.band_count}
    matrix, score, examples = None, CrownScore(), []
    for start in range(0, len(chips), BATCH):
        batch = chips[start:start + BATCH]
        pairs = [read_chip(params.dataset, c, norm, info.band_count) for c in batch]
        x = np.stack([p[0] for p in pairs]).transpose(0, 3, 1, 2).astype(np.float32)
        outs = session.run(None, {session.get_inputs()[0].name: x})[0]
        names = _classes(info, outs.shape[1])
        for chip, (_, y), out in zip(batch, pairs, outs):
            mask = y.transpose(2, 0, 1)
            truth = mask[0].astype(np.int64)
            if info.task == "classification":  # one label per chip: the counts are chips
                truth, guess = np.full(1, chip["class"]), np.full(1, out.argmax())
            else:
                guess = _labels(info, out)
            if info.task == "trees" and len(names) == 2:
                truth = np.where(truth == 2, 1, truth)  # a live/dead-blind model: dead is crown
            m = confusion(truth, guess, len(names))
            matrix = m if matrix is None else matrix + m
            if info.task == "trees":
                valid = mask[0] != IGNORE
                pred = crown_boxes(out[0], out[1], info.threshold, valid=valid,
                                   seed_radius_px=max(1, round(info.seed_distance_m / info.resolution_m)),
                                   min_pixels=max(1, round(info.min_crown_m2 / info.resolution_m**2)))
                score = score.add(match_boxes(pred, truth_boxes_from_mask(mask)))
            if len(examples) < EXAMPLES:  # a chip's class is shown as a square of its colour
                examples.append((chip, mask[0], guess) if guess.ndim == 2 else
                                (chip, np.full(mask[0].shape, truth[0]), np.full(mask[0].shape, guess[0])))
        reporter.progress("eval", min(start + BATCH, len(chips)), len(chips), "chips")
    metrics = chip_metrics(matrix, names) if info.task == "classification" else pixel_metrics(matrix, names)
    if info.task == "trees":
        metrics |= score.as_dict("crown_")
    unit = "chips" if info.task == "classification" else "pixels"
    with atomic_output(params.out, directory=True) as tmp:
        plot_confusion(matrix, names, tmp / "confusion_matrix.png")
        curves = onnx_path(params.model).parent / "training_curves.png"
        if curves.is_file():
            shutil.copy(curves, tmp / "training_curves.png")
        plot_examples(params.dataset, examples, info, names, tmp / "examples.png")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        md, page = report(params, info, metrics, matrix, names, len(chips), curves.is_file(), unit)
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(page)
    return StageResult(outputs={"report": str(params.out / "report.md"), "html": str(params.out / "report.html")},
                       summary={"chips": len(chips), **metrics})


def pixel_metrics(matrix: np.ndarray, names: list[str]) -> dict[str, float]:
    """Pixel accuracy, mIoU and IoU per class (classes absent from truth and prediction left out)."""
    ious = class_iou(matrix)
    return {"pixel_accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
            "miou": float(np.nanmean(ious)) if np.isfinite(ious).any() else 0.0,
            **{f"iou_{n}": float(v) for n, v in zip(names, ious) if np.isfinite(v)}}


def chip_metrics(matrix: np.ndarray, names: list[str]) -> dict[str, float]:
    """Chip accuracy, balanced accuracy (mean recall over the classes present) and recall per class."""
    rows = matrix.sum(1)
    recall = {n: float(matrix[i, i] / rows[i]) for i, n in enumerate(names) if rows[i]}
    return {"accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
            "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else 0.0,
            **{f"recall_{n}": v for n, v in recall.items()}}


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)  # per true class: where its pixels went
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(share):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_examples(dataset: Path, examples: list, info: ModelInfo, names: list[str], path: Path) -> None:
    """Imagery, truth and prediction side by side for a few chips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio
    from matplotlib.colors import ListedColormap

    colors = (["#000000", "#2ca02c", "#8c564b"] if info.task == "trees" else
              (info.class_colors or [f"C{i}" for i in range(len(names))]))[:len(names)]
    cmap = ListedColormap(colors)
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
    for row, (chip, truth, guess) in zip(axes, examples):
        with rasterio.open(Path(dataset) / chip["image"]) as src:
            rgb = src.read(list(range(1, min(3, src.count) + 1))).astype(np.float32).transpose(1, 2, 0)
        lo, hi = np.percentile(rgb, (2, 98))
        row[0].imshow(np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1).squeeze())
        row[1].imshow(np.ma.masked_equal(truth, IGNORE), cmap=cmap, vmin=0, vmax=len(names) - 1,
                      interpolation="nearest")
        row[2].imshow(guess, cmap=cmap, vmin=0, vmax=len(names) - 1, interpolation="nearest")
        for ax, title in zip(row, (f"chip {chip['id']}", "truth", "prediction")):
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def report(params: EvalParams, info: ModelInfo, metrics: dict, matrix: np.ndarray, names: list[str],
           n_chips: int, curves: bool, unit: str = "pixels") -> tuple[str, str]:
    """The same report as Markdown and as a standalone HTML page (images beside it)."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    images = [("Confusion matrix (share of each true class)", "confusion_matrix.png")] + \
        ([("Training curves", "training_curves.png")] if curves else []) + \
        [("Predictions over imagery", "examples.png")]
    head = (f"Model `{Path(params.model).name}` ({info.task}, classes {', '.join(info.class_names)}) on "
            f"{n_chips} {params.split} chips of dataset `{Path(params.dataset).name}`.")
    crown_note = ("Crowns: predicted crown boxes matched one-to-one to annotated boxes, a match at IoU >= 0.4 "
                  "(NeonTreeEvaluation protocol)." if info.task == "trees" else "")
    matrix_md = "| true \\ predicted | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n" + \
        "\n".join(f"| {n} | " + " | ".join(str(int(v)) for v in r) + " |" for n, r in zip(names, matrix))
    md = "\n".join([f"# Evaluation: {Path(params.model).name}", "", head, crown_note, "", "| metric | value |",
                    "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "", f"## Confusion matrix ({unit})", "",
                    matrix_md, "", *[f"## {t}\n\n![{t}]({f})\n" for t, f in images]])
    e = html.escape
    table = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows)
    cm = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>" + "".join(
        f"<tr><th>{e(n)}</th>" + "".join(f"<td>{int(v)}</td>" for v in r) + "</tr>" for n, r in zip(names, matrix))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation {e(Path(params.model).name)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;"
            "padding:2px 8px}table{border-collapse:collapse}</style></head><body>"
            f"<h1>Evaluation: {e(Path(params.model).name)}</h1><p>{e(head)}</p><p>{e(crown_note)}</p>"
            f"<table><tr><th>metric</th><th>value</th></tr>{table}</table><h2>Confusion matrix ({unit})</h2>"
            f"<table>{cm}</table>" + "".join(f"<h2>{e(t)}</h2><img src='{f}' alt='{e(t)}'>" for t, f in images)
            + "</body></html>")
    return md, page
