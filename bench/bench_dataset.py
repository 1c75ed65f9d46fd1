"""Dataset build speed and memory: 1,000 chips of 256² from a synthetic mosaic and
10,000 synthetic label polygons (goal: >= 50 chips/s on 2 cores), and peak RSS of
a 1,000-chip vs a 4,000-chip build with the same 10,000 polygons (goal: flat, ratio ~1).

Each build runs in its own process so that its peak RSS is its own. The baseline
is the bare chip I/O of the same chips (windowed read, two GeoTIFF writes), so
`speed_vs_io` says what masks, statistics, hashes and the catalog cost on top.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SECTION = "dataset"
ROOT = Path(__file__).resolve().parents[1]
CHIP, CRS, X0, Y0 = 256, "EPSG:32617", 500000.0, 4100000.0
CLASSES = ["barren", "cultivated", "developed", "forested", "herbaceous", "shrub", "water"]


def make_mosaic(path: Path, rows: int, cols: int) -> None:
    """A tiled RGB GeoTIFF of rows x cols chips at 1 m: smooth patterns plus noise, written block by block."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    height, width = rows * CHIP, cols * CHIP
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=CRS,
                       transform=from_origin(X0, Y0, 1, 1), tiled=True, blockxsize=CHIP, blockysize=CHIP,
                       compress="deflate") as dst:
        yy, xx = np.mgrid[0:CHIP, 0:CHIP]
        for r in range(rows):
            for c in range(cols):
                base = (np.sin((xx + c * CHIP) / 37.0) + np.cos((yy + r * CHIP) / 23.0)) * 60 + 128
                block = np.stack([base, base[::-1], base.T]) + rng.integers(0, 20, (3, CHIP, CHIP))
                dst.write(np.clip(block, 0, 255).astype(np.uint8), window=Window(c * CHIP, r * CHIP, CHIP, CHIP))


def make_labels(path: Path, rows: int, cols: int, count: int) -> None:
    """`count` random polygons (irregular hexagons, 10-60 m) over the mosaic, random classes."""
    import fiona
    from shapely.geometry import Polygon, mapping

    rng = np.random.default_rng(1)
    angles = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    with fiona.open(path, "w", driver="GPKG", crs=CRS,
                    schema={"geometry": "Polygon", "properties": {"class": "str"}}) as dst:
        records = []
        for i in range(count):
            cx, cy = X0 + rng.uniform(0, cols * CHIP), Y0 - rng.uniform(0, rows * CHIP)
            radius = rng.uniform(5, 30, 6)
            ring = np.column_stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)])
            records.append({"geometry": mapping(Polygon(ring)), "properties": {"class": CLASSES[i % 7]}})
        dst.writerecords(records)


CHILD = """
import io, json, resource, sys, time
from pathlib import Path
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset
imagery, labels, out, mode = sys.argv[1:5]
started = time.perf_counter()
if mode == "build":
    build_dataset(DatasetParams(imagery=Path(imagery), labels=Path(labels), task="landcover", out=Path(out),
                                chip_size=256, preset="landcover"), Reporter(json_mode=True, out=io.StringIO()))
    chips = len(json.loads((Path(out) / "dataset.json").read_text())["chips"])
else:  # baseline: the same chips' bare I/O
    import rasterio
    from rasterio.windows import Window
    Path(out).mkdir()
    with rasterio.open(imagery) as src:
        profile = {"driver": "GTiff", "width": 256, "height": 256, "dtype": "uint8", "crs": src.crs,
                   "compress": "deflate", "zlevel": 1}
        chips = 0
        for r in range(src.height // 256):
            for c in range(src.width // 256):
                w = Window(c * 256, r * 256, 256, 256)
                data = src.read(window=w)
                t = src.window_transform(w)
                with rasterio.open(f"{out}/{chips}.tif", "w", count=3, transform=t, **profile) as d:
                    d.write(data)
                with rasterio.open(f"{out}/{chips}m.tif", "w", count=1, transform=t, **profile) as d:
                    d.write(data[:1])
                chips += 1
print(json.dumps({"chips": chips, "seconds": time.perf_counter() - started,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(imagery: Path, labels: Path, out: Path, mode: str) -> dict:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(imagery), str(labels), str(out), mode],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(workdir: Path) -> dict:
    results = {}
    for name, rows, cols in (("1k", 25, 40), ("4k", 50, 80)):
        imagery, labels = workdir / f"mosaic_{name}.tif", workdir / f"labels_{name}.gpkg"
        started = time.perf_counter()
        make_mosaic(imagery, rows, cols)
        make_labels(labels, rows, cols, 10_000)  # the label layer, over either area
        print(f"  {name}: synthetic data in {time.perf_counter() - started:.0f} s", flush=True)
        build = child(imagery, labels, workdir / f"ds_{name}", "build")
        results[f"chips_{name}"] = build["chips"]
        results[f"peak_rss_mb_{name}"] = round(build["rss_mb"], 1)
        if name == "1k":
            base = child(imagery, labels, workdir / "io_1k", "io")
            results["chips_per_s"] = round(build["chips"] / build["seconds"], 1)
            results["io_baseline_chips_per_s"] = round(base["chips"] / base["seconds"], 1)
            results["speed_vs_io"] = round(results["chips_per_s"] / results["io_baseline_chips_per_s"], 3)
        else:
            results["chips_per_s_4k"] = round(build["chips"] / build["seconds"], 1)
        for path in (workdir / f"ds_{name}", workdir / "io_1k", imagery):  # keep the disk use bounded
            subprocess.run(["rm", "-rf", str(path)], check=True)
    results["goal_chips_per_s"] = 50
    results["rss_ratio_4k_vs_1k"] = round(results["peak_rss_mb_4k"] / results["peak_rss_mb_1k"], 3)
    return results
