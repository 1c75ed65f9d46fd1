"""Training chips: imagery cut into square GeoTIFF chips with rasterized masks.

Masks (uint8 GeoTIFF, same grid as the chip):
- landcover: one band, class index 0..N-1 (sorted class names), 255 = ignore
  (unlabelled or nodata: OSM-like labels are incomplete, so "no polygon" is
  not a class).
- trees: band 1 crown (1 inside the ellipse inscribed in each box/polygon, 0
  background, 255 = ignore: nodata or outside the annotated image's footprint);
  band 2 tree-centre heatmap (gaussian at each crown centre, sigma = crown
  radius / 3, 0..255), ignored wherever band 1 is 255.

Validation split by spatial blocks: whole 2x2-chip blocks, grown nearest-first
around a random block into one compact area, go to validation, and train chips touching a validation chip (8-neighbourhood) become "buffer"
chips, kept on disk and in the catalog but used for neither, so no train
pixel lies next to a validation pixel. Tiny images fall back to single-chip
blocks, then to touching chips (logged).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .errors import EngineError
from .events import Reporter, StageResult
from .labels import Labels, read_labels

TASKS = ("trees", "landcover")
IGNORE = 255
BLOCK = 2  # chips per block side in the spatial split
MIN_VALID = 0.5  # chips with less valid imagery are skipped
# NLCD-like colours, matched by keyword in the (lower-case) class name.
CLASS_COLORS = {
    "forest": "#68ab5f", "shrub": "#ccb879", "herbaceous": "#dfdfc2", "agricultur": "#dcd939",
    "cultivated": "#dcd939", "developed": "#eb0000", "water": "#466b9f", "barren": "#b3ac9f",
    "sediment": "#b3ac9f", "crown": "#2ca02c",
}
Cell = tuple[int, int]  # (row, col) of a chip in the chip grid


@dataclass(frozen=True)
class DatasetParams:
    imagery: Path
    labels: Path
    task: str  # "trees" | "landcover"
    out: Path
    class_field: str | None = None
    chip_size: int = 128
    val_share: float = 0.25


def class_color(name: str) -> str:
    """The NLCD-like colour for a class name; a stable made-up one otherwise."""
    lower = name.lower()
    for key, color in CLASS_COLORS.items():
        if key in lower:
            return color
    return "#" + hashlib.md5(name.encode()).hexdigest()[:6]


def input_scale(dtype: str, data_max: float) -> float:
    """What raw values are divided by: 255 for 8-bit-like data, else the data's maximum."""
    if dtype == "uint8" or 1.0 < data_max <= 255.0:
        return 255.0
    return float(data_max) if data_max > 0 else 1.0


def split_cells(cells: list[Cell], val_share: float, seed: int = 0) -> tuple[dict[Cell, str], str]:
    """Assign each chip "train", "val" or "buffer"; also say which strategy worked."""
    if len(cells) < 2:
        raise EngineError("TOO_FEW_CHIPS", f"Only {len(cells)} usable chip(s): need one to train and one to validate.",
                          "Use a larger area, more labels, or a smaller --chip-size.")
    for block, buffered, how in ((BLOCK, True, f"{BLOCK}x{BLOCK}-chip blocks with a buffer"),
                                 (1, True, "single-chip blocks with a buffer (few chips)"),
                                 (1, False, "single chips, train and val touching (very few chips)")):
        split = _block_split(cells, val_share, block, buffered, seed)
        if split:
            return split, how
    raise AssertionError("the last strategy always splits two or more chips")


def _block_split(cells: list[Cell], val_share: float, block: int, buffered: bool,
                 seed: int) -> dict[Cell, str] | None:
    """Move blocks to validation until the share is reached, skipping a block
    that would leave no train chip. Blocks are taken nearest-first around a
    seeded random start block: a compact validation area needs the smallest
    buffer ring."""
    members: dict[Cell, list[Cell]] = {}
    for r, c in cells:
        members.setdefault((r // block, c // block), []).append((r, c))
    rng = random.Random(seed)
    start = rng.choice(sorted(members))
    order = sorted(members, key=lambda b: ((b[0] - start[0]) ** 2 + (b[1] - start[1]) ** 2, rng.random()))
    target = max(1, round(val_share * len(cells)))
    cellset, val, covered = set(cells), set(), set()  # covered: val + buffer
    for b in order:
        if len(val) >= target:
            break
        near = {(r + dr, c + dc) for r, c in members[b] for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                } if buffered else set(members[b])
        new = (near & cellset) - covered
        if len(covered) + len(new) >= len(cellset):
            continue
        val.update(members[b])
        covered |= new
    if not val:
        return None
    return {cell: "val" if cell in val else "buffer" if cell in covered else "train" for cell in cells}


def inscribed_ellipse(geom, points: int = 32):
    """The ellipse inscribed in a geometry's minimum rotated rectangle (a box
    reprojected into another CRS is slightly rotated)."""
    from shapely.geometry import Polygon

    corners = np.asarray(geom.minimum_rotated_rectangle.exterior.coords)[:4]
    centre = corners.mean(axis=0)
    u, v = (corners[1] - corners[0]) / 2, (corners[2] - corners[1]) / 2
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)[:, None]
    return Polygon(centre + np.cos(t) * u + np.sin(t) * v)


def landcover_mask(geoms: list, values: list[int], transform, size: int, valid: np.ndarray) -> np.ndarray:
    """(1, size, size) class indices, IGNORE where unlabelled or invalid."""
    from rasterio.features import rasterize

    mask = np.full((size, size), IGNORE, np.uint8)
    if geoms:
        mask = rasterize(zip(geoms, values), out_shape=(size, size), transform=transform,
                         fill=IGNORE, dtype="uint8")
    mask[~valid] = IGNORE
    return mask[None]


def trees_mask(crowns: list, transform, size: int, valid: np.ndarray, footprint) -> np.ndarray:
    """(2, size, size): crown 0/1/IGNORE and centre heatmap 0..255 for these ellipses."""
    from rasterio.features import rasterize

    crown = np.zeros((size, size), np.uint8)
    if crowns:
        crown = rasterize(((g, 1) for g in crowns), out_shape=(size, size), transform=transform,
                          fill=0, dtype="uint8")
    if footprint is not None:
        inside = rasterize([(footprint, 1)], out_shape=(size, size), transform=transform, fill=0, dtype="uint8")
        crown[inside == 0] = IGNORE
    crown[~valid] = IGNORE
    heat = np.zeros((size, size), np.float64)
    rows, cols = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    pixel = abs(transform.a)
    for g in crowns:
        col, row = ~transform @ (g.centroid.x, g.centroid.y)
        sigma = max(math.sqrt(g.area / math.pi) / pixel / 3, 1.0)
        heat = np.maximum(heat, np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2)))
    return np.stack([crown, np.round(heat * 255).astype(np.uint8)])


def resolution_m(src) -> float:
    """Pixel size in metres (approximate for a geographic CRS)."""
    res = (abs(src.transform.a) + abs(src.transform.e)) / 2
    if src.crs is not None and src.crs.is_geographic:
        lat = (src.bounds.bottom + src.bounds.top) / 2
        return res * 111_320 * math.cos(math.radians(lat))
    return res


def build_dataset(params: DatasetParams, reporter: Reporter) -> StageResult:
    if params.task not in TASKS:
        raise EngineError("BAD_TASK", f"Unknown task '{params.task}'.", f"Use one of {', '.join(TASKS)}.")
    if params.chip_size < 32 or params.chip_size % 16:
        raise EngineError("BAD_CHIP_SIZE", f"Chip size {params.chip_size} is not a multiple of 16 (>= 32).",
                          "Use e.g. --chip-size 64, 128 or 256.")
    if not 0 < params.val_share < 1:
        raise EngineError("BAD_VAL_SHARE", f"Validation share {params.val_share} is not between 0 and 1.",
                          "Use e.g. --val-share 0.25.")
    from .imagery import open_raster

    labels = read_labels(params.labels, params.imagery, params.task, params.class_field)
    class_names = labels.class_names if params.task == "landcover" else ["crown"]
    reporter.log(f"{len(labels.geometries)} labels, classes: {', '.join(class_names)}")
    with atomic_output(params.out, directory=True) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        with open_raster(params.imagery) as src:
            chips, meta = _write_chips(src, labels, params, class_names, tmp, reporter)
        split, how = split_cells([c["cell"] for c in chips], params.val_share)
        reporter.log(f"validation split: {how}")
        for chip in chips:
            chip["split"] = split[chip["cell"]]
        meta |= _band_stats(chips, meta)
        _write_catalog(tmp / "catalog.gpkg", chips, labels.crs)
        counts = {s: sum(c["split"] == s for c in chips) for s in ("train", "val", "buffer")}
        manifest = {"task": params.task, "class_names": class_names,
                    "class_colors": [class_color(n) for n in class_names], **meta,
                    "split": how, "imagery": str(params.imagery), "labels": str(params.labels),
                    "crs": labels.crs, "chips": [_chip_entry(c) for c in chips]}
        (tmp / "dataset.json").write_text(json.dumps(manifest, indent=1))
    return StageResult(outputs={"dataset": str(params.out)},
                       summary={"chips": len(chips), **counts, "classes": len(class_names),
                                "resolution_m": round(meta["resolution_m"], 4)})


def _write_chips(src, labels: Labels, params: DatasetParams, class_names: list[str], out: Path,
                 reporter: Reporter) -> tuple[list[dict], dict]:
    """Cut, mask and write every usable chip; return chip records and raster facts."""
    import rasterio
    from rasterio.windows import Window
    from shapely.geometry import box
    from shapely.strtree import STRtree

    bands = [i + 1 for i, ci in enumerate(src.colorinterp) if ci.name != "alpha"]
    size, nodata = params.chip_size, src.nodata
    trees = params.task == "trees"
    geoms = [inscribed_ellipse(g) for g in labels.geometries] if trees else labels.geometries
    values = [0] * len(geoms) if trees else [class_names.index(c) for c in labels.classes]
    tree = STRtree(geoms)
    margin = max((math.sqrt(g.area / math.pi) for g in geoms), default=0.0) if trees else 0.0
    n_rows, n_cols = math.ceil(src.height / size), math.ceil(src.width / size)
    chips: list[dict] = []
    for k in range(n_rows * n_cols):
        row, col = divmod(k, n_cols)
        reporter.progress("dataset", k + 1, n_rows * n_cols, f"chip {k + 1}/{n_rows * n_cols}")
        window = Window(col * size, row * size, size, size)
        transform = src.window_transform(window)
        valid = (src.read_masks(bands, window=window, boundless=True) > 0).all(axis=0)
        if valid.mean() < MIN_VALID:
            continue
        bounds = rasterio.windows.bounds(window, src.transform)
        near = tree.query(box(*bounds).buffer(margin))
        if trees:
            mask = trees_mask([geoms[i] for i in near], transform, size, valid, labels.footprint)
        else:
            mask = landcover_mask([geoms[i] for i in near], [values[i] for i in near], transform, size, valid)
        labelled = float((mask[0] != IGNORE).mean())
        if labelled == 0:
            continue
        image = src.read(bands, window=window, boundless=True, fill_value=nodata if nodata is not None else 0)
        chip_id = f"{len(chips):04d}"
        _write_tif(out / "images" / f"{chip_id}.tif", image, transform, src.crs, nodata, valid)
        _write_tif(out / "masks" / f"{chip_id}.tif", mask, transform, src.crs,
                   None if trees else IGNORE, None)
        pixels = image[:, valid].astype(np.float64)
        chips.append({"id": chip_id, "cell": (row, col), "bounds": list(bounds), "labelled": labelled,
                      "sum": pixels.sum(axis=1), "sumsq": (pixels**2).sum(axis=1), "count": pixels.shape[1],
                      "max": float(pixels.max())})
    if not chips:
        raise EngineError("NO_CHIPS", "No chip of the imagery has both valid pixels and labels.",
                          "Check that the labels cover the imagery's valid area, or use a smaller --chip-size.")
    meta = {"band_count": len(bands), "bands": bands, "resolution_m": resolution_m(src), "chip_size": size,
            "nodata": nodata, "dtype": src.dtypes[bands[0] - 1]}
    return chips, meta


def _write_tif(path: Path, data: np.ndarray, transform, crs, nodata, valid: np.ndarray | None) -> None:
    import rasterio

    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": data.dtype.name, "crs": crs, "transform": transform, "nodata": nodata,
               "compress": "deflate"}
    # An internal mask (not a .msk sidecar) keeps each chip one file.
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if valid is not None and nodata is None and not valid.all():
            dst.write_mask(valid.astype(np.uint8) * 255)  # so readers know the padding / alpha holes


def _band_stats(chips: list[dict], meta: dict) -> dict:
    """input_scale and per-band mean/std after scaling, from the train chips' valid pixels."""
    scale = input_scale(meta["dtype"], max(c["max"] for c in chips))
    train = [c for c in chips if c["split"] == "train"]
    count = sum(c["count"] for c in train)
    mean = sum(c["sum"] for c in train) / count
    std = np.sqrt(np.maximum(sum(c["sumsq"] for c in train) / count - mean**2, 0))
    return {"input_scale": scale, "mean": [float(m / scale) for m in mean],
            "std": [float(max(s / scale, 1e-6)) for s in std]}


def _chip_entry(chip: dict) -> dict:
    return {"id": chip["id"], "image": f"images/{chip['id']}.tif", "mask": f"masks/{chip['id']}.tif",
            "split": chip["split"], "bounds": chip["bounds"], "labelled": round(chip["labelled"], 4)}


def _write_catalog(path: Path, chips: list[dict], crs_wkt: str) -> None:
    """One polygon per chip (id, split, labelled fraction), for a look in QGIS."""
    import fiona
    from shapely.geometry import box, mapping

    schema = {"geometry": "Polygon", "properties": {"id": "str", "split": "str", "labelled": "float"}}
    with fiona.open(path, "w", driver="GPKG", layer="chips", schema=schema, crs_wkt=crs_wkt) as dst:
        dst.writerecords({"geometry": mapping(box(*c["bounds"])),
                          "properties": {"id": c["id"], "split": c["split"], "labelled": c["labelled"]}}
                         for c in chips)
