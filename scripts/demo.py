"""`make demo`: the whole loop on real data, headless.

1. Trees: the NEON orthophoto OSBS_029 is cut into XYZ tiles and served on
   127.0.0.1; `landcover run` fetches the tiles for the area, builds a dataset
   from the annotated crown boxes, trains a small model, predicts crowns.
2. Land cover: the Landsat-7 scene of North Carolina (a local raster) and its
   labelled polygons, same pipeline without the fetch.
3. QGIS renders the results over the imagery into demo-output/map.png.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fiona
import rasterio
from rasterio.warp import transform_bounds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback tile server lives with the tests
from tile_server import make_tiles, serve  # noqa: E402

from landcover_plugin.engine.imagery.raster import stack_bands  # noqa: E402

OUT = ROOT / "demo-output"
WORK = OUT / "work"
DATA = ROOT / "data"
LANDCOVER = ROOT / ".venv" / "bin" / "landcover"


def spec_path(path: Path) -> str:
    """A path as the pipeline file gives it: relative to the file's folder (WORK), so the
    written example names no folder of this machine and works wherever the repository is."""
    return os.path.relpath(path, WORK)


def run_pipeline(spec: dict, name: str) -> None:
    path = WORK / f"{name}.yaml"
    path.write_text(json.dumps(spec, indent=2))  # JSON is YAML
    print(f"\n$ landcover run {path.relative_to(ROOT)}", flush=True)
    subprocess.run([str(LANDCOVER), "run", str(path)], check=True)


def trees_job(tile_url: str) -> None:
    with rasterio.open(DATA / "deepforest" / "OSBS_029.tif") as src:
        inset = 1.0  # metres, keeps the AOI inside the served imagery
        b = src.bounds
        aoi = transform_bounds(src.crs, "EPSG:4326", b.left + inset, b.bottom + inset, b.right - inset, b.top - inset)
    run_pipeline({
        "task": "trees",
        "aoi": ",".join(f"{v:.7f}" for v in aoi),
        "imagery": {"source": tile_url, "gsd": 0.1},
        "labels": {"path": spec_path(DATA / "deepforest" / "OSBS_029.csv")},
        "train": {"epochs": 100, "chip_size": 128, "batch_size": 4},  # early stopping ends it
        "workdir": spec_path(WORK / "trees"),
        "out": spec_path(OUT / "trees.gpkg"),
    }, "trees")


def landcover_job() -> None:
    bands = sorted((DATA / "nc_landsat").glob("lsat7_2000_*.tif"))
    stack = stack_bands(bands, WORK / "lsat7_2000.tif")
    run_pipeline({
        "task": "landcover",
        "imagery": {"source": spec_path(stack)},
        "labels": {"path": spec_path(DATA / "nc_landsat" / "landsat96_polygons.shp"), "class_field": "label"},
        "train": {"epochs": 150, "chip_size": 32, "batch_size": 8},  # early stopping ends it
        "workdir": spec_path(WORK / "landcover"),
        "out": spec_path(OUT / "landcover.gpkg"),
    }, "landcover")


def summary() -> str:
    with fiona.open(OUT / "trees.gpkg", layer="crowns") as crowns:
        areas = [f["properties"]["area_m2"] for f in crowns]
    with fiona.open(OUT / "landcover.gpkg", layer="class_stats") as stats:
        rows = sorted(((f["properties"]["class"], f["properties"]["hectares"]) for f in stats), key=lambda r: -r[1])
    lines = ["", "Summary", f"  trees: {len(areas)} crowns found, total canopy {sum(areas):,.0f} m²"]
    lines += ["  land cover (hectares per class):"] + [f"    {c:<12} {ha:>10,.1f} ha" for c, ha in rows]
    train = json.loads((WORK / "landcover" / ".train.done.json").read_text())["summary"]
    scores = ", ".join(f"{f} {v:.3f}" for f, v in train.get("family_scores", {}).items())
    lines += [f"  land-cover model: {train.get('family', 'unet')}, validation accuracy {train['val_accuracy']:.3f} "
              f"on held-out polygons ({scores or 'one family'}), weakest class {train.get('weakest_class', '-')}, "
              f"not learnt: {', '.join(train.get('classes_not_learnt', [])) or 'none'}",
              "  (cross-validated scores of both families: make bench BENCH=families)"]
    lines += ["", f"Results in {OUT.relative_to(ROOT)}/: trees.gpkg (crowns, trees, missing_trees, orchard_blocks), "
              "landcover.gpkg (landcover, class_stats), map.png", "Open the GeoPackages in QGIS: the styles are stored inside them."]
    return "\n".join(lines)


def render_map() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env.update(QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(WORK / "xdg"))
    (WORK / "xdg").mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["/usr/bin/python3", str(ROOT / "scripts" / "render_map.py"), str(OUT / "map.png"),
                    str(WORK / "trees" / "imagery.tif"), str(OUT / "trees.gpkg"),
                    str(WORK / "lsat7_2000.tif"), str(OUT / "landcover.gpkg")], check=True, env=env)


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tiles = make_tiles(DATA / "deepforest" / "OSBS_029.tif", WORK / "tiles", "19-21")
    with serve(tiles) as url:
        print(f"Serving the OSBS_029 orthophoto as XYZ tiles at {url}")
        trees_job(url)
    landcover_job()
    render_map()
    print(summary())


if __name__ == "__main__":
    main()
