"""Few-shot fine-tuning as a user runs it (issue 19): `landcover train --base trees-base` on
about 200 labelled crowns, then `landcover predict` over one hectare.

Data: the left 70 % of the Yellowstone development crop (deepforest's
2019_YELL_2_541000_4977000, 0.1 m; 208 crowns), a dataset of 128 px chips; one hectare
is a 1,000 x 1,000 px window of the same crop.
- finetune_s: `landcover train --dataset DS --base trees-base` with today's defaults
  (the few-shot recipe), in a fresh process (TensorFlow's start and the ONNX export in);
  finetune_epochs: the epochs it ran (early stopping).
- baseline_finetune_s: the same with the options before the recipe (20 epochs,
  learning rate 1e-4, no copy-paste, no border weight), in the same run;
  finetune_vs_baseline = finetune_s / baseline_finetune_s.
- predict_1ha_s: `landcover predict` of the fine-tuned model over the hectare (crowns,
  points, health, orchard check), in a fresh process; trees_1ha: the trees it found.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from common import PYTHON, ROOT, last_json, run_child

SECTION = "finetune"
CUT = 0.7
HECTARE_PX = 1000  # 100 m at 0.1 m
IMAGE = ROOT / "data" / "deepforest" / "2019_YELL_2_541000_4977000_image_crop"


def _geotiff(workdir: Path) -> Path:
    """The PNG on a 0.1 m grid (an arbitrary UTM origin: pixel space), as scripts/train_trees_base.py does."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(IMAGE.with_suffix(".png")) as src:
        data = src.read([1, 2, 3])
    tif = workdir / "yell.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3, dtype="uint8",
                       crs="EPSG:32612", transform=from_origin(500000.0, 5000000.0, 0.1, 0.1)) as dst:
        dst.write(data)
    return tif


def _landcover(*args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    out = run_child([PYTHON, "-m", "landcover_plugin.engine.cli", "--json", *args])
    return last_json(out), time.perf_counter() - started


def run(workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    from fewshot_eval import crop
    from train_trees_base import voc_boxes

    tif = _geotiff(workdir)
    import rasterio

    with rasterio.open(tif) as src:
        width = src.width
    labelled = crop(tif, voc_boxes(IMAGE.with_suffix(".xml")), 0, round(width * CUT), workdir / "labelled.tif")
    crop(tif, [], 0, HECTARE_PX, workdir / "hectare_cols.tif")
    with rasterio.open(workdir / "hectare_cols.tif") as src:  # rows too: exactly 1,000 x 1,000 px
        profile = src.profile | {"height": HECTARE_PX}
        data = src.read(window=((0, HECTARE_PX), (0, HECTARE_PX)))
    with rasterio.open(workdir / "hectare.tif", "w", **profile) as dst:
        dst.write(data)
    dataset = workdir / "dataset"
    _landcover("dataset", "--imagery", str(workdir / "labelled.tif"), "--labels", str(workdir / "labelled.csv"),
               "--task", "trees", "--chip-size", "128", "--out", str(dataset))
    base = ["train", "--dataset", str(dataset), "--base", "trees-base"]
    old, baseline_s = _landcover(*base, "--epochs", "20", "--learning-rate", "1e-4", "--copy-paste", "0",
                                 "--border-weight", "0", "--out", str(workdir / "baseline"))
    new, finetune_s = _landcover(*base, "--out", str(workdir / "model"))
    result, predict_s = _landcover("predict", "--model", str(workdir / "model"), "--imagery",
                                   str(workdir / "hectare.tif"), "--out", str(workdir / "hectare.gpkg"))
    return {"labelled_crowns": len(labelled), "finetune_s": round(finetune_s, 2),
            "finetune_epochs": new["summary"]["epochs"], "baseline_finetune_s": round(baseline_s, 2),
            "baseline_epochs": old["summary"]["epochs"], "finetune_vs_baseline": round(finetune_s / baseline_s, 3),
            "predict_1ha_s": round(predict_s, 2), "trees_1ha": result["summary"]["crowns"]}
