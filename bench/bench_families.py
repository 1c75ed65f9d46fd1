"""Model families on the Landsat sample (issue 16): training time and spatially cross-validated
accuracy of the random forest and the U-Net, same datasets, same run.

The imagery is the sample's six band files as a QGIS user stacks them (gdalbuildvrt -separate),
the labels its 34 polygons, every dataset option at its default. Cross-validation: FOLDS
datasets whose validation split is drawn with seeds 0..FOLDS-1 (each class's separate polygons,
whole, go to validation until they hold a quarter of its area); each family is trained on each
(the U-Net with its defaults, 20 epochs and early stopping) and scored on that fold's
validation pixels. Keys: cv_accuracy_{family} (mean), cv_sd_{family}, fold{k}_{family};
{family}_train_s (mean wall time of the train stage) and unet_to_forest_time (their ratio).
"""
from __future__ import annotations

import io
import statistics
import subprocess
import time
from pathlib import Path

SECTION = "families"
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "nc_landsat"
FOLDS = 5
ROLES = "blue=1,green=2,red=3,nir=4,swir1=5,swir2=6"


def run(workdir: Path) -> dict:
    from landcover_plugin.engine.events import Reporter
    from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset
    from landcover_plugin.engine.stages.train import TrainParams, train

    vrt = workdir / "stack.vrt"
    bands = [str(DATA / f"lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)]
    subprocess.run(["gdalbuildvrt", "-q", "-separate", str(vrt), *bands], check=True)
    quiet = Reporter(json_mode=True, out=io.StringIO())
    scores: dict[str, list[float]] = {"forest": [], "unet": []}
    times: dict[str, list[float]] = {"forest": [], "unet": []}
    for fold in range(FOLDS):
        ds = workdir / f"ds{fold}"
        build_dataset(DatasetParams(imagery=vrt, labels=DATA / "landsat96_polygons.shp", task="landcover", out=ds,
                                    class_field="label", seed=fold), quiet)
        for family in ("forest", "unet"):
            started = time.perf_counter()
            result = train(TrainParams(dataset=ds, out=workdir / f"{family}{fold}", family=family, bands=ROLES), quiet)
            times[family].append(time.perf_counter() - started)
            scores[family].append(result.summary["val_accuracy"])
    out: dict = {}
    for family in ("forest", "unet"):
        out[f"cv_accuracy_{family}"] = round(statistics.mean(scores[family]), 4)
        out[f"cv_sd_{family}"] = round(statistics.stdev(scores[family]), 4)
        out |= {f"fold{k}_{family}": round(v, 4) for k, v in enumerate(scores[family])}
        out[f"{family}_train_s"] = round(statistics.mean(times[family]), 2)
    out["unet_to_forest_time"] = round(out["unet_train_s"] / out["forest_train_s"], 2)
    return out
