"""A persistent tile cache shared by runs and AOIs: ROOT/sha256(source)/KEY.tile.

- Only validated bodies are put (the caller decodes them first).
- Each put writes a file private to its process and thread, then renames it:
  two runs at once never see half a tile, and the last writer simply wins.
- Expiry by age (file mtime): an expired tile is downloaded again, but still
  used when the server cannot be reached (offline field work).
- The cache is the resume state: a killed fetch re-run takes what is there.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .tiles import Tile

DEFAULT_MAX_AGE_DAYS = 30.0


def user_cache_dir(kind: str) -> Path:
    """The engine's cache folder for `kind` (tiles, overpass) in the user's cache folder:
    ($XDG_CACHE_HOME or ~/.cache)/landcover/KIND."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "landcover" / kind


def default_cache_dir() -> Path:
    return user_cache_dir("tiles")


def tile_key(tile: Tile) -> str:
    return f"{tile.z}/{tile.x}/{tile.y}"


@dataclass(frozen=True)
class TileCache:
    root: Path
    max_age_days: float | None = DEFAULT_MAX_AGE_DAYS  # None: never expires

    @classmethod
    def for_source(cls, cache_dir: Path | None, source: str,
                   max_age_days: float | None = DEFAULT_MAX_AGE_DAYS) -> "TileCache":
        # Hashing the source keeps API keys out of paths and separates sources.
        return cls(Path(cache_dir or default_cache_dir()) / hashlib.sha256(source.encode()).hexdigest(), max_age_days)

    def path(self, key: str | Tile) -> Path:
        return self.root / f"{tile_key(key) if isinstance(key, Tile) else key}.tile"

    def get(self, key: str | Tile) -> tuple[bytes | None, bool]:
        """(bytes or None, fresh): fresh is False for an expired tile."""
        path = self.path(key)
        try:
            data, mtime = path.read_bytes(), path.stat().st_mtime
        except OSError:
            return None, False
        fresh = self.max_age_days is None or time.time() - mtime <= self.max_age_days * 86400
        return data, fresh

    def put(self, key: str | Tile, data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# --- finished mosaics ---------------------------------------------------------------------------------

KEEP_MOSAICS = 8  # per source: the most recent ones (hard links: no extra disk while the outputs exist)


@dataclass(frozen=True)
class MosaicCache:
    """Finished mosaics of a source, so that a run over the same AOI and cached tiles
    does not warp them again: ROOT/mosaics/KEY.tif, a hard link to an output, and
    KEY.json, the state of the tiles it was made from (each tile's size and mtime).
    The mosaic is reused only while every tile is fresh and unchanged, and it is
    itself unchanged (its size and mtime)."""

    tiles: TileCache

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.tiles.root / "mosaics"
        return folder / f"{key}.tif", folder / f"{key}.json"

    def _tiles_state(self, tile_keys: list[str]) -> str | None:
        """A digest of the tiles' sizes and mtimes; None when one is missing or expired."""
        digest = hashlib.sha256()
        oldest = time.time() - self.tiles.max_age_days * 86400 if self.tiles.max_age_days is not None else None
        for key in tile_keys:
            try:
                stat = self.tiles.path(key).stat()
            except OSError:
                return None
            if oldest is not None and stat.st_mtime < oldest:
                return None
            digest.update(f"{key}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return digest.hexdigest()

    def get(self, key: str, tile_keys: list[str], out: Path) -> dict | None:
        """Link the mosaic made from these tiles (unchanged since) to `out`; its stored info, or None."""
        tif, manifest = self._paths(key)
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return None
        if info.get("tiles_state") != self._tiles_state(tile_keys):
            return None
        try:
            os.link(tif, out)
        except OSError:
            return None
        stat = out.stat()
        if [stat.st_size, stat.st_mtime_ns] != info.get("file"):  # changed, or replaced by another run meanwhile
            out.unlink()
            return None
        return info

    def put(self, key: str, tile_keys: list[str], out: Path, info: dict) -> None:
        """Keep `out` (a hard link: the same file, no copy) for runs to come; nothing when linking fails."""
        tif, manifest = self._paths(key)
        state = self._tiles_state(tile_keys)
        if state is None:
            return
        tif.parent.mkdir(parents=True, exist_ok=True)
        part = f".{os.getpid()}-{threading.get_ident()}.part"
        try:
            os.link(out, tif.with_name(tif.name + part))
            os.replace(tif.with_name(tif.name + part), tif)
            stat = tif.stat()
            manifest.with_name(manifest.name + part).write_text(
                json.dumps({**info, "tiles_state": state, "file": [stat.st_size, stat.st_mtime_ns]}))
            os.replace(manifest.with_name(manifest.name + part), manifest)
        except OSError:
            return  # e.g. the cache on another file system: no reuse, no harm
        self._prune()

    def _prune(self) -> None:
        try:
            mosaics = sorted(self._paths("x")[0].parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in mosaics[KEEP_MOSAICS:]:
                old.unlink(missing_ok=True)
                old.with_suffix(".tif").unlink(missing_ok=True)
        except OSError:
            pass  # another run pruning at the same time
