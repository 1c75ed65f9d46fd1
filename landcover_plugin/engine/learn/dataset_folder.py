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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError

MANIFEST_NAME = "dataset.json"
CHIP_KEYS = {"id", "image", "mask", "split"}
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
