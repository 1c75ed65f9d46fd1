"""End to end: `landcover predict` in km²/min, the model's own share of it, and peak memory.

- Trees: trees-base over 1 km² at 0.1 m (OSBS_029 repeated to 10,000² px) with today's
  defaults, and over 2,500² px (a quarter of the width) with today's and with the old
  defaults (fp32, the model's own 128 px tiles, the prediction raster written and read
  back): `trees_speedup_vs_old` is the ratio on that same job, run in this bench.
- Land cover at 1 m: trees-base's crown/background segmentor (`model-peers.onnx`, a
  U-Net on the land-cover path) over 5,000² px at 1 m (25 km²), both defaults.
- int8: trees-base quantized here (calibrated on OSBS_029) run with `--precision int8`
  over the 2,500² px job; `int8_kernels` the optimized graph's quantized operators
  (QLinearConv: onnxruntime's u8s8 kernels, which use VNNI or AMX where the CPU has
  them; `cpu_vnni`, `cpu_amx` say whether it does).

Model-only seconds: the run's tiles times the time per tile of a session on tiles of
the same raster (best of 2 passes), so `*_overhead_share` is the share of the run that
is not the model (reading, vectorization, measures, writing). Peak RSS: the predict
process's VmHWM and the largest worker process's (forked: it counts pages shared with
the predict process again). Each run is a fresh process.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from common import PYTHON, run_child, tiled_scene

SECTION = "e2e"
KM_SIDE, QUARTER_SIDE, LANDCOVER_SIDE = 10_000, 2_500, 5_000
OLD = ("--precision", "fp32", "--tile-size", "128")  # the defaults before issue 17


def predict_child(argv: list[str]) -> dict:
    """`landcover --json predict ARGV` in a fresh process: its summary, and peak RSS (MB) of it
    and of its largest worker."""
    code = ("import resource, sys; from landcover_plugin.engine.cli import main; "
            f"code = main(['--json', 'predict', *{argv!r}]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('RSS', int(hwm) / 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
            "sys.exit(code)")
    started = time.monotonic()
    out = run_child([PYTHON, "-c", code])
    wall = time.monotonic() - started
    summary = json.loads([line for line in out.splitlines() if line.startswith('{"event": "result"')][-1])["summary"]
    rss = [line for line in out.splitlines() if line.startswith("RSS ")][-1]
    main_mb, worker_mb = (float(v) for v in rss.split()[1:])
    return {"seconds": summary["seconds"], "wall_s": wall, "tiles": summary["tiles"], "rss_mb": main_mb,
            "worker_rss_mb": worker_mb, "summary": summary}


def model_seconds_per_tile(model: Path, raster: Path, extra: tuple[str, ...], n: int = 24) -> float:
    """Seconds per tile of the model as predict runs it (tile size, precision, threads), on tiles of the raster."""
    import io

    import rasterio

    from landcover_plugin.engine.events import Reporter
    from landcover_plugin.engine.learn.inference import normalise, open_session, tiled_model
    from landcover_plugin.engine.learn.model_package import read_info

    tile = int(extra[extra.index("--tile-size") + 1]) if "--tile-size" in extra else 0
    info = read_info(model)
    onnx, info = tiled_model(model, info, 0, tile)
    session, _ = open_session(onnx, Reporter(json_mode=True, out=io.StringIO()))
    size, batch = info.tile_size, max(1, 8 * 128 ** 2 // info.tile_size ** 2)
    with rasterio.open(raster) as src:  # spread over the raster, as predict meets them
        corners = [((k * 977) % (src.height - size + 1), (k * 613) % (src.width - size + 1)) for k in range(n)]
        x = np.stack([normalise(src.read(window=((r, r + size), (c, c + size))), info)
                      for r, c in corners]).astype(np.float32)
    name = session.get_inputs()[0].name
    session.run(None, {name: x[:batch]})
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        for i in range(0, len(x), batch):
            session.run(None, {name: x[i:i + batch]})
        best = min(best, time.perf_counter() - started)
    return best / len(x)


def int8_kernels(model: Path, workdir: Path) -> str:
    """The quantized operators onnxruntime's optimized graph runs (with their counts)."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(workdir / "optimized.onnx")
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(workdir / "optimized.onnx")).graph.node)
    return ", ".join(f"{op} {k}" for op, k in sorted(ops.items()) if "Q" in op or "Integer" in op)


def cpu_flag(flag: str) -> int:
    return int(flag in Path("/proc/cpuinfo").read_text().split())


def job(name: str, model: Path, raster: Path, km2: float, extra: tuple[str, ...], workdir: Path,
        result: dict) -> None:
    run = predict_child(["--model", str(model), "--imagery", str(raster), "--out", str(workdir / f"{name}.gpkg"),
                         *extra])
    model_s = run["tiles"] * model_seconds_per_tile(model, raster, extra)
    result[f"{name}_km2_per_min"] = round(km2 / (run["seconds"] / 60), 3)
    result[f"{name}_seconds"] = run["seconds"]
    result[f"{name}_model_only_s"] = round(model_s, 1)
    result[f"{name}_overhead_share"] = round(max(0.0, 1 - model_s / run["seconds"]), 3)
    result[f"{name}_rss_mb"] = round(run["rss_mb"], 1)
    result[f"{name}_worker_rss_mb"] = round(run["worker_rss_mb"], 1)
    result[f"{name}_tiles"] = run["tiles"]
    if "crowns" in run["summary"]:
        result[f"{name}_crowns"] = run["summary"]["crowns"]


def run(workdir: Path) -> dict:
    from landcover_plugin.engine.learn.model_package import onnx_path, read_info, write_metadata
    from landcover_plugin.engine.stages.quantize import QuantizeParams, quantize

    trees = onnx_path("trees-base")
    result: dict = {}
    quarter, q_km2 = tiled_scene(workdir / "quarter.tif", QUARTER_SIDE)
    job("trees_quarter_old", trees, quarter, q_km2, OLD, workdir, result)
    job("trees_quarter", trees, quarter, q_km2, (), workdir, result)
    result["trees_speedup_vs_old"] = round(result["trees_quarter_km2_per_min"]
                                           / result["trees_quarter_old_km2_per_min"], 3)

    import io

    from landcover_plugin.engine.events import Reporter

    int8_dir = workdir / "trees-int8"
    shutil.copytree(trees.parent, int8_dir)
    quantize(QuantizeParams(model=int8_dir, out=int8_dir / "model-int8.onnx",
                            imagery=Path(__file__).resolve().parents[1] / "data" / "deepforest" / "OSBS_029.tif"),
             Reporter(json_mode=True, out=io.StringIO()))
    int8_run = predict_child(["--model", str(int8_dir), "--imagery", str(quarter), "--out",
                              str(workdir / "int8.gpkg"), "--precision", "int8"])
    result["trees_quarter_int8_km2_per_min"] = round(q_km2 / (int8_run["seconds"] / 60), 3)
    result["trees_quarter_int8_crowns"] = int8_run["summary"]["crowns"]
    result["int8_speedup"] = round(result["trees_quarter_int8_km2_per_min"] / result["trees_quarter_km2_per_min"], 3)
    result["int8_kernels"] = int8_kernels(int8_dir / "model-int8.onnx", workdir)
    result["cpu_vnni"], result["cpu_amx"] = cpu_flag("avx512_vnni") or cpu_flag("avx_vnni"), cpu_flag("amx_int8")

    km, km2 = tiled_scene(workdir / "km.tif", KM_SIDE)
    job("trees_1km2", trees, km, km2, (), workdir, result)
    km.unlink()
    result["trees_rss_ratio_1km2_vs_quarter"] = round(result["trees_1km2_rss_mb"] / result["trees_quarter_rss_mb"], 3)

    segmentor = workdir / "landcover.onnx"  # trees-base's crown/background U-Net, on imagery at 1 m
    shutil.copy(trees.with_name("model-peers.onnx"), segmentor)
    write_metadata(segmentor, replace(read_info(segmentor), resolution_m=1.0))
    lc, lc_km2 = tiled_scene(workdir / "lc.tif", LANDCOVER_SIDE, pixel_m=1.0)
    job("landcover_1m_old", segmentor, lc, lc_km2, OLD, workdir, result)
    job("landcover_1m", segmentor, lc, lc_km2, (), workdir, result)
    result["landcover_speedup_vs_old"] = round(result["landcover_1m_km2_per_min"]
                                               / result["landcover_1m_old_km2_per_min"], 3)
    return result
