"""`landcover quantize`: an int8 copy of a model (onnxruntime quantization).

With imagery, static quantization (QDQ, int8 weights and uint8 activations)
calibrated on tiles of that imagery, normalised exactly as predict does; without,
dynamic quantization (weights only). The metadata is carried over, so the int8
model runs in `landcover predict` (and Deepness) like the original.
No TensorFlow here.
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
            quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            method = "static"
    return method


def quantize(params: QuantizeParams, reporter: Reporter) -> StageResult:
    src = onnx_path(params.model)
    info = read_info(src)
    if params.calibration_tiles < 1:
        raise EngineError("BAD_PARAMS", f"--calibration-tiles {params.calibration_tiles} is below 1.",
                          "Give e.g. --calibration-tiles 16, or leave out --imagery for dynamic quantization.")
    single_file = params.out.suffix == ".onnx"
    check_out_path(params.out, directory=not single_file, inputs=[params.model, params.imagery])
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
        write_metadata(target, replace(info, metrics=info.metrics | {"quantization": f"int8-{method}"}))
    reporter.progress("quantize", 1, 1, "done")
    out = params.out if single_file else params.out / ONNX_NAME
    summary = {"method": method, "size_mb": round(out.stat().st_size / 1e6, 3),
               "original_size_mb": round(src.stat().st_size / 1e6, 3)}
    return StageResult(outputs={"model": str(out)}, summary=summary)
