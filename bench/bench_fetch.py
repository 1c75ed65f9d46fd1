"""Fetch benchmark: concurrency, cache, memory and faults against a loopback tile
server (tests/tile_server.py) that answers any z/x/y with a synthetic tile.

Each fetch runs as a child `landcover fetch` that reports its own peak RSS
(VmHWM: the rusage maxrss of a forked child starts at the parent's RSS at fork
time, which would count this harness). Speeds are ratios within this run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from landcover_plugin.engine.imagery.tiles import Tile, lnglat_to_tile, tile_bounds_lnglat  # noqa: E402
from tile_server import Chaos, serve  # noqa: E402

SECTION = "fetch"
ZOOM = 16
LATENCY = 0.2  # seconds per tile, as the issue asks
CENTRE = (-82.0, 29.7)


def aoi_of(side: int) -> str:
    """A WGS84 box covering exactly side x side tiles at ZOOM."""
    first = lnglat_to_tile(*CENTRE, ZOOM)
    west, _, _, north = tile_bounds_lnglat(first)
    _, south, east, _ = tile_bounds_lnglat(Tile(first.x + side - 1, first.y + side - 1, ZOOM))
    eps = 1e-7  # inside the edges: no neighbour tiles
    return f"{west + eps:.9f},{south + eps:.9f},{east - eps:.9f},{north - eps:.9f}"


# Runs `landcover ARGS`, then writes its peak RSS in kB (VmHWM) to the file named by argv[1].
CHILD = ("import sys\nfrom landcover_plugin.engine.cli import main\ncode = main(sys.argv[2:])\n"
         "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1]\n"
         "open(sys.argv[1], 'w').write(hwm)\nsys.exit(code)")


def fetch(url: str, aoi: str, out: Path, cache: Path, workers: int, *extra: str) -> dict:
    """Run `landcover fetch` in a child; its result summary plus wall time and peak RSS (MB)."""
    log = out.with_suffix(".jsonl")
    rss_file = out.with_suffix(".rss")
    cmd = [sys.executable, "-c", CHILD, str(rss_file), "--json", "fetch", "--aoi", aoi, "--source", url,
           "--zoom", str(ZOOM), "--workers", str(workers), "--cache", str(cache), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    with open(log, "w") as stdout:
        returncode = subprocess.run(cmd, stdout=stdout, stderr=subprocess.DEVNULL, env=env).returncode
    seconds = time.monotonic() - started
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    if returncode != 0:
        raise RuntimeError(f"fetch failed: {[e for e in events if e['event'] == 'error']}")
    return {**events[-1]["summary"], "wall": seconds, "rss_mb": int(rss_file.read_text()) / 1024}


def same_mosaic(a: Path, b: Path) -> bool:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        return bool(np.array_equal(x.read(), y.read()) and np.array_equal(x.dataset_mask(), y.dataset_mask())
                    and x.transform == y.transform)


def run(workdir: Path) -> dict:
    results: dict[str, float] = {}
    aoi400 = aoi_of(20)
    with serve(synthetic=True, latency=LATENCY) as url:
        one = fetch(url, aoi400, workdir / "w1.tif", workdir / "c1", 1)
        sixteen = fetch(url, aoi400, workdir / "w16.tif", workdir / "c16", 16)
        before = url.request_count
        cached = fetch(url, aoi400, workdir / "again.tif", workdir / "c16", 16)  # reuses the finished mosaic
        for made in (workdir / "c16").glob("*/mosaics"):
            shutil.rmtree(made)
        rewarp = fetch(url, aoi400, workdir / "rewarp.tif", workdir / "c16", 16)  # cached tiles, warped again
        cached_requests = url.request_count - before
    results["tiles"] = sixteen["tiles"]
    results["workers1_tiles_per_s"] = round(one["tiles"] / one["download_seconds"], 2)
    results["workers16_tiles_per_s"] = round(sixteen["tiles"] / sixteen["download_seconds"], 2)
    # Downloading (what workers speed up), and the whole command (plus start-up and the UTM mosaic).
    results["download_speedup_16_vs_1"] = round(one["download_seconds"] / sixteen["download_seconds"], 2)
    results["total_speedup_16_vs_1"] = round(one["wall"] / sixteen["wall"], 2)
    # Where the rest of the 16-worker run goes: start-up (interpreter, imports), and what is
    # left after the last tile (the last row of windows, overviews); the rest of the warp overlaps it.
    results["workers16_seconds"] = round(sixteen["wall"], 2)
    results["workers16_startup_seconds"] = round(sixteen["wall"] - sixteen["seconds"], 2)
    results["workers16_after_download_seconds"] = round(sixteen["seconds"] - sixteen["download_seconds"], 2)
    results["cache_run_requests"] = cached_requests
    # Downloading vs reading the cache; and the whole command, which finds the mosaic made from
    # the same unchanged tiles before and links it instead of warping it again.
    results["cache_run_download_time_ratio"] = round(cached["download_seconds"] / sixteen["download_seconds"], 3)
    results["cache_run_total_time_ratio"] = round(cached["wall"] / sixteen["wall"], 3)
    # The same, without the finished mosaic: every window is warped again from the cached tiles.
    results["cache_rewarp_total_time_ratio"] = round(rewarp["wall"] / sixteen["wall"], 3)
    results["rewarp_same_mosaic"] = int(same_mosaic(workdir / "w16.tif", workdir / "rewarp.tif"))

    chaos = Chaos(p500=0.10, p429=0.05, ptruncate=0.02, retry_after=1)
    with serve(synthetic=True, latency=LATENCY, fail=chaos) as url:
        faulty = fetch(url, aoi400, workdir / "faulty.tif", workdir / "cf", 16)
        injected = sum(chaos.pick(path, n) is not None for path, count in url.requests.items()
                       for n in range(1, count + 1))
    results["fault_mosaic_identical"] = int(same_mosaic(workdir / "w16.tif", workdir / "faulty.tif"))
    results["fault_injected"] = injected
    results["fault_retried"] = faulty["retried"]
    results["fault_failed_tiles"] = faulty["failed"]
    results["fault_vs_clean_time_ratio"] = round(faulty["wall"] / sixteen["wall"], 2)

    with serve(synthetic=True) as url:
        big = fetch(url, aoi_of(100), workdir / "big.tif", workdir / "cbig", 16, "--rate", "0")  # memory, not politeness
    with rasterio.open(workdir / "big.tif") as m:
        results["big_output_mpx"] = round(m.width * m.height / 1e6, 1)
    results["big_tiles"] = big["tiles"]
    results["big_peak_rss_mb"] = round(big["rss_mb"], 1)
    results["big_seconds"] = round(big["wall"], 1)
    results["small_peak_rss_mb"] = round(sixteen["rss_mb"], 1)  # 400 tiles: RSS barely grows with the AOI
    return results
