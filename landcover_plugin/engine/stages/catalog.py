"""A dataset's catalog (catalog.gpkg) and snapshots queried from it.

catalog.gpkg has one polygon per chip in layer `chips`: split, per-class pixel
fractions (`frac_<class>`, `frac_ignore`), imagery and label sources and dates,
preset, offset, content hash, and the pixel sums that band statistics need. Its
`landcover_info` table holds the dataset's facts (classes, class balance and
weights, content hash). QGIS opens it with chips coloured by split.

`landcover dataset --from DATASET --where SQL` selects chips with SQL on that
layer into a new, immutable snapshot whose dataset.json records the query, the
parent's content hash and every chip's hash: the provenance a model card cites.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from pathlib import Path

from ..atomic import atomic_output
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..labels.read import read_info, write_info
from ..learn.dataset_folder import Manifest, band_stats, chip_hash, class_balance, content_hash

LAYER = "chips"
SPLIT_COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "buffer": "#bdbdbd"}
REBUILD = "Rebuild the dataset with `landcover dataset`; its files are not meant to be edited."


def fraction_field(class_name: str) -> str:
    """`frac_<class>` with the name made a plain SQL identifier (`frac_Open water` -> `frac_open_water`)."""
    return "frac_" + re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


def write_catalog(path: Path, chips: list[dict], crs_wkt: str, class_names: list[str], provenance: dict,
                  manifest: Manifest) -> None:
    import fiona
    from shapely.geometry import box, mapping

    from ..vector.styles import landcover_qml, write_styles

    fractions = [fraction_field(n) for n in class_names]
    props = {"id": "str", "split": "str", "labelled": "float", **{f: "float" for f in fractions},
             "frac_ignore": "float", "background_only": "int", "imagery": "str", "imagery_date": "str",
             "label_source": "str", "label_date": "str", "preset": "str", "offset_x": "float",
             "offset_y": "float", "hash": "str", "band_sum": "str", "band_sumsq": "str", "pixel_count": "int",
             "pixel_max": "float"}
    by_chip = "class" in chips[0]  # classification: the chip's own class, to select on
    if by_chip:
        props["chip_class"] = "str"
    with fiona.open(path, "w", driver="GPKG", layer=LAYER, crs_wkt=crs_wkt,
                    schema={"geometry": "Polygon", "properties": props}) as dst:
        dst.writerecords({"geometry": mapping(box(*c["bounds"])), "properties": {
            "id": c["id"], "split": c["split"], "labelled": round(c["labelled"], 6),
            **{f: round(v, 6) for f, v in zip(fractions, c["fractions"])}, "frac_ignore": round(c["ignored"], 6),
            "background_only": int(c["background_only"]), **provenance, "hash": c["hash"],
            "band_sum": json.dumps(c["sum"]), "band_sumsq": json.dumps(c["sumsq"]), "pixel_count": c["count"],
            "pixel_max": c["max"], **({"chip_class": class_names[c["class"]]} if by_chip else {})}} for c in chips)
    write_styles(path, {LAYER: landcover_qml(list(SPLIT_COLORS), list(SPLIT_COLORS.values()), field="split")},
                 "chips by split")
    facts = {k: v for k, v in manifest.to_dict().items() if k != "chips"}
    write_info(path, {k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()},
               describe={LAYER: "Training chips: split, class fractions, sources, content hash"
                         + (f". Labels {manifest.extra['attribution']}" if manifest.extra.get("attribution") else "")})


def read_chips(catalog: Path, class_names: list[str], where: str | None = None) -> list[dict]:
    """Chip records (as the build keeps them) of the rows matching `where`."""
    fractions = [fraction_field(n) for n in class_names]
    sql = (f"SELECT id, split, labelled, frac_ignore, background_only, hash, band_sum, band_sumsq, pixel_count, "
           f"pixel_max, {', '.join(fractions)} FROM {LAYER}" + (f" WHERE ({where})" if where else "") + " ORDER BY id")
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        try:
            columns = [r[1] for r in db.execute(f"PRAGMA table_info({LAYER})")]
        except sqlite3.Error as exc:  # not a database at all (cut short, overwritten)
            raise EngineError("BAD_DATASET", f"{catalog} is not readable: {exc}", REBUILD) from None
        if not columns:
            raise EngineError("BAD_DATASET", f"{catalog} has no layer {LAYER}.", REBUILD)
        try:
            rows = db.execute(sql).fetchall()
        except sqlite3.Error as exc:
            raise EngineError("BAD_WHERE", f"The condition {where!r} is not valid SQL on the catalog: {exc}",
                              f"Use SQL on the columns {', '.join(c for c in columns if c != 'geom')}, "
                              "e.g. \"split = 'train' AND frac_water > 0.1\".") from None
    db.close()
    return [{"id": r[0], "split": r[1], "labelled": r[2], "ignored": r[3], "background_only": bool(r[4]),
             "hash": r[5], "sum": json.loads(r[6]), "sumsq": json.loads(r[7]), "count": r[8], "max": r[9],
             "fractions": list(r[10:])} for r in rows]


def _link(src: Path, dst: Path) -> None:
    """Hard link (a snapshot costs no space), copy where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_snapshot(params, reporter: Reporter) -> StageResult:
    """The chips of `params.source` matching `params.where`, as a new immutable dataset."""

    parent = Path(params.source)
    if not (parent / "dataset.json").is_file() or not (parent / "catalog.gpkg").is_file():
        raise EngineError("NOT_A_DATASET", f"{parent} is not a dataset (no dataset.json and catalog.gpkg).",
                          "Give a folder written by `landcover dataset`.")
    if not params.where:
        raise EngineError("NO_WHERE", "--from needs --where: the SQL condition that picks the chips.",
                          "E.g. --where \"frac_water > 0.05\".")
    if params.out.exists():
        raise EngineError("SNAPSHOT_EXISTS", f"{params.out} exists; snapshots are immutable.",
                          "Choose a new --out folder for this snapshot.")
    manifest = Manifest.read(parent)
    chips = read_chips(parent / "catalog.gpkg", manifest.class_names, params.where)
    if not chips:
        raise EngineError("EMPTY_SELECTION", f"No chip of {parent.name} matches {params.where!r}.",
                          "Loosen the condition (open catalog.gpkg in QGIS to see the values).")
    entries = {c["id"]: c for c in manifest.chips}
    splits = {s: sum(c["split"] == s for c in chips) for s in ("train", "val", "buffer")}
    if not splits["train"] or not splits["val"]:
        reporter.log(f"the selection has {splits['train']} train and {splits['val']} validation chips: "
                     "training needs both", level="warning")
    with atomic_output(params.out, directory=True) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i, chip in enumerate(chips):
            reporter.progress("dataset", i + 1, len(chips), f"chip {chip['id']}")
            entry = entries[chip["id"]]
            if chip_hash(parent / entry["image"], parent / entry["mask"]) != chip["hash"]:
                raise EngineError("DATASET_CHANGED", f"Chip {chip['id']} of {parent.name} no longer matches "
                                  "its catalog hash: the parent dataset was modified.",
                                  "Rebuild the parent dataset; datasets are not edited in place.")
            _link(parent / entry["image"], tmp / entry["image"])
            _link(parent / entry["mask"], tmp / entry["mask"])
        shutil.copy2(parent / "catalog.gpkg", tmp / "catalog.gpkg")
        with sqlite3.connect(tmp / "catalog.gpkg") as db:
            # By the ids selected above, not by --where again: a condition need not give the
            # same rows twice (random(), a subquery), and the catalog must list the chips taken.
            db.execute(f"DELETE FROM {LAYER} WHERE id NOT IN (SELECT value FROM json_each(?))",
                       (json.dumps([c["id"] for c in chips]),))
        db.close()
        snapshot = {"query": params.where, "parent": str(parent.resolve()),
                    "parent_hash": manifest.extra.get("content_hash", ""),
                    "chips": {c["id"]: c["hash"] for c in chips}}
        out_manifest = Manifest.from_dict({**manifest.to_dict(), **band_stats(chips, manifest.dtype),
                                           **class_balance(chips, manifest.class_names),
                                           "content_hash": content_hash(chips), "snapshot": snapshot,
                                           "chips": [entries[c["id"]] for c in chips]})
        out_manifest.write(tmp)
        write_info(tmp / "catalog.gpkg", {k: v if isinstance(v, str) else json.dumps(v)
                                          for k, v in out_manifest.to_dict().items() if k != "chips"})
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o444)  # immutable: a snapshot is cited by its hashes
    reporter.log(f"snapshot of {len(chips)} chips from {parent.name} where {params.where}")
    return StageResult(outputs={"dataset": str(params.out)},
                       summary={"chips": len(chips), **splits, "classes": len(manifest.class_names)})


def catalog_info(catalog: Path) -> dict:
    """The dataset facts stored in a catalog (values JSON-decoded where they are JSON)."""
    def decode(value: str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return {k: decode(v) for k, v in read_info(catalog).items()}
