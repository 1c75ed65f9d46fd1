"""Vectorization: ours (sieve, polygons merged across blocks, simplified as a coverage,
areas, class statistics, GeoPackage) vs GDAL's `gdal_polygonize.py` (polygons only) on the same class
raster, each in a fresh process so both pay their start-up; the best of ROUNDS runs
of each, taken in turns, so that a noisy moment on a shared machine hits both alike.

gdal_polygonize.py is Debian's (/usr/bin, GDAL 3.6) run with /usr/bin/python3 and a
clean environment, as a user would run it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common import PYTHON, run_child

SECTION = "vectorize"
SIZE = 4096
ROUNDS = 3
GDAL_POLYGONIZE = "/usr/bin/gdal_polygonize.py"

OURS = """
import sys
from pathlib import Path
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.learn.model_package import ModelInfo
from landcover_plugin.engine.stages.predict import vectorize_landcover
from landcover_plugin.engine.vector.vectorize import write_gpkg
import rasterio
info = ModelInfo(task="landcover", class_names=list("abcde"), class_colors=[], band_count=3, resolution_m=1.0,
                 tile_size=256, tile_overlap=32)
layers = vectorize_landcover(Path(sys.argv[1]), info, 2048, Reporter())
with rasterio.open(sys.argv[1]) as src:
    write_gpkg(Path(sys.argv[2]), layers, src.crs)
print(len(layers[0].rows))
"""


def class_raster(path: Path) -> Path:
    """Blobby land cover of 5 classes (regions of ~10-100 m), 1 m pixels."""
    import rasterio
    from rasterio.transform import from_origin
    from scipy import ndimage

    rng = np.random.default_rng(0)
    fields = ndimage.zoom(ndimage.gaussian_filter(rng.random((5, 512, 512)), (0, 2, 2)), (1, 8, 8), order=1)
    classes = np.argmax(fields, axis=0).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=1, dtype="uint8", nodata=255,
                       crs="EPSG:32617", transform=from_origin(400000, 3300000, 1.0, 1.0), tiled=True,
                       compress="deflate") as dst:
        dst.write(classes, 1)
    return path


def timed(args: list[str], env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    out = run_child(args, env=env)
    return time.perf_counter() - started, out


def run(workdir: Path) -> dict:
    raster = class_raster(workdir / "classes.tif")
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8"}
    ours = gdal = float("inf")
    for _ in range(ROUNDS):
        for old in workdir.glob("*.gpkg"):
            old.unlink()
        seconds, out = timed([PYTHON, "-c", OURS, str(raster), str(workdir / "ours.gpkg")])
        ours = min(ours, seconds)
        seconds, _ = timed(["/usr/bin/python3", GDAL_POLYGONIZE, "-q", str(raster), "-f", "GPKG",
                            str(workdir / "gdal.gpkg"), "classes", "class"], env=clean)
        gdal = min(gdal, seconds)
    return {"pixels_m": round(SIZE * SIZE / 1e6, 2), "polygons": int(out.split()[-1]),
            "ours_s": round(ours, 2), "gdal_polygonize_s": round(gdal, 2),
            "speedup_vs_gdal_polygonize": round(gdal / ours, 3)}
