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
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .tiles import Tile

DEFAULT_MAX_AGE_DAYS = 30.0


def default_cache_dir() -> Path:
    """The user's cache folder ($XDG_CACHE_HOME or ~/.cache)/landcover/tiles."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "landcover" / "tiles"


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
