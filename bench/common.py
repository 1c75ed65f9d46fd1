"""Helpers shared by the bench modules (not a bench itself: no SECTION)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the engine's venv
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's engine, as the child processes get it


def engine_env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_child(args: list[str], timeout: int = 1800, env: dict | None = None) -> str:
    """Run a child process; its stdout, or an error with its stderr's tail."""
    proc = subprocess.run(args, env=env or engine_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def tiled_scene(path: Path, side: int, pixel_m: float | None = None) -> tuple[Path, float]:
    """OSBS_029 (400 px at 0.1 m) repeated to `side` x `side` px (pixels of `pixel_m` m if given),
    and its area in km²."""
    import rasterio
    from rasterio.transform import Affine

    with rasterio.open(ROOT / "data" / "deepforest" / "OSBS_029.tif") as src:
        reps = -(-side // min(src.height, src.width))
        data, profile = np.tile(src.read(), (1, reps, reps))[:, :side, :side], src.profile
        t = src.transform
    size = pixel_m or t.a
    profile |= {"width": side, "height": side, "transform": Affine(size, 0, t.c, 0, -size, t.f)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path, side * side * size ** 2 / 1e6


def peak_rss_mb(argv: list[str]) -> float:
    """Peak RSS (MB) of `landcover ARGV` run in a fresh process (no TensorFlow there).
    VmHWM, not getrusage's ru_maxrss: on Linux the latter keeps the forking parent's
    peak across exec, so a big bench process would show in its child's number."""
    code = ("import sys; from landcover_plugin.engine.cli import main; "
            f"code = main({argv!r}); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('RSS', int(hwm) / 1024); sys.exit(code)")
    out = run_child([PYTHON, "-c", code])
    return float([line for line in out.splitlines() if line.startswith("RSS ")][-1].split()[1])


def tiles_per_second(run_batch, tiles: np.ndarray, batch: int, repeats: int = 2) -> float:
    """Best of `repeats` passes over `tiles` in batches (after one warm-up batch)."""
    run_batch(tiles[:batch])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(tiles), batch):
            run_batch(tiles[i:i + batch])
        best = min(best, time.perf_counter() - started)
    return len(tiles) / best


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's practical float32 peak: a large matrix product (BLAS, all cores)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best


def onnx_flops(model_path: Path, tile: int) -> float:
    """Multiply-add FLOPs (x2) of one tile through the model's Conv/ConvTranspose/MatMul nodes."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(model_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    flops = 0.0
    for node in model.graph.node:
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv" and w and node.output[0] in shapes:
            out = shapes[node.output[0]]
            flops += 2 * np.prod(out[1:]) * np.prod(w[1:])  # w: (Cout, Cin/group, kh, kw)
        elif node.op_type == "ConvTranspose" and w and node.input[0] in shapes:
            inp = shapes[node.input[0]]
            flops += 2 * np.prod(inp[1:]) * np.prod(w[1:])  # w: (Cin, Cout/group, kh, kw)
    return float(flops)


def miou(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    ious = []
    for k in range(n_classes):
        union = np.sum((pred == k) | (truth == k))
        if union:
            ious.append(np.sum((pred == k) & (truth == k)) / union)
    return float(np.mean(ious))
