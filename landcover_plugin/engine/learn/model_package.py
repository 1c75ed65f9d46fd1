"""The model package: a folder with `model.onnx` (+ `model.keras`, `MODEL_CARD.md`).

Everything inference needs travels in the ONNX file's `metadata_props`, under
the keys the Deepness QGIS plugin and GeoDeep read (so our models run in those
tools and theirs in ours) plus our own `landcover.*` keys.

Tensor layout (Deepness's): input float32 NCHW [batch, bands, tile, tile],
already normalised as ((raw / input_scale) - mean) / std; output float32 NCHW.
- landcover: C = len(class_names), softmax class probabilities.
- buildings: the same with class_names ["background", "building"].
- classification: output (n, C), one softmax per chip (tile); tiles_overlap 0;
  Deepness model_type "classification" (Deepness itself cannot run it).
- trees: C = 2, channel 0 crown probability, channel 1 tree-centre heatmap
  (both sigmoid; the heatmap peaks at tree centres); C = 3 when class_names
  include "dead" (["crown", "dead"]): channel 2 the probability that a crown
  pixel is dead.
No TensorFlow here: predict reads packages in a process without it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...contract.names import MODELS_DIR
from ...contract.tasks import TASK_IDS
from ..errors import EngineError

ONNX_NAME = "model.onnx"
KERAS_NAME = "model.keras"


@dataclass
class ModelInfo:
    task: str  # one of contract.tasks.TASK_IDS
    class_names: list[str]  # landcover: one per output channel; trees: ["crown"]
    class_colors: list[str]  # "#rrggbb", one per class name
    band_count: int  # imagery bands the model reads, in order 1..band_count
    resolution_m: float  # ground resolution it was trained at, metres per pixel
    tile_size: int  # pixels, square
    tile_overlap: int  # pixels on each side discarded when merging tiles
    input_scale: float = 255.0  # raw values are divided by this first
    mean: list[float] = field(default_factory=list)  # per band, after scaling
    std: list[float] = field(default_factory=list)
    dataset: str = ""  # dataset folder name / id it was trained on
    metrics: dict = field(default_factory=dict)  # validation metrics
    threshold: float = 0.5  # crown probability threshold (trees)
    dataset_hash: str = ""  # sha256 of the dataset snapshot's dataset.json
    seed_distance_m: float = 1.0  # trees: two tree centres are at least this far apart
    min_crown_m2: float = 0.5  # trees: smaller crowns are noise
    nir_band: int | None = None  # 1-based imagery band holding near infrared, for NDVI (trees)

    def metadata_props(self) -> dict[str, str]:
        """The ONNX metadata: Deepness keys plus ours (all strings)."""
        deepness = {
            "model_type": "classification" if self.task == "classification" else "segmentation",
            "class_names": json.dumps({str(i): n for i, n in enumerate(self.class_names)}),
            "resolution": str(self.resolution_m * 100.0),  # Deepness: cm/px
            "tiles_size": str(self.tile_size),
            "tiles_overlap": str(round(100 * self.tile_overlap / self.tile_size)),  # Deepness: percent
            "standardization_mean": json.dumps(self.mean),
            "standardization_std": json.dumps(self.std),
            "seg_thresh": str(self.threshold),
        }
        ours = {f"landcover.{k}": json.dumps(v) for k, v in asdict(self).items()}
        return {**deepness, **ours}

    @classmethod
    def from_metadata_props(cls, props: dict[str, str]) -> "ModelInfo":
        try:
            ours = {k.split(".", 1)[1]: json.loads(v) for k, v in props.items() if k.startswith("landcover.")}
            info = cls(**{k: v for k, v in ours.items() if k in cls.__dataclass_fields__}) if ours else None
        except (ValueError, TypeError) as exc:  # not JSON, or a field missing
            raise EngineError("BAD_MODEL", f"The model's landcover metadata is garbled: {exc}",
                              "Use a model made by `landcover train`, unmodified.") from None
        return check_info(info or _from_deepness(props))


def check_info(info: ModelInfo) -> ModelInfo:
    """Metadata that would crash or silently spoil a prediction is refused up front."""
    def whole(v, least: int) -> bool:
        return type(v) is int and v >= least

    def positive(v) -> bool:
        return type(v) in (int, float) and 0 < v < float("inf")

    problems = [name for name, ok in (
        ("task", info.task in TASK_IDS),
        ("class_names", isinstance(info.class_names, list) and info.class_names
         and all(isinstance(n, str) for n in info.class_names)),
        ("band_count", whole(info.band_count, 1)),
        ("tile_size", whole(info.tile_size, 1)),
        ("tile_overlap", whole(info.tile_overlap, 0)),
        ("resolution_m", positive(info.resolution_m)),
        ("input_scale", positive(info.input_scale)),
        ("mean", isinstance(info.mean, list) and all(type(v) in (int, float) for v in info.mean)),
        ("std", isinstance(info.std, list) and all(positive(v) for v in info.std)),
        ("threshold", type(info.threshold) in (int, float) and 0 <= info.threshold <= 1),
    ) if not ok]
    if problems:
        raise EngineError("BAD_MODEL", f"The model's metadata has impossible values for {', '.join(problems)}.",
                          "Use a model made by `landcover train` (or a Deepness model), unmodified.")
    return info


def _from_deepness(props: dict[str, str]) -> ModelInfo:
    """A model that carries only Deepness keys (e.g. from its model zoo)."""
    try:
        names = json.loads(props["class_names"])
        tile = int(props.get("tiles_size", 512))
        mean = json.loads(props.get("standardization_mean", "[]"))
        class_names = [names[k] for k in sorted(names, key=int)] if isinstance(names, dict) else list(names)
        return ModelInfo(
            task="landcover", class_names=class_names, class_colors=[],
            band_count=len(mean) or 3, resolution_m=float(props.get("resolution", 10)) / 100.0,
            tile_size=tile, tile_overlap=int(tile * float(props.get("tiles_overlap", 0)) / 100),
            mean=mean, std=json.loads(props.get("standardization_std", "[]")),
            threshold=float(props.get("seg_thresh", 0.5)),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise EngineError("BAD_MODEL", f"The model's metadata lacks or garbles {exc}.",
                          "Use a model made by `landcover train` or one with Deepness metadata.") from None




def onnx_path(model: Path | str) -> Path:
    """A model folder, an .onnx file or the name of a shipped model
    (a folder in resources/models, e.g. "trees-base") -> the .onnx file."""
    path = Path(model)
    if not path.exists() and len(path.parts) == 1 and (MODELS_DIR / path.name).is_dir():
        path = MODELS_DIR / path.name
    if path.is_dir():
        path = path / ONNX_NAME
    if not path.is_file():
        raise EngineError("MODEL_NOT_FOUND", f"No model at {model}.",
                          "Give a model folder made by `landcover train` or an .onnx file.")
    return path


def write_metadata(onnx_file: Path, info: ModelInfo) -> None:
    import onnx

    model = onnx.load(str(onnx_file))
    del model.metadata_props[:]
    for key, value in info.metadata_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(onnx_file))


def read_info(model: Path | str) -> ModelInfo:
    """Read the ModelInfo of a model folder or .onnx file (no TensorFlow)."""
    import onnx

    path = onnx_path(model)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and others: not an ONNX file
        raise EngineError("BAD_MODEL", f"{path} is not an ONNX model: {type(exc).__name__}: {exc}",
                          "Give a model folder made by `landcover train` or an .onnx file (re-export it "
                          "if it was cut short).") from None
    return ModelInfo.from_metadata_props({p.key: p.value for p in proto.metadata_props})
