"""What a model file says about itself, read with the standard library only.

QGIS's Python has no `onnx` package, yet the dock lists models with their task,
resolution, bands and score. An ONNX file is a protobuf `ModelProto`; its
`metadata_props` (field 14) are key/value strings at the top level, so they are
found by skipping the other top-level fields (the graph) without parsing them.
Our keys are `landcover.*` as JSON (engine/learn/model_package.py); a peer's
model (Deepness, GeoDeep) has only theirs.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

METADATA_PROPS = 14  # ModelProto.metadata_props
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class NotAModel(ValueError):
    """A file that is not an ONNX model."""


def _varint(read: BinaryIO) -> int | None:
    value, shift = 0, 0
    while True:
        byte = read.read(1)
        if not byte:
            if shift:
                raise NotAModel("truncated")
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise NotAModel("varint too long")


def _fields(data: bytes) -> dict[int, str]:
    """A StringStringEntryProto's fields 1 (key) and 2 (value)."""
    out, stream = {}, io.BytesIO(data)
    while (tag := _varint(stream)) is not None:
        if tag & 7 != _BYTES:
            raise NotAModel("metadata entry is not strings")
        out[tag >> 3] = stream.read(_varint(stream) or 0).decode("utf-8", "replace")
    return out


def onnx_metadata(path: Path) -> dict[str, str]:
    """The model's metadata_props as a dict; NotAModel for a file that is not ONNX."""
    props: dict[str, str] = {}
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        while (tag := _varint(f)) is not None:
            number, wire = tag >> 3, tag & 7
            if number == 0 or wire not in (_VARINT, _FIXED64, _BYTES, _FIXED32):
                raise NotAModel(f"{path.name} is not an ONNX model")
            if wire == _VARINT:
                _varint(f)
            elif wire in (_FIXED64, _FIXED32):
                f.seek(8 if wire == _FIXED64 else 4, 1)
            else:
                length = _varint(f) or 0
                if f.tell() + length > size:
                    raise NotAModel(f"{path.name} is not an ONNX model (or it is truncated)")
                if number == METADATA_PROPS:
                    entry = _fields(f.read(length))
                    props[entry.get(1, "")] = entry.get(2, "")
                else:
                    f.seek(length, 1)
    return props


@dataclass(frozen=True)
class ModelSummary:
    """What the dock shows of a model and checks a job against."""

    path: Path  # the model.onnx
    task: str
    band_count: int
    resolution_m: float
    score: str = ""  # its headline validation score, e.g. "crown F1 0.61"

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def report(self) -> Path | None:
        card = self.folder / "MODEL_CARD.md"
        return card if card.is_file() else None


# The headline score of each task: the first of these the model's metrics hold.
_SCORES = (("val_crown_f1_tuned", "crown F1"), ("val_crown_f1", "crown F1"), ("cv_accuracy", "accuracy"),
           ("val_accuracy", "accuracy"), ("val_miou", "mIoU"), ("val_crown_iou", "crown IoU"))


def headline_score(metrics: dict) -> str:
    for key, label in _SCORES:
        if isinstance(metrics.get(key), (int, float)):
            return f"{label} {metrics[key]:.2f}"
    return ""


def read_summary(path: Path) -> ModelSummary:
    """A model folder's (or .onnx file's) summary; NotAModel when it cannot be read as ours or a peer's."""
    path = Path(path)
    onnx = path / "model.onnx" if path.is_dir() else path
    if not onnx.is_file():
        raise NotAModel(f"{path} holds no model.onnx")
    props = onnx_metadata(onnx)
    ours = {k.split(".", 1)[1]: v for k, v in props.items() if k.startswith("landcover.")}
    try:
        if ours:
            metrics = json.loads(ours.get("metrics", "{}")) or {}
            return ModelSummary(onnx, json.loads(ours["task"]), int(json.loads(ours["band_count"])),
                                float(json.loads(ours["resolution_m"])), headline_score(metrics))
        # A peer's model: Deepness/GeoDeep keys (resolution in cm/px); the engine reads its band count
        # from the input tensor, which this reader does not parse.
        kind = json.loads(props["model_type"]) if props.get("model_type", "").startswith('"') else props["model_type"]
        task = {"detector": "trees", "segmentor": "landcover"}.get(kind.lower(), "")
        return ModelSummary(onnx, task, 0, float(props.get("resolution", "0") or 0) / 100.0)
    except (KeyError, ValueError, TypeError) as exc:
        raise NotAModel(f"{onnx} has no model metadata Landcover can read ({exc})") from None
