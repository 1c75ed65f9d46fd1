"""Inference speed: onnxruntime vs Keras on the same U-Net and tiles (Keras: the faster
of model.predict and calling the model), each one's share of the machine's float32
peak, and the int8 model's speed and accuracy change.

Keras runs in a child process (bench/keras_child.py) and onnxruntime here, never
both in one process (docs/DESIGN.md: they contend for threads). The model is the
project's U-Net (engine/unet.build_unet, 256 px, 4 classes) briefly fitted on
synthetic colour-coded tiles, exported with learn/export.export_onnx.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import PYTHON, ROOT, last_json, matmul_peak_flops, miou, onnx_flops, run_child, tiles_per_second

SECTION = "inference"
TILE, N_TILES, BATCH = 256, 32, 8


def ort_session(path: Path):
    """A session tuned as predict's (landcover_plugin.engine.stages.predict.open_session)."""
    import io

    from landcover_plugin.engine.events import Reporter
    from landcover_plugin.engine.learn.inference import open_session

    session, _ = open_session(path, Reporter(json_mode=True, out=io.StringIO()))
    return session


def run(workdir: Path) -> dict:
    keras = last_json(run_child([PYTHON, str(ROOT / "bench" / "keras_child.py"), str(workdir), str(TILE),
                                 str(N_TILES), str(BATCH)]))
    tiles = np.load(workdir / "tiles.npy")
    labels = np.load(workdir / "labels.npy")
    peak = matmul_peak_flops()

    session = ort_session(workdir / "model.onnx")
    name = session.get_inputs()[0].name
    fp32 = tiles_per_second(lambda x: session.run(None, {name: x}), tiles, BATCH)
    pred32 = np.argmax(session.run(None, {name: tiles})[0], axis=1)

    from landcover_plugin.engine.stages.quantize import quantize_file

    quantize_file(workdir / "model.onnx", workdir / "int8.onnx", [tiles[i:i + 1] for i in range(0, N_TILES, 4)])
    q = ort_session(workdir / "int8.onnx")
    int8 = tiles_per_second(lambda x: q.run(None, {name: x}), tiles, BATCH)
    pred8 = np.argmax(q.run(None, {name: tiles})[0], axis=1)

    miou32, miou8 = miou(pred32, labels, 4), miou(pred8, labels, 4)
    flops = onnx_flops(workdir / "model.onnx", TILE)
    baseline = keras["keras_tiles_per_s"]
    share = flops * fp32 / peak
    if share > 1:  # nothing runs above the machine's peak: the reference matmul was slowed (a loaded machine)
        print(f"  peak share {share:.2f} > 1: the matmul reference ({peak / 1e9:.0f} GFLOP/s) was measured wrong "
              "(the machine was busy); shares left out", flush=True)
    shares = {"peak_flops_share": round(share, 4), "keras_peak_flops_share": round(flops * baseline / peak, 4),
              # the most any float32 runtime could gain over Keras here: run at the matmul peak
              "max_speedup_at_peak": round(peak / (flops * baseline), 3)} if share <= 1 else {"peak_reference_wrong": 1}
    return {
        "ort_tiles_per_s": round(fp32, 2),
        "keras_tiles_per_s": round(baseline, 2),
        "keras_predict_tiles_per_s": round(keras["keras_predict_tiles_per_s"], 2),
        "keras_call_tiles_per_s": round(keras["keras_call_tiles_per_s"], 2),
        "speedup_vs_keras": round(fp32 / baseline, 3),
        "model_gflops_per_tile": round(flops / 1e9, 3),
        "peak_gflops_matmul": round(peak / 1e9, 1),
        **shares,
        "miou_fp32": round(miou32, 4),
        "int8_speedup": round(int8 / fp32, 3),
        "int8_speedup_vs_keras": round(int8 / baseline, 3),
        "int8_miou_change": round(miou8 - miou32, 4),
    }
