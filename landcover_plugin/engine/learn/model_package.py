"""The model package: a folder with `model.onnx` (+ `model.keras`, `MODEL_CARD.md`).

Everything inference needs travels in the ONNX file's `metadata_props`, under
the keys the Deepness QGIS plugin and GeoDeep read (so our models run in those
tools and theirs in ours) plus our own `landcover.*` keys.

The peers' keys in model.onnx are written as their own tools write them
(`json.dumps`, docs/DESIGN.md "Deepness and GeoDeep"); a package also holds
`model-peers.onnx` (learn/peer_export.py), the model as those tools run it.
Models with only the peers' keys (theirs) are read by `_from_peers`.

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

import ast
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...contract.names import MODELS_DIR
from ...contract.tasks import TASK_IDS
from ..errors import EngineError

ONNX_NAME = "model.onnx"
KERAS_NAME = "model.keras"
INT8_ONNX_NAME = "model-int8.onnx"  # `landcover quantize --dataset` beside model.onnx: predict's default where it holds
PEER_ONNX_NAME = "model-peers.onnx"  # the model as Deepness and GeoDeep run it (learn/peer_export.py)
# How the peers run each of our tasks' model.onnx (their model_type vocabulary): a trees
# model's channel 0 is the crown probability, which Deepness shows as a Regressor's raster.
PEER_MODEL_TYPE = {"landcover": "Segmentor", "buildings": "Segmentor", "trees": "Regressor"}
PEER_TILES_OVERLAP = 5.0  # percent; GeoDeep's default when a model has none
PEER_SEG_THRESH = 0.5  # GeoDeep's default
PEER_DET_CONF, PEER_DET_IOU = 0.3, 0.8  # GeoDeep's defaults
PEER_DET_TYPE = "YOLO_v5_or_v7_default"  # GeoDeep's default; Deepness's first
PEER_ONLY = ("seg_thresh", "detector", "det_conf", "det_iou")  # ModelInfo fields only theirs set


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
    confidence_scale: float = 1.0  # trees: a crown's confidence is its mean probability calibrated
    confidence_shift: float = 0.0  # on validation crowns (vector/confidence.py); 1, 0: uncalibrated
    # Read from the peers' models only (never written among ours):
    seg_thresh: float = 0.0  # class probabilities below it count as 0 before the argmax (their rule)
    detector: str = ""  # a Detector's det_type (its output layout); "" for segmentation
    det_conf: float = PEER_DET_CONF  # Detector: least box confidence
    det_iou: float = PEER_DET_IOU  # Detector: IoU above which the weaker of two boxes goes (NMS)

    def metadata_props(self) -> dict[str, str]:
        """The ONNX metadata: the peers' keys as their tools write them, plus ours (all strings)."""
        channels = ["crown_probability", "centre_heatmap", "dead_probability"][:3 if "dead" in self.class_names else 2]
        peers = {
            "model_type": PEER_MODEL_TYPE.get(self.task, self.task),  # classification: none of theirs
            "class_names": {str(i): n for i, n in enumerate(channels if self.task == "trees" else self.class_names)},
            "resolution": self.resolution_m * 100.0,  # cm/px
            "tiles_size": self.tile_size,
            "tiles_overlap": self.overlap_percent(),
            "standardization_mean": self.mean,
            "standardization_std": self.std,
            "seg_thresh": 0.0,  # a softmax's argmax, as ours (their 0.5 left most pixels without a class)
            "seg_small_segment": 1 if self.task in ("landcover", "buildings") else 0,  # see peer_export.py
        }
        ours = {f"landcover.{k}": json.dumps(v) for k, v in asdict(self).items() if k not in PEER_ONLY}
        return {**{k: json.dumps(v) for k, v in peers.items()}, **ours}

    def overlap_percent(self) -> float:
        """The peers' tiles_overlap: the overlap of two neighbouring tiles in percent of the
        tile; we drop `tile_overlap` pixels on each side, so neighbours overlap twice that."""
        return 100.0 * 2 * self.tile_overlap / self.tile_size

    @classmethod
    def from_metadata_props(cls, props: dict[str, str], input_shape: tuple = (),
                            output_shape: tuple = ()) -> "ModelInfo":
        """Ours from the `landcover.*` keys; a peer's from its keys and tensor shapes."""
        try:
            ours = {k.split(".", 1)[1]: json.loads(v) for k, v in props.items() if k.startswith("landcover.")}
            info = cls(**{k: v for k, v in ours.items() if k in cls.__dataclass_fields__}) if ours else None
        except (ValueError, TypeError) as exc:  # not JSON, or a field missing
            raise EngineError("BAD_MODEL", f"The model's landcover metadata is garbled: {exc}",
                              "Use a model made by `landcover train`, unmodified.") from None
        return check_info(info or _from_peers(props, input_shape, output_shape))


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
        ("tile_overlap", whole(info.tile_overlap, 0) and whole(info.tile_size, 1)
         and 2 * info.tile_overlap < info.tile_size),  # else no tile keeps a pixel
        ("resolution_m", positive(info.resolution_m)),
        ("input_scale", positive(info.input_scale)),
        ("mean", isinstance(info.mean, list) and all(type(v) in (int, float) for v in info.mean)),
        ("std", isinstance(info.std, list) and all(positive(v) for v in info.std)),
        ("threshold", type(info.threshold) in (int, float) and 0 <= info.threshold <= 1),
        ("seg_thresh", type(info.seg_thresh) in (int, float) and 0 <= info.seg_thresh <= 1),
        ("det_conf", type(info.det_conf) in (int, float) and 0 <= info.det_conf <= 1),
        ("det_iou", type(info.det_iou) in (int, float) and 0 < info.det_iou <= 1),
    ) if not ok]
    if problems:
        raise EngineError("BAD_MODEL", f"The model's metadata has impossible values for {', '.join(problems)}.",
                          "Use a model made by `landcover train` (or a Deepness model), unmodified.")
    return info


def peer_value(text: str):
    """A metadata value as the peers read it: JSON (as their tools write it), else a Python
    literal (Deepness reads `{0: 'road'}` so), else the bare text."""
    try:
        return json.loads(text)
    except ValueError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text


def peer_class_names(value, output_shape: tuple, segmentor: bool = True) -> list[str]:
    """Deepness's and GeoDeep's class_names forms -> one name per class: a dict {id: name}
    (ids as text or numbers), a list of names, or a list of such dicts (one per output: the
    first output's). A segmentor's one sigmoid channel with one name means [background, name]."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        value = value[0]
    if isinstance(value, dict):
        ids = sorted(int(k) for k in value)
        if ids != list(range(len(ids))):
            raise ValueError("class_names: ids not 0, 1, 2, ...")
        value = [value[k] if k in value else value[str(k)] for k in ids]
    if not isinstance(value, list):
        raise ValueError(f"class_names: {value!r} is neither a dict nor a list")
    names = [str(n) for n in value]
    if not segmentor:
        return names
    sigmoid = len(output_shape) == 3 or (len(output_shape) == 4 and output_shape[1] == 1)  # (n, h, w): one too
    channels = 1 if len(output_shape) == 3 else _fixed(output_shape[1]) if len(output_shape) == 4 else None
    if not names and channels:  # none given: Deepness's names
        names = [f"channel_{i}" for i in range(channels)]
    return ["background", *names] if sigmoid and len(names) == 1 else names


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _from_peers(props: dict[str, str], input_shape: tuple, output_shape: tuple) -> ModelInfo:
    """A model with only Deepness's or GeoDeep's keys (their model zoos, their export tools).
    Read as they read it: the tile size from a fixed input shape (their tools take it from
    there; `tiles_size` may be missing), their defaults for missing keys."""
    v = {k: peer_value(t) for k, t in props.items()}
    mask = len(output_shape) == 4 or (len(output_shape) == 3 and input_shape[-1:] == output_shape[-1:])
    kind = str(v.get("model_type", "Segmentor" if mask else "Detector"))  # none: a (n, [c,] h, w) output is a mask
    kind = {"segmentation": "Segmentor", "detection": "Detector"}.get(kind.lower(), kind.capitalize())
    if kind not in ("Segmentor", "Detector"):
        raise EngineError("UNSUPPORTED_MODEL", f"The model is a {kind} model; landcover runs Segmentor and "
                          "Detector models (and its own).",
                          "Run it in the tool it was made for (e.g. Deepness), or give a segmentation or "
                          "detection model.")
    try:
        tile = _fixed(input_shape[-1]) if len(input_shape) == 4 else None
        tile = tile or int(v.get("tiles_size", v.get("tile_size", 512)))
        mean = [float(x) for x in v.get("standardization_mean", [])]
        bands = (_fixed(input_shape[1]) if len(input_shape) == 4 else None) or len(mean) or 3
        percent = float(v.get("tiles_overlap", PEER_TILES_OVERLAP))
        return ModelInfo(
            task="trees" if kind == "Detector" else "landcover",
            class_names=peer_class_names(v.get("class_names", v.get("names", {})), output_shape,
                                         segmentor=kind == "Segmentor"),
            class_colors=[], band_count=bands, resolution_m=float(v.get("resolution", 10)) / 100.0,
            tile_size=tile, tile_overlap=int(tile * percent / 100) // 2,  # as they split it: half a side
            mean=mean, std=[float(x) for x in v.get("standardization_std", [])],
            seg_thresh=float(v.get("seg_thresh", PEER_SEG_THRESH)),
            detector=str(v.get("det_type", PEER_DET_TYPE)) if kind == "Detector" else "",
            det_conf=float(v.get("det_conf", PEER_DET_CONF)), det_iou=float(v.get("det_iou_thresh", PEER_DET_IOU)),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise EngineError("BAD_MODEL", f"The model's metadata lacks or garbles {exc}.",
                          "Use a model made by `landcover train`, or one with Deepness or GeoDeep metadata.") from None


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
    graph = proto.graph
    weights = {t.name for t in graph.initializer}  # old exports list them among the inputs
    inputs = [i for i in graph.input if i.name not in weights]
    return ModelInfo.from_metadata_props({p.key: p.value for p in proto.metadata_props},
                                         tensor_shape(inputs[0]) if inputs else (),
                                         tensor_shape(graph.output[0]) if graph.output else ())


def tensor_shape(value_info) -> tuple:
    """An ONNX input's or output's shape: ints where fixed, names (or None) where not."""
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in value_info.type.tensor_type.shape.dim)
