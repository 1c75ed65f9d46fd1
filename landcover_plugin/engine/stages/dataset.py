"""Training chips: imagery cut into square GeoTIFF chips with rasterized masks.

Masks (uint8 GeoTIFF, same grid as the chip):
- landcover: one band, class index 0..N-1 (the preset's classes, else sorted names;
  "background" first with --complete), 255 = ignore
  (unlabelled or nodata: OSM-like labels are incomplete, so "no polygon" is
  not a class).
- buildings: like land cover with the classes fixed to background (0) and
  building (1); any polygons are buildings, and uncovered pixels are background
  (a building layer maps its area completely, as Label Maker assumes).
- classification: the land-cover mask, plus one class per chip (`class` in
  dataset.json, `chip_class` in the catalog): the majority class of its
  labelled pixels.
- trees: band 1 crown (1 inside the ellipse inscribed in each box/polygon, 0
  background, 255 = ignore: nodata or outside the annotated image's footprint);
  band 2 tree-centre heatmap (gaussian at each crown centre, sigma = crown
  radius / 3, 0..255), ignored wherever band 1 is 255 -- except in a dataset made
  from tree positions (points, `centres_only` in dataset.json): band 1 is 255
  throughout (crowns unknown) and band 2 holds gaussians of --crown-radius.

Validation split by spatial blocks: whole 2x2-chip blocks, grown nearest-first
around a random block into one compact area, go to validation, and train chips touching a validation chip (8-neighbourhood) become "buffer"
chips, kept on disk and in the catalog but used for neither, so no train
pixel lies next to a validation pixel. Tiny images fall back to single-chip
blocks, then to touching chips (logged).

The build streams: chips are written one by one into `.NAME.building/` beside
the output, each recorded in chips.jsonl, so memory stays flat with the area
and a cancelled build resumes where it stopped; the folder is renamed to the
output once complete. Masks: rasterize.py; catalog and snapshots: catalog.py.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...contract.names import IGNORE
from ...contract.tasks import TASK_IDS
from ..atomic import check_out_path, lock_path, mark_output_dir, replace_with, run_lock
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..labels.rasterize import (centres_mask, class_fractions, draw_order, landcover_mask, offset_in_crs, shift,
                                trees_mask)
from ..labels.read import Labels, read_labels
from ..learn.dataset_folder import (Manifest, band_stats, chip_class, chip_entry, chip_hash, class_balance,
                                    content_hash, pixel_sums, split_cells)

BACKGROUND = "background"  # the class of uncovered pixels in a completely mapped area
BUILDING, BUILDING_COLOR = "building", "#d62728"  # as the buildings preset
MIN_VALID = 0.5  # chips with less valid imagery are skipped
MAX_CHIP_SIZE = 2048  # pixels: a chip is read whole, and training holds every chip in memory
AUTO_CHIP_MAX = 256  # the largest chip the automatic size picks
OVERLAP_WINDOWS = 2000  # land cover: fewer grid windows than this, and chips overlap by half (small scenes)
MIN_CLASS_PIXELS = 50  # training pixels below which a class is reported as too small to learn
MIN_LABEL_SHARE = 0.01  # labels covering less of the scene are reported
GAP_SHARE = 0.01  # a band without data on more of the scene than this (where the others have it) is reported
CACHE_MB = 64  # GDAL block cache while cutting chips
# NLCD-like colours, matched by keyword in the (lower-case) class name.
CLASS_COLORS = {
    "forest": "#68ab5f", "shrub": "#ccb879", "herbaceous": "#dfdfc2", "agricultur": "#dcd939",
    "cultivated": "#dcd939", "developed": "#eb0000", "water": "#466b9f", "barren": "#b3ac9f",
    "sediment": "#b3ac9f", "crown": "#2ca02c",
}


@dataclass(frozen=True)
class DatasetParams:
    imagery: Path | None  # None with `source` (a snapshot of another dataset)
    labels: Path | None
    task: str  # one of contract.tasks.TASK_IDS
    out: Path
    class_field: str | None = None
    chip_size: int | None = None  # pixels; None: from the scene and the labels (auto_chip_size)
    val_share: float = 0.25
    preset: str | None = None  # fixes the classes, their order, colours and overlap priority
    complete: bool = False  # the labels map the area completely: uncovered pixels are background
    offset: tuple[float, float] = (0.0, 0.0)  # metres (east, north) the labels are moved onto the imagery
    background_ratio: float = 0.0  # background-only chips kept per labelled chip (with `complete`)
    source: Path | None = None  # --from: a dataset to take a subset of
    where: str | None = None  # --where: SQL condition on the source's catalog
    class_map: dict[str, str] | None = None  # label value -> class name (e.g. codes -> names)
    crown_radius_m: float = 2.0  # tree positions (points): the crown radius their heatmap assumes
    seed: int = 0  # draws the validation split (another seed, other validation polygons or blocks)


def class_color(name: str) -> str:
    """The NLCD-like colour for a class name; a stable made-up one otherwise."""
    lower = name.lower()
    for key, color in CLASS_COLORS.items():
        if key in lower:
            return color
    return "#" + hashlib.md5(name.encode()).hexdigest()[:6]


def inscribed_ellipse(geom, points: int = 32):
    """The ellipse inscribed in a geometry's minimum rotated rectangle (a box
    reprojected into another CRS is slightly rotated)."""
    from shapely.geometry import Polygon

    corners = np.asarray(geom.minimum_rotated_rectangle.exterior.coords)[:4]
    centre = corners.mean(axis=0)
    u, v = (corners[1] - corners[0]) / 2, (corners[2] - corners[1]) / 2
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)[:, None]
    return Polygon(centre + np.cos(t) * u + np.sin(t) * v)


def resolution_m(src) -> float:
    """Pixel size in metres (approximate for a geographic CRS)."""
    res = (abs(src.transform.a) + abs(src.transform.e)) / 2
    if src.crs is not None and src.crs.is_geographic:
        lat = (src.bounds.bottom + src.bounds.top) / 2
        return res * 111_320 * math.cos(math.radians(lat))
    return res


def build_dataset(params: DatasetParams, reporter: Reporter) -> StageResult:
    check_out_path(params.out, directory=True, inputs=[params.imagery, params.labels, params.source])
    # One run at a time per output: two would share (and tear) the resumable .NAME.building folder.
    with run_lock(lock_path(params.out), str(params.out)):
        return _build_dataset(params, reporter)


def _build_dataset(params: DatasetParams, reporter: Reporter) -> StageResult:
    if params.source is not None:
        from .catalog import build_snapshot

        return build_snapshot(params, reporter)
    _check(params)
    from ..imagery.raster import open_raster

    labels = read_labels(params.labels, params.imagery, params.task, params.class_field, params.class_map)
    class_names, colors, values, priorities = _classes(labels, params)
    if labels.points:
        reporter.log(f"{len(labels.geometries)} tree positions (points): centre heatmap only "
                     f"(crown radius {params.crown_radius_m} m), crown channel ignored")
    reporter.log(f"{len(labels.geometries)} labels, classes: {', '.join(class_names)}"
                 + (f"; invalid geometries: {labels.repaired} repaired, {labels.skipped} skipped"
                    if labels.repaired or labels.skipped else ""))
    info = labels.info or {}
    if info.get("attribution"):
        reporter.log(f"Labels: {info['attribution']} (ODbL)")
    work = _work_dir(params)
    try:
        import rasterio

        # Each source block is read once: a small block cache keeps memory flat with the AOI's size
        # (GDAL's default grows to 5% of the RAM).
        with rasterio.Env(GDAL_CACHEMAX=CACHE_MB), open_raster(params.imagery) as src:
            _check_coverage(labels, src, reporter)
            splits = (polygon_split(labels.geometries, labels.classes, params.val_share, params.seed)
                      if by_polygon(params) else None)
            chips, meta = _write_chips(src, labels, params, class_names, values, priorities, work, reporter, splits)
            imagery_date = src.tags().get("TIFFTAG_DATETIME", "")
        if splits is not None and any(c["split"] == "val" for c in chips):
            how = "by polygon: each class's separate polygons go whole to train or validation"
        else:  # no class with two separate polygons (all train, one chip per window): spatial blocks
            split, how = split_cells([tuple(c["cell"]) for c in chips], params.val_share, params.seed)
            for chip in chips:
                chip["split"] = split[tuple(chip["cell"])]
            if splits is not None:
                how = f"no class has two separate polygons: {how}"
        reporter.log(f"validation split: {how}")
        for chip in chips:
            if params.task == "classification":
                chip["class"] = chip_class(chip["fractions"])
        meta |= band_stats(chips, meta["dtype"])
        balance = class_balance(chips, class_names)
        notes = class_notes(class_names, chips, labels) if params.task in ("landcover", "classification") else {}
        for name, why in notes.items():
            reporter.log(f"class '{name}' {why}", level="warning")
        provenance = {"imagery": str(params.imagery), "imagery_date": imagery_date,
                      "label_source": info.get("source", str(params.labels)), "label_date": info.get("date", ""),
                      "preset": params.preset or info.get("preset", ""),
                      "offset_x": params.offset[0], "offset_y": params.offset[1]}
        manifest = Manifest.from_dict({
            "task": params.task, "class_names": class_names, "class_colors": colors, **meta,
            "split": how, "imagery": str(params.imagery), "labels": str(params.labels),
            "crs": labels.crs, "centres_only": labels.points, "complete": params.complete,
            "offset_m": list(params.offset), "background_ratio": params.background_ratio, "provenance": provenance,
            "attribution": info.get("attribution", ""), **balance, "class_notes": notes,
            "content_hash": content_hash(chips), "chips": [chip_entry(c) for c in chips]})
        from .catalog import write_catalog

        write_catalog(work / "catalog.gpkg", chips, labels.crs, class_names, provenance, manifest)
        manifest.write(work)
        (work / "chips.jsonl").unlink()
        (work / "state.json").unlink()
    except EngineError:
        _remove_dir(work)  # bad input: nothing to resume
        raise
    _replace_dir(work, params.out)
    counts = {s: sum(c["split"] == s for c in chips) for s in ("train", "val", "buffer")}
    return StageResult(outputs={"dataset": str(params.out)},
                       summary={"chips": len(chips), **counts, "classes": len(class_names),
                                "resolution_m": round(meta["resolution_m"], 4), "chip_size": meta["chip_size"],
                                **({"class_notes": notes} if notes else {})})


def _check(params: DatasetParams) -> None:
    if params.task not in TASK_IDS:
        raise EngineError("BAD_TASK", f"Unknown task '{params.task}'.", f"Use one of {', '.join(TASK_IDS)}.")
    if params.imagery is None or params.labels is None:
        raise EngineError("NO_INPUT", "A dataset needs imagery and labels (or --from another dataset).",
                          "Give --imagery RASTER --labels VECTOR, or --from DATASET --where SQL.")
    if params.chip_size is not None and (params.chip_size < 32 or params.chip_size % 16):
        raise EngineError("BAD_CHIP_SIZE", f"Chip size {params.chip_size} is not a multiple of 16 (>= 32).",
                          "Use e.g. --chip-size 64, 128 or 256.")
    if params.chip_size is not None and params.chip_size > MAX_CHIP_SIZE:
        raise EngineError("BAD_CHIP_SIZE", f"Chip size {params.chip_size} is larger than {MAX_CHIP_SIZE} pixels: "
                          "training holds every chip in memory.", "Use e.g. --chip-size 64, 128 or 256.")
    if not 0 < params.val_share < 1:
        raise EngineError("BAD_VAL_SHARE", f"Validation share {params.val_share} is not between 0 and 1.",
                          "Use e.g. --val-share 0.25.")
    if not 0 < params.crown_radius_m < math.inf:
        raise EngineError("BAD_CROWN_RADIUS", f"Crown radius {params.crown_radius_m} m is not positive.",
                          "Use e.g. --crown-radius 2 (metres, the typical crown radius of the trees).")
    if not 0 <= params.background_ratio < math.inf:
        raise EngineError("BAD_BACKGROUND_RATIO", f"Background ratio {params.background_ratio} is negative or not "
                          "a number.",
                          "Use e.g. --background-ratio 0.2 (one background chip per five labelled ones).")


def _classes(labels: Labels, params: DatasetParams) -> tuple[list[str], list[str], list[int], list[int]]:
    """Class names and colours, and per label its mask value and drawing priority.
    A preset fixes names, order, colours and priorities (the same across datasets);
    without one: the sorted names found, NLCD-like colours, file order."""
    if params.task == "trees":
        return ["crown"], [class_color("crown")], [1] * len(labels.classes), [0] * len(labels.classes)
    if params.task == "buildings":  # binary: every polygon is a building, whatever its class value
        return [BACKGROUND, BUILDING], ["#9e9e9e", BUILDING_COLOR], [1] * len(labels.classes), [0] * len(labels.classes)
    if params.preset:
        from ..labels.presets import load_preset

        preset = load_preset(params.preset)
        names, colors = list(preset.class_names), list(preset.class_colors)
        unknown = sorted(set(labels.classes) - set(names))
        if unknown:
            raise EngineError("UNKNOWN_CLASS", f"Label class(es) {', '.join(map(repr, unknown))} are not in "
                              f"preset {preset.name} ({', '.join(names)}).",
                              "Fix the labels' class values, or pick the preset they were made with.")
        class_priority = {n: max(r.priority for r in preset.rules if r.class_name == n) for n in names}
        priorities = labels.priorities or [class_priority[c] for c in labels.classes]
    else:
        names = list(labels.class_names)
        colors = [class_color(n) for n in names]
        priorities = labels.priorities or [0] * len(labels.classes)
    if params.complete and BACKGROUND not in names:
        names, colors = [BACKGROUND, *names], ["#9e9e9e", *colors]
    return names, colors, [names.index(c) for c in labels.classes], priorities


# --- sized to the labels: chip size, split by polygon, what cannot be learnt -----------------------

def by_polygon(params: DatasetParams) -> bool:
    """Land cover from polygons (not a complete map): validation holds whole polygons."""
    return params.task == "landcover" and not params.complete


def auto_chip_size(height: int, width: int, extents_px: list[float]) -> int:
    """A chip about twice the median label's extent (context around a whole polygon), a multiple
    of 16 from 32 up, and small enough that the scene holds at least 4 x 4 chips: a few dozen
    30 m polygons get 32 px chips, 0.3 m field parcels larger ones."""
    median = float(np.median(extents_px)) if extents_px else 0.0
    most = max(32, min(AUTO_CHIP_MAX, min(height, width) // 4 // 16 * 16))
    return int(min(most, max(32, math.ceil(2 * median / 16) * 16)))


def touching_groups(geoms: list) -> list[int]:
    """A group id per geometry: touching or overlapping geometries share one (one "separate polygon")."""
    from shapely.strtree import STRtree

    parent = list(range(len(geoms)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for a, b in STRtree(geoms).query(geoms, predicate="intersects").T:
        parent[root(int(a))] = root(int(b))
    return [root(i) for i in range(len(geoms))]


def polygon_split(geoms: list, classes: list[str], val_share: float, seed: int = 0) -> list[str]:
    """"train" or "val" per label: per class, separate polygons (whole, with those touching them)
    taken in a seeded random order go to validation until they hold `val_share` of the class's area,
    never all of them; a class of one polygon trains only."""
    import random

    rng = random.Random(seed)
    groups = touching_groups(geoms)
    split = ["train"] * len(geoms)
    for name in sorted(set(classes)):
        area: dict[int, float] = {}
        for i, c in enumerate(classes):
            if c == name:
                area[groups[i]] = area.get(groups[i], 0.0) + geoms[i].area
        ids = sorted(area)
        rng.shuffle(ids)
        val: set[int] = set()
        for g in ids[:-1]:  # the last one always trains
            if sum(area[v] for v in val) >= val_share * sum(area.values()):
                break
            val.add(g)
        for i, c in enumerate(classes):
            if c == name and groups[i] in val:
                split[i] = "val"
    return split


def class_notes(class_names: list[str], chips: list[dict], labels: Labels) -> dict[str, str]:
    """Why a class cannot be learnt (or validated): the message a user needs instead of a silent model."""
    def pixels(split: str) -> np.ndarray:
        of = [c for c in chips if c["split"] == split]
        if not of:
            return np.zeros(len(class_names))
        return np.sum([np.array(c["fractions"]) * c["pixels"] for c in of], axis=0)
    train, val = pixels("train"), pixels("val")
    groups = touching_groups(labels.geometries)
    notes = {name: "is given only as points or lines: it cannot be learnt (land cover learns from areas); "
             "draw polygons for it" for name in labels.no_area_classes}
    for i, name in enumerate(class_names):
        separate = len({groups[j] for j, c in enumerate(labels.classes) if c == name})
        if name not in labels.classes:
            continue  # e.g. background
        if train[i] == 0:
            notes[name] = ("cannot be learnt: none of its labelled pixels has valid imagery (no nodata in any "
                           "band) in a training chip")
        elif train[i] < MIN_CLASS_PIXELS:
            notes[name] = (f"cannot be learnt reliably: only {int(train[i])} training pixels (fewer than "
                           f"{MIN_CLASS_PIXELS}); draw larger or more polygons")
        elif separate < 2:
            notes[name] = ("has one polygon only: no polygon of its own can validate it; draw a second one "
                           "apart from it")
        elif val[i] == 0:
            notes[name] = "has no validation pixels: it is learnt but not validated"
    return notes


def band_gaps(src, size: int = 512) -> dict[int, float]:
    """Bands lacking data where every other band has it (a stack of separate files: Landsat's
    band 7 may miss a third of the scene), as {band: share of the scene}; read decimated."""
    from rasterio.enums import Resampling

    from ..imagery.raster import reading

    if src.count < 2:
        return {}
    shape = (src.count, min(src.height, size), min(src.width, size))
    with reading(src.name):
        valid = src.read_masks(out_shape=shape, resampling=Resampling.nearest) > 0
    gaps = {}
    for b in range(src.count):
        others = np.delete(valid, b, axis=0).all(axis=0)
        share = float(np.mean(others & ~valid[b]))
        if share > GAP_SHARE:
            gaps[b + 1] = share
    return gaps


def _check_coverage(labels: Labels, src, reporter: Reporter) -> None:
    """Labels over less than 1% of the scene: say so (the map beyond them is extrapolated); and
    a band without data where the others have it (those pixels are ignored, their labels lost)."""
    for band, share in band_gaps(src).items():
        reporter.log(f"band {band} of the imagery has no data on {100 * share:.0f}% of the scene where the other "
                     "bands have data: those pixels are neither learnt nor mapped (a stack without that band keeps "
                     "them)", level="warning")
    import shapely
    from shapely.geometry import box

    scene = box(*src.bounds)
    share = shapely.union_all(labels.geometries).intersection(scene).area / scene.area
    if share < MIN_LABEL_SHARE and not labels.points:
        reporter.log(f"the labels cover {100 * share:.2f}% of the imagery (under {100 * MIN_LABEL_SHARE:g}%): "
                     "the model will map the rest from very few examples; label more areas, or crop the "
                     "imagery to where you labelled", level="warning")


# --- streaming, resumable chip writing ----------------------------------------------------------

def _fingerprint(params: DatasetParams) -> str:
    """What the chips depend on: a resumed build must match it."""
    def stamp(path: Path) -> list:
        st = Path(path).stat()
        return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    fields = {k: v for k, v in vars(params).items() if k not in ("out", "val_share", "source", "where")}
    fields |= {"imagery": stamp(params.imagery), "labels": stamp(params.labels)}
    return hashlib.sha256(json.dumps(fields, default=str, sort_keys=True).encode()).hexdigest()


def _work_dir(params: DatasetParams) -> Path:
    """Where chips are written while building, beside the output. It survives a
    cancel so that the next run with the same inputs resumes; it only becomes
    the output, by a rename, once complete."""
    work = params.out.with_name(f".{params.out.name}.building")
    state = work / "state.json"
    fingerprint = _fingerprint(params)
    if state.is_file() and json.loads(state.read_text()).get("fingerprint") == fingerprint:
        return work
    _remove_dir(work)
    (work / "images").mkdir(parents=True)
    (work / "masks").mkdir()
    (work / "chips.jsonl").touch()
    state.write_text(json.dumps({"fingerprint": fingerprint}))
    return work


def _remove_dir(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _replace_dir(work: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    mark_output_dir(work)
    replace_with(work, out, directory=True)


def _resume(work: Path) -> list[dict]:
    """Chips recorded by an earlier, interrupted run (a torn last line is dropped)."""
    chips = []
    for line in (work / "chips.jsonl").read_text().splitlines():
        try:
            chips.append(json.loads(line))
        except ValueError:
            break
    return chips


def _write_chips(src, labels: Labels, params: DatasetParams, class_names: list[str], values: list[int],
                 priorities: list[int], out: Path, reporter: Reporter,
                 splits: list[str] | None = None) -> tuple[list[dict], dict]:
    """Cut, mask and write every usable chip, one at a time (memory flat in the
    AOI's size), appending each chip's record to chips.jsonl; resume after the last.
    With `splits` (one per label, see polygon_split) a window gives a train chip holding
    the train polygons' labels and a val chip holding the val polygons' (same image)."""
    import rasterio
    from rasterio.windows import Window
    from shapely.geometry import box
    from shapely.strtree import STRtree

    from ..imagery.raster import common_dtype, read_bands, reading

    bands = [i + 1 for i, ci in enumerate(src.colorinterp) if ci.name != "alpha"]
    res = (abs(src.transform.a) + abs(src.transform.e)) / 2
    size, nodata = params.chip_size, src.nodata
    if size is None:
        size = auto_chip_size(src.height, src.width, [max(g.bounds[2] - g.bounds[0], g.bounds[3] - g.bounds[1]) / res
                                                      for g in labels.geometries])
        reporter.log(f"chip size {size} px (from the scene's size and the labels'; --chip-size sets it)")
    if size > max(src.height, src.width):  # not one chip fits: refused before reading a chip's worth of memory
        raise EngineError("BAD_CHIP_SIZE", f"Chip size {size} is larger than the imagery "
                          f"({src.width} x {src.height} pixels).",
                          f"Use a chip size of at most {max(src.height, src.width) // 16 * 16}, e.g. 128.")
    trees = params.task == "trees"
    dx, dy = offset_in_crs(*params.offset, src.crs, (src.bounds.bottom + src.bounds.top) / 2)
    geoms = shift(labels.geometries, dx, dy)
    footprint = shift([labels.footprint], dx, dy)[0] if labels.footprint is not None else None
    if trees and not labels.points:
        geoms = [inscribed_ellipse(g) for g in geoms]
    radius = offset_in_crs(params.crown_radius_m, 0, src.crs, (src.bounds.bottom + src.bounds.top) / 2)[0]
    order = draw_order(priorities)  # burnt low priority first: the highest wins overlaps
    geoms, values = [geoms[i] for i in order], [values[i] for i in order]
    splits = [splits[i] for i in order] if splits is not None else None
    tree = STRtree(geoms)
    margin = max((math.sqrt(g.area / math.pi) for g in geoms), default=0.0) if trees else 0.0
    margin = radius if labels.points else margin
    complete = params.complete or params.task == "buildings"
    background = class_names.index(BACKGROUND) if complete and not trees else None
    stride = size
    if params.chip_size is None and splits is not None and \
            math.ceil(src.height / size) * math.ceil(src.width / size) < OVERLAP_WINDOWS:
        stride = size // 2  # automatic size, small scene: overlapping chips give the few polygons more contexts
    n_rows, n_cols = math.ceil(max(src.height - size, 0) / stride) + 1, math.ceil(max(src.width - size, 0) / stride) + 1
    chips = _resume(out)
    if chips:
        reporter.log(f"resuming: {len(chips)} chips already written")
    n_background = sum(c["background_only"] for c in chips)
    log = open(out / "chips.jsonl", "a")
    try:
        for k in range(chips[-1]["k"] + 1 if chips else 0, n_rows * n_cols):
            row, col = divmod(k, n_cols)
            reporter.progress("dataset", k + 1, n_rows * n_cols, f"chip {k + 1}/{n_rows * n_cols}")
            window = Window(col * stride, row * stride, size, size)
            transform = src.window_transform(window)
            # Boundless reads go through a VRT (slow): only chips over the edge need them.
            edge = row * stride + size > src.height or col * stride + size > src.width
            with reading(src.name):
                valid = (src.read_masks(bands, window=window, boundless=edge) > 0).all(axis=0)
            if valid.mean() < MIN_VALID:
                continue
            bounds = rasterio.windows.bounds(window, src.transform)
            near = sorted(tree.query(box(*bounds).buffer(margin)))  # sorted: keep the priority order
            image = None
            for split, mask in _masks(near, geoms, values, splits, labels.points, trees, radius, transform, size,
                                      valid, footprint, background):
                fractions, ignored = class_fractions(mask, len(class_names), trees)
                labelled = float(valid.mean()) if labels.points else 1.0 - ignored  # points: the heatmap is known
                background_only = background is not None and fractions[background] >= labelled - 1e-9
                if labelled == 0:
                    continue
                if background_only:  # Label Maker's background ratio: a few, not all, empty chips
                    labelled_chips = len(chips) - n_background
                    if n_background + 1 > params.background_ratio * max(labelled_chips, 1):
                        continue
                    n_background += 1
                if image is None:
                    with reading(src.name):
                        image = read_bands(src, bands, window=window, boundless=edge,
                                           fill_value=nodata if nodata is not None else 0)
                    if nodata is not None:  # one nodata value for the chip: a stack's bands may each have their own
                        image[:, ~valid] = nodata
                chip_id = f"{len(chips):04d}"
                _write_tif(out / "images" / f"{chip_id}.tif", image, transform, src.crs, nodata, valid)
                _write_tif(out / "masks" / f"{chip_id}.tif", mask, transform, src.crs, None if trees else IGNORE, None)
                chip = {"id": chip_id, "k": k, "cell": [row, col], "bounds": list(bounds), "labelled": labelled,
                        "fractions": fractions, "ignored": ignored, "background_only": background_only,
                        "pixels": size * size, **pixel_sums(image, valid),
                        "hash": chip_hash(out / "images" / f"{chip_id}.tif", out / "masks" / f"{chip_id}.tif")}
                if split is not None:
                    chip["split"] = split
                log.write(json.dumps(chip) + "\n")
                log.flush()
                chips.append(chip)
    finally:
        log.close()
    if not chips:
        raise EngineError("NO_CHIPS", "No chip of the imagery has both valid pixels and labels.",
                          "Check that the labels cover the imagery's valid area (or fix them with --offset), "
                          "or use a smaller --chip-size.")
    meta = {"band_count": len(bands), "bands": bands, "resolution_m": resolution_m(src), "chip_size": size,
            "nodata": nodata, "dtype": common_dtype(src, bands)}
    return chips, meta


def _masks(near: list[int], geoms: list, values: list[int], splits: list[str] | None, points: bool, trees: bool,
           radius: float, transform, size: int, valid: np.ndarray, footprint, background: int | None):
    """The window's (split, mask) pairs: one mask (split decided later), or with `splits` one per
    split holding only that split's polygons (the other's pixels ignored)."""
    if points:
        return [(None, centres_mask([geoms[i] for i in near], radius, transform, size))]
    if trees:
        return [(None, trees_mask([geoms[i] for i in near], transform, size, valid, footprint))]
    if splits is None:
        return [(None, landcover_mask([geoms[i] for i in near], [values[i] for i in near], transform, size, valid,
                                      background))]
    return [(split, landcover_mask([geoms[i] for i in part], [values[i] for i in part], transform, size, valid,
                                   background))
            for split in ("train", "val") if (part := [i for i in near if splits[i] == split])]


def _write_tif(path: Path, data: np.ndarray, transform, crs, nodata, valid: np.ndarray | None) -> None:
    import rasterio

    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": data.dtype.name, "crs": crs, "transform": transform, "nodata": nodata,
               "compress": "deflate", "zlevel": 1}  # level 1: 3x faster than 6, files ~10% larger
    if valid is None or nodata is not None or valid.all():
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
        return
    # An internal mask (not a .msk sidecar) keeps each chip one file.
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.write_mask(valid.astype(np.uint8) * 255)  # so readers know the padding / alpha holes


