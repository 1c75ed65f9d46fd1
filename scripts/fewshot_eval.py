"""The few-shot development proxy (issue 19): label part of a scene, find the rest.

    PYTHONPATH=. .venv/bin/python scripts/fewshot_eval.py [--recipes default,recipe] [--images OSBS_029 ...]

Development images only (docs/DESIGN.md), prepared as scripts/train_trees_base.py does.
For each image the base model is that image's leave-one-image-out fold model (trained
on the other two with trees-base's recipe, so it has never seen the image: the shipped
trees-base was trained on all three and would flatter itself). The image is cut at a
column: its left part's crowns are the user's labels (a dataset of that part alone: the
crowns there are complete), its right part is the test. Scored as `landcover predict`
decodes (each model's own stored post-processing), crown boxes matched one-to-one at
IoU 0.4 to the annotated boxes whose centre lies in the right part.

Recipes: `base` (the fold model alone), `default` (`train --base FOLD` with the
options before this work: 20 epochs, learning rate 1e-4, no few-shot augmentation),
`recipe` (`train --base FOLD` with today's defaults), and named variants (RECIPES).
Results go to data/trees-base/fewshot.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_trees_base import IMAGES, RESOLUTION, WORK, merge, predict_image, prepare, quiet  # noqa: E402

from landcover_plugin.engine.learn.model_package import read_info  # noqa: E402
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset  # noqa: E402
from landcover_plugin.engine.stages.train import TrainParams, train  # noqa: E402
from landcover_plugin.engine.vector.confidence import calibrate  # noqa: E402
from landcover_plugin.engine.vector.crown_metrics import CrownScore, crown_confidences, score_post  # noqa: E402

CUT = {"OSBS_029": 0.5, "SOAP_061": 0.5, "YELL_541000_4977000": 0.7}  # YELL: ~200 of its 279 crowns labelled
CHIP = 128
# Fine-tuning options of each named recipe (TrainParams fields), on top of the base.
RECIPES = {
    "default": dict(epochs=20, learning_rate=1e-4, copy_paste=0.0, border_weight=0.0),  # before issue 19
    "recipe": dict(),  # today's defaults for fine-tuning trees (stages/train.py FEW_SHOT)
    "long": dict(epochs=60, learning_rate=1e-4, copy_paste=0.0, border_weight=0.0),
    "long_lr3": dict(epochs=60, learning_rate=3e-4, copy_paste=0.0, border_weight=0.0),
    "paste": dict(epochs=60, learning_rate=3e-4, copy_paste=0.5, border_weight=0.0),
    "border": dict(epochs=60, learning_rate=3e-4, copy_paste=0.0, border_weight=2.0),
    "paste_more": dict(epochs=100, learning_rate=3e-4, copy_paste=1.0, border_weight=0.0),
    "paste_border": dict(epochs=60, learning_rate=3e-4, copy_paste=0.5, border_weight=2.0),
}


def crop(tif: Path, boxes: list, x0: int, x1: int, out: Path) -> list:
    """Columns x0..x1 of an image as a GeoTIFF + DeepForest CSV of the boxes whose centre lies
    there (clipped to it); returns those boxes in the crop's pixels."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(tif) as src:
        win = Window(x0, 0, x1 - x0, src.height)
        profile = src.profile | {"width": x1 - x0, "transform": src.window_transform(win)}
        data = src.read(window=win)
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    kept = [(max(a, x0) - x0, b, min(c, x1) - x0, d) for a, b, c, d in boxes if x0 <= (a + c) / 2 < x1]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "xmin", "ymin", "xmax", "ymax", "label"])
        w.writerows([out.name, *b, "Tree"] for b in kept)
    return kept


def stored_post(model: Path) -> dict:
    info = read_info(model)
    return {"threshold": info.threshold, "seed_distance_m": info.seed_distance_m, "min_crown_m2": info.min_crown_m2}


def score(model: Path, tif: Path, boxes: list) -> tuple[CrownScore, dict]:
    """The crown score on the test part, and how the crowns' confidence (as predict writes
    it) separates right from wrong: the precision of crowns at or above 0.5 and below."""
    values, valid = predict_image(model, tif)
    prediction, post, info = (values[0], values[1], valid), stored_post(model), read_info(model)
    probs, matched = crown_confidences(prediction, boxes, post, RESOLUTION)
    conf = calibrate(probs, info.confidence_scale, info.confidence_shift)
    hi, lo = matched[conf >= 0.5], matched[conf < 0.5]
    separation = {"conf_min": round(float(conf.min()), 3) if len(conf) else None,
                  "conf_max": round(float(conf.max()), 3) if len(conf) else None,
                  "high_conf_crowns": len(hi), "high_conf_precision": round(float(hi.mean()), 3) if len(hi) else None,
                  "low_conf_crowns": len(lo), "low_conf_precision": round(float(lo.mean()), 3) if len(lo) else None}
    return score_post(prediction, boxes, post, RESOLUTION), separation


def fold_model(held: str, single: dict, reporter) -> Path:
    """trees-base's recipe (scripts/train_trees_base.py defaults) trained without `held`."""
    model = WORK / "models" / f"without_{held}"
    if not (model / "model.onnx").is_file():
        ds = merge([single[n] for n in IMAGES if n != held], WORK / "datasets" / f"without_{held}")
        train(TrainParams(dataset=ds, out=model, epochs=25, batch_size=8, seed=0), reporter)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="default,recipe", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--images", nargs="+", choices=list(IMAGES), default=list(IMAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse fine-tuned models already made")
    args = parser.parse_args()
    prepared = {name: prepare(name) for name in IMAGES}
    single = {}
    for name, (tif, labels, _) in prepared.items():
        single[name] = WORK / "datasets" / name
        if not (single[name] / "dataset.json").is_file():
            build_dataset(DatasetParams(imagery=tif, labels=labels, task="trees", out=single[name], chip_size=CHIP),
                          quiet())
    results_file = WORK / "fewshot.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.images:
        tif, _, boxes = prepared[name]
        import rasterio

        with rasterio.open(tif) as src:
            width = src.width
        cut = round(width * CUT[name])
        folder = WORK / "fewshot" / name
        labelled = crop(tif, boxes, 0, cut, folder / "labelled.tif")
        test_boxes = crop(tif, boxes, cut, width, folder / "test.tif")
        ds = folder / "dataset"
        if not (ds / "dataset.json").is_file():
            build_dataset(DatasetParams(imagery=folder / "labelled.tif", labels=folder / "labelled.csv", task="trees",
                                        out=ds, chip_size=CHIP), quiet())
        base = fold_model(name, single, quiet())
        row = results.setdefault(name, {})
        row["labelled_crowns"], row["test_crowns"] = len(labelled), len(test_boxes)
        s, separation = score(base, folder / "test.tif", test_boxes)
        row["base"] = s.as_dict("") | separation
        for recipe in args.recipes.split(","):
            out = folder / f"model_{recipe}_s{args.seed}"
            if not (args.reuse and (out / "model.onnx").is_file()):
                if out.exists():
                    shutil.rmtree(out)
                result = train(TrainParams(dataset=ds, out=out, base=base, seed=args.seed, **RECIPES[recipe]),
                               quiet())
                epochs = result.summary["epochs"]
            else:  # re-scored: the epochs its training ran, as recorded then
                epochs = row.get(f"{recipe}_s{args.seed}", {}).get("epochs")
            s, separation = score(out, folder / "test.tif", test_boxes)
            row[f"{recipe}_s{args.seed}"] = s.as_dict("") | {"epochs": epochs} | separation
            print(f"{name} {recipe} seed {args.seed}: F1 {s.f1:.3f} P {s.precision:.3f} R {s.recall:.3f} "
                  f"(base F1 {row['base']['f1']:.3f}; epochs {epochs})", flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    print("| image | labelled / test crowns | " + " | ".join(["base"] + args.recipes.split(",")) + " |")
    for name in args.images:
        row = results[name]
        cells = [row["base"]] + [row.get(f"{r}_s{args.seed}", {}) for r in args.recipes.split(",")]
        print(f"| {name} | {row['labelled_crowns']} / {row['test_crowns']} | " + " | ".join(
            f"{c['f1']:.3f} (P {c['precision']:.2f} R {c['recall']:.2f})" if c else "-" for c in cells) + " |")


if __name__ == "__main__":
    main()
