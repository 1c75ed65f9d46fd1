"""The dataset folder `landcover dataset` writes, read by training, evaluation and snapshots.

    images/ID.tif  masks/ID.tif  catalog.gpkg  dataset.json

dataset.json is the Manifest: read and written here only. The fields the stages
use are typed; statistics, class balance, provenance and a snapshot's query travel
in `extra`, written back as they were read.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError

MANIFEST_NAME = "dataset.json"
CHIP_KEYS = {"id", "image", "mask", "split"}
Cell = tuple[int, int]  # (row, col) of a chip in the chip grid
REBUILD = "Rebuild the dataset with `landcover dataset`; its files are not meant to be edited."


@dataclass(frozen=True)
class Manifest:
    task: str
    class_names: list[str]
    class_colors: list[str]
    band_count: int
    chip_size: int
    resolution_m: float
    dtype: str
    input_scale: float  # imagery values / input_scale, then (x - mean) / std per band
    mean: list[float]
    std: list[float]
    chips: list[dict]  # id, image, mask, split (train | val | buffer); class, fractions, hash, ...
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def norm(self) -> dict[str, Any]:
        return {"input_scale": self.input_scale, "mean": self.mean, "std": self.std}

    @property
    def centres_only(self) -> bool:
        """Tree positions only (points): the crown channel is ignored in training."""
        return bool(self.extra.get("centres_only"))

    def split(self, name: str) -> list[dict]:
        return [c for c in self.chips if c["split"] == name]

    def to_dict(self) -> dict[str, Any]:
        typed = asdict(self)
        return {**{k: v for k, v in typed.items() if k != "extra"}, **self.extra}

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> "Manifest":
        names = [f.name for f in fields(cls) if f.name != "extra"]
        missing = [k for k in names if not isinstance(data, dict) or k not in data]
        chips = data.get("chips") if isinstance(data, dict) else None
        if missing or not isinstance(chips, list) or not all(isinstance(c, dict) and CHIP_KEYS <= set(c)
                                                               for c in chips):
            raise EngineError("BAD_DATASET", f"{where} is not a dataset manifest"
                              + (f" (no {', '.join(missing)})." if missing else " (its chip list is malformed)."),
                              REBUILD)
        return cls(**{k: data[k] for k in names}, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise EngineError("DATASET_NOT_FOUND", f"{folder} is not a dataset folder (no {MANIFEST_NAME}).",
                              "Make one with `landcover dataset --imagery ... --labels ... --out DIR`.")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # cut short by a full disk, or edited by hand
            raise EngineError("BAD_DATASET", f"{path} is not readable JSON: {exc}", REBUILD) from None
        return cls.from_dict(data, str(path))

    def write(self, folder: Path) -> None:
        (Path(folder) / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=1))


def dataset_hash(folder: Path) -> str:
    """sha256 of dataset.json: it names every chip and its split, and the dataset
    stage writes chips and manifest together, so it identifies the snapshot."""
    return hashlib.sha256((Path(folder) / MANIFEST_NAME).read_bytes()).hexdigest()


def read_chip(folder: Path, chip: dict, norm: dict, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """One chip as (H, W, B) normalised image and (H, W, 1|2) mask, float32.
    Invalid pixels get 0 (the mean); a chip that cannot be read is named in the error."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(Path(folder) / chip["image"]) as src:
            image = src.read().astype(np.float32)
            valid = (src.read_masks() > 0).all(axis=0)
        with rasterio.open(Path(folder) / chip["mask"]) as src:
            mask = src.read()
    except (RasterioError, OSError) as exc:
        raise EngineError("CORRUPT_CHIP", f"Chip {chip['id']} of {folder} cannot be read: {exc}",
                          "Rebuild the dataset with `landcover dataset` (or delete the chip from dataset.json).") from None
    if image.shape[0] != bands or mask.shape[1:] != image.shape[1:]:
        raise EngineError("CORRUPT_CHIP", f"Chip {chip['id']} of {folder} has {image.shape[0]} bands of "
                          f"{image.shape[1:]} px and a {mask.shape[1:]} mask; the dataset says {bands} bands.",
                          "Rebuild the dataset with `landcover dataset`.")
    scale = norm["input_scale"]
    mean, std = np.array(norm["mean"], np.float32), np.array(norm["std"], np.float32)
    x = (image / scale - mean[:, None, None]) / std[:, None, None]
    x[:, ~valid] = 0.0
    return x.transpose(1, 2, 0), mask.transpose(1, 2, 0).astype(np.float32)


def load_chips(folder: Path, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, B) float32, normalised, and masks (N, H, W, 1|2) float32, read in
    parallel threads (GDAL releases the GIL). Chips are held in memory: a few thousand
    256-px chips fit easily, and the augmentation pipeline then never waits on the disk."""
    from concurrent.futures import ThreadPoolExecutor

    chips = manifest.split(split)
    if not chips:
        code = "EMPTY_VAL_SPLIT" if split == "val" else "NO_CHIPS"
        raise EngineError(code, f"The dataset {Path(folder).name} has no {split} chips.",
                          "Rebuild it with `landcover dataset` over a larger area (or a larger --val-share)."
                          if split == "val" else "Rebuild it with `landcover dataset` over a larger area.")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        pairs = list(pool.map(lambda c: read_chip(folder, c, manifest.norm, manifest.band_count), chips))
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def chip_labels(manifest: Manifest, split: str) -> np.ndarray:
    """Classification: each chip's class index (in load_chips' order), as float32."""
    return np.array([c["class"] for c in manifest.split(split)], np.float32)


# --- what the dataset stage records: the spatial split, chip statistics, hashes ---------------

BLOCK = 2  # chips per block side in the spatial split


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


def pixel_sums(image: np.ndarray, valid: np.ndarray) -> dict:
    """Per-band sum and sum of squares of the valid pixels (for mean/std), their count and maximum.
    8-bit imagery goes through a histogram: exact, and much faster than float arithmetic."""
    if image.dtype == np.uint8:
        levels = np.arange(256, dtype=np.float64)
        whole = valid.all()
        hists = [np.bincount(band.ravel() if whole else band[valid], minlength=256).astype(np.float64)
                 for band in image]
        sums, sumsq = [float(h @ levels) for h in hists], [float(h @ levels**2) for h in hists]
        top = max(int(np.flatnonzero(h)[-1]) if h.any() else 0 for h in hists)
        return {"sum": sums, "sumsq": sumsq, "count": int(valid.sum()), "max": float(top)}
    pixels = image[:, valid].astype(np.float64)
    return {"sum": pixels.sum(axis=1).tolist(), "sumsq": (pixels**2).sum(axis=1).tolist(),
            "count": int(pixels.shape[1]), "max": float(pixels.max())}


def chip_hash(*paths: Path) -> str:
    """Content hash of a chip (image and mask bytes): what a snapshot's manifest pins."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def content_hash(chips: list[dict]) -> str:
    """A dataset's identity: its chips' ids, hashes and splits."""
    lines = sorted(f"{c['id']} {c['hash']} {c['split']}" for c in chips)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def class_balance(chips: list[dict], class_names: list[str]) -> dict:
    """Pixel share per class over the train chips, and median-frequency class weights
    (rare classes weigh more; absent classes 0)."""
    train = [c for c in chips if c["split"] == "train"] or chips
    totals = np.sum([c["fractions"] for c in train], axis=0) if train else np.zeros(len(class_names))
    share = totals / totals.sum() if totals.sum() else totals
    present = share[share > 0]
    median = float(np.median(present)) if len(present) else 0.0
    weights = [round(median / s, 4) if s > 0 else 0.0 for s in share]
    return {"class_balance": [round(float(s), 6) for s in share], "class_weights": weights}


def band_stats(chips: list[dict], dtype: str) -> dict:
    """input_scale and per-band mean/std after scaling, from the train chips' valid pixels."""
    scale = input_scale(dtype, max(c["max"] for c in chips))
    train = [c for c in chips if c["split"] == "train"] or chips
    count = sum(c["count"] for c in train)
    mean = np.sum([c["sum"] for c in train], axis=0) / count
    std = np.sqrt(np.maximum(np.sum([c["sumsq"] for c in train], axis=0) / count - mean**2, 0))
    return {"input_scale": scale, "mean": [float(m / scale) for m in mean],
            "std": [float(max(s / scale, 1e-6)) for s in std]}


def chip_class(fractions: list[float]) -> int:
    """Classification: a chip's class is the majority class of its labelled pixels."""
    return int(np.argmax(fractions))


def chip_entry(chip: dict) -> dict:
    entry = {"id": chip["id"], "image": f"images/{chip['id']}.tif", "mask": f"masks/{chip['id']}.tif",
             "split": chip["split"], "bounds": chip["bounds"], "labelled": round(chip["labelled"], 4),
             "hash": chip["hash"]}
    return entry | ({"class": chip["class"]} if "class" in chip else {})


def input_scale(dtype: str, data_max: float) -> float:
    """What raw values are divided by: 255 for 8-bit-like data, else the data's maximum."""
    if dtype == "uint8" or 1.0 < data_max <= 255.0:
        return 255.0
    return float(data_max) if data_max > 0 else 1.0
