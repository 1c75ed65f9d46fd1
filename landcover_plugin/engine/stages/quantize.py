"""`landcover quantize`: an int8 copy of a model (onnxruntime quantization).

With imagery, static quantization (QDQ, int8 weights per output channel and
uint8 activations: onnxruntime fuses each DequantizeLinear-Conv-QuantizeLinear
into a QLinearConv, whose u8s8 kernels use the CPU's VNNI or AMX instructions
where present) calibrated on tiles of that imagery, normalised exactly as predict
does; without, dynamic quantization (weights only). The metadata is carried over,
so the int8 model runs in `landcover predict` (and Deepness) like the original.

With `--dataset` (the model's own validation datasets), both models are scored on
their validation chips and the int8 one is marked as holding the accuracy (crown F1
within 0.01, mIoU or chip accuracy within 0.005); saved as `model-int8.onnx` in the
model's folder, predict then runs it by default. No TensorFlow here.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..atomic import atomic_output, check_out_path
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..imagery.raster import open_raster
from ..learn.model_package import ONNX_NAME, ModelInfo, onnx_path, read_info, write_metadata


@dataclass(frozen=True)
class QuantizeParams:
    model: Path
    out: Path  # a model folder, or a .onnx file
    imagery: Path | None = None  # calibration imagery (static quantization); None: dynamic
    calibration_tiles: int = 16
    datasets: tuple[Path, ...] = ()  # the model's own validation: int8 checked to hold its accuracy


# The score predict's default to int8 is judged by, and the most it may lose (issue 17).
HOLDS = {"trees": ("crown_f1", 0.01), "classification": ("accuracy", 0.005)}
HOLDS_DEFAULT = ("miou", 0.005)


def calibration_batches(imagery: Path, info: ModelInfo, count: int, reporter: Reporter) -> list[np.ndarray]:
    """`count` model inputs (1, bands, tile, tile) spread evenly over the imagery,
    scaled as predict will scale this imagery for the model."""
    from rasterio.windows import Window

    from ..learn.inference import Tile, fit_input_scale, normalise, read_tile

    with open_raster(imagery) as src:
        info = fit_input_scale(src, info, reporter)
        size = info.tile_size
        rows = max(1, src.height // size)
        cols = max(1, src.width // size)
        picks = np.linspace(0, rows * cols - 1, min(count, rows * cols)).astype(int)
        out = []
        for k in picks:
            raw, ok = read_tile(src, Window(0, 0, src.width, src.height),
                                Tile((k // cols) * size, (k % cols) * size, size, 0), info.band_count)
            out.append(np.where(ok, normalise(raw, info), 0.0)[None].astype(np.float32))
    return out


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared inputs."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def quantize_file(src: Path, dst: Path, calibration: list[np.ndarray] | None) -> str:
    """Write the int8 model of `src` to `dst`: static when calibration inputs are
    given, else dynamic; returns the method used."""
    import onnxruntime as ort
    from onnxruntime.quantization import (QuantFormat, QuantType, quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference and graph fusions make quantization cover more nodes
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - optional step; the plain model quantizes too
            shutil.copy(src, prepared)
        if calibration is None:
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
            method = "dynamic"
        else:
            name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
            reader = _Reader(name, calibration)
            # Per-channel weights: the U-Nets' largest output difference to float 0.05 instead of
            # 0.12, at the same speed (measured on trees-base).
            quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            method = "static"
    return method


def validation_score(model: Path, datasets: tuple[Path, ...], task: str) -> float:
    """The model's score (HOLDS) over the validation chips of the datasets: crowns pooled
    over them, else the mean weighted by their chips."""
    import io

    from .evaluate import EvalParams, evaluate

    quiet = Reporter(json_mode=True, out=io.StringIO())
    with tempfile.TemporaryDirectory() as tmp:
        results = [evaluate(EvalParams(model=model, dataset=d, out=Path(tmp) / f"eval{k}"), quiet).summary
                   for k, d in enumerate(datasets)]
    if task == "trees":
        tp, fp, fn = (sum(r[f"crown_{k}"] for r in results) for k in ("tp", "fp", "fn"))
        return 2 * tp / max(2 * tp + fp + fn, 1)
    metric = HOLDS.get(task, HOLDS_DEFAULT)[0]
    return sum(r[metric] * r["chips"] for r in results) / sum(r["chips"] for r in results)


def accuracy_check(fp32: Path, int8: Path, datasets: tuple[Path, ...], task: str) -> dict[str, float]:
    """Both models scored on the datasets; `int8_accuracy_holds` 1 when int8 loses at most HOLDS."""
    metric, most = HOLDS.get(task, HOLDS_DEFAULT)
    before, after = validation_score(fp32, datasets, task), validation_score(int8, datasets, task)
    return {f"fp32_{metric}": round(before, 4), f"int8_{metric}": round(after, 4),
            "int8_accuracy_holds": float(after >= before - most)}


def quantize(params: QuantizeParams, reporter: Reporter) -> StageResult:
    src = onnx_path(params.model)
    info = read_info(src)
    if params.calibration_tiles < 1:
        raise EngineError("BAD_PARAMS", f"--calibration-tiles {params.calibration_tiles} is below 1.",
                          "Give e.g. --calibration-tiles 16, or leave out --imagery for dynamic quantization.")
    single_file = params.out.suffix == ".onnx"
    check_out_path(params.out, directory=not single_file, inputs=[params.model, params.imagery, *params.datasets])
    reporter.progress("quantize", 0, 1, "quantizing")
    with atomic_output(params.out, directory=not single_file) as tmp:
        target = tmp if single_file else tmp / ONNX_NAME
        try:
            calibration = (calibration_batches(params.imagery, info, params.calibration_tiles, reporter)
                           if params.imagery else None)
            method = quantize_file(src, target, calibration)
        except EngineError:
            raise
        except Exception as exc:  # onnxruntime's quantizer raises untyped errors on odd graphs
            raise EngineError("QUANTIZE_FAILED", f"onnxruntime could not quantize {src}: {exc}",
                              "Try without --imagery (dynamic quantization), or use the float model.") from None
        int8_info = replace(info, metrics=info.metrics | {"quantization": f"int8-{method}"})
        write_metadata(target, int8_info)
        check = {}
        if params.datasets:
            reporter.progress("quantize", 0, 1, "scoring both models on the validation chips")
            check = accuracy_check(src, target, params.datasets, info.task)
            write_metadata(target, replace(int8_info, metrics=int8_info.metrics | check))
    reporter.progress("quantize", 1, 1, "done")
    out = params.out if single_file else params.out / ONNX_NAME
    summary = {"method": method, "size_mb": round(out.stat().st_size / 1e6, 3),
               "original_size_mb": round(src.stat().st_size / 1e6, 3), **check}
    return StageResult(outputs={"model": str(out)}, summary=summary)
