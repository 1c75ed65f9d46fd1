"""MBTiles 1.3 output: the AOI's tiles as one SQLite file QGIS opens directly
(offline field use). Rows are TMS (counted from the south), as the spec says."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from ..atomic import atomic_output
from .tiles import Tile


def image_format(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"


class MBTilesWriter:
    """Collects tiles into a temporary SQLite file; `close(ok=True)` renames it into place."""

    def __init__(self, out: Path, name: str, bounds: tuple[float, float, float, float], zoom: int) -> None:
        self._atomic = atomic_output(out)
        self.tmp = self._atomic.__enter__()
        self._db = sqlite3.connect(self.tmp)
        self._db.executescript("""
            CREATE TABLE metadata (name TEXT, value TEXT);
            CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB);
            CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row);
        """)
        self._meta = {"name": name, "type": "baselayer", "version": "1.0", "minzoom": str(zoom),
                      "maxzoom": str(zoom), "bounds": ",".join(f"{v:.7f}" for v in bounds),
                      "center": f"{(bounds[0] + bounds[2]) / 2:.7f},{(bounds[1] + bounds[3]) / 2:.7f},{zoom}"}
        self.format = ""

    def add(self, tile: Tile, data: bytes) -> None:
        self.format = self.format or image_format(data)
        self._db.execute("INSERT OR REPLACE INTO tiles VALUES (?, ?, ?, ?)",
                         (tile.z, tile.x, 2 ** tile.z - 1 - tile.y, sqlite3.Binary(data)))

    def close(self, ok: bool) -> None:
        try:
            if ok:
                self._meta["format"] = self.format or "png"
                self._db.executemany("INSERT INTO metadata VALUES (?, ?)", self._meta.items())
                self._db.commit()
            self._db.close()
        finally:
            if ok:
                self._atomic.__exit__(None, None, None)
            else:  # removes the temporary file
                try:
                    self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
                except RuntimeError:
                    pass
