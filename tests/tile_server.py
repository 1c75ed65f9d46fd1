"""A loopback XYZ tile server for tests and the demo.

    tiles = make_tiles(Path("data/deepforest/OSBS_029.tif"), tmp / "tiles", "19-21")
    with serve(tiles, fail=Fail(first=2)) as url:   # "http://127.0.0.1:PORT/{z}/{x}/{y}.png"
        ...                                         # url.requests: Counter of paths served

As a script (the demo uses it): prints the URL template, serves until killed.

    python tests/tile_server.py RASTER --zooms 19-21 --port 8765
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.transform import from_bounds
from rasterio.errors import NotGeoreferencedWarning
from rasterio.vrt import WarpedVRT

warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)  # tiles and WMS images carry no georeference

GDAL2TILES = "/usr/bin/gdal2tiles.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def _system_env() -> dict[str, str]:
    """os.environ without the engine venv, so gdal2tiles runs on Debian's Python
    and GDAL (the venv's rasterio may point GDAL_DATA/PROJ_DATA at its wheel)."""
    drop = {"PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "GDAL_DATA", "PROJ_LIB", "PROJ_DATA", "GDAL_DRIVER_PATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if sys.prefix == sys.base_prefix or p != venv_bin)
    return env


def make_tiles(raster: Path, out_dir: Path, zooms: str = "19-21", tile_size: int = 256) -> Path:
    """Cut `raster` into XYZ PNG tiles (RGBA, transparent outside the image) with
    Debian's gdal2tiles; returns `out_dir` (laid out as z/x/y.png)."""
    cmd = [SYSTEM_PYTHON, GDAL2TILES, "--xyz", "-z", zooms, "-w", "none", "--processes=1",
           f"--tilesize={tile_size}", str(raster), str(out_dir)]
    proc = subprocess.run(cmd, env=_system_env(), capture_output=True, text=True)
    if proc.returncode != 0 or not any(Path(out_dir).rglob("*.png")):
        raise RuntimeError(f"gdal2tiles failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return Path(out_dir)


@dataclass(frozen=True)
class Fail:
    """Faults to inject. `first`: only the first N requests of each tile fail
    (None: every request); `paths`: only requests for these paths fail (None: all).
    Instead of answering `status`: `truncate` cuts the body in half after sending
    the full Content-Length; `cut` sends half the body with the half's
    Content-Length (nothing for HTTP to notice); `trickle` sends the body's first
    `trickle_bytes` bytes one at a time, `trickle` seconds apart (each gap under the
    client's read timeout), then the rest. `retry_after`: seconds sent in a
    Retry-After header with the error."""

    status: int = 500
    first: int | None = None
    truncate: bool = False
    retry_after: int | None = None
    cut: bool = False
    trickle: float = 0.0
    trickle_bytes: int = 20
    paths: frozenset[str] | None = None

    def applies(self, path: str, nth: int) -> bool:
        return (self.first is None or nth <= self.first) and (self.paths is None or path in self.paths)

    @property
    def sends_body(self) -> bool:
        return self.truncate or self.cut or self.trickle > 0


@dataclass(frozen=True)
class Chaos:
    """Random faults at given rates, decided by a hash of (path, attempt) so a
    run is reproducible; a tile's attempts after `max_bad` always succeed."""

    p500: float = 0.10
    p429: float = 0.05
    ptruncate: float = 0.02
    retry_after: int = 1
    max_bad: int = 3

    def pick(self, path: str, nth: int) -> Fail | None:
        if nth > self.max_bad:
            return None
        draw = int(hashlib.sha256(f"{path}#{nth}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if draw < self.p500:
            return Fail(500)
        if draw < self.p500 + self.p429:
            return Fail(429, retry_after=self.retry_after)
        if draw < self.p500 + self.p429 + self.ptruncate:
            return Fail(truncate=True)
        return None


class ServedURL(str):
    """The URL template, carrying the server's request counter (path -> count)."""

    requests: Counter
    times: dict  # path -> monotonic times of its requests
    headers: list  # the HTTP headers of each request

    @property
    def request_count(self) -> int:
        return sum(self.requests.values())


def synthetic_tiles(count: int = 4, size: int = 256) -> list[bytes]:
    """`count` PNG tiles of distinct flat colours with a diagonal stripe, made once."""
    tiles = []
    for i in range(count):
        rgb = np.zeros((3, size, size), np.uint8)
        rgb[0], rgb[1], rgb[2] = 40 + 50 * i, 200 - 40 * i, 90 + 30 * (i % 2)
        idx = np.arange(size)
        rgb[:, idx, idx] = 255
        with MemoryFile() as mem:
            with mem.open(driver="PNG", count=3, width=size, height=size, dtype="uint8") as dst:
                dst.write(rgb)
            tiles.append(mem.read())
    return tiles


def synthetic_tile(path: str, tiles: list[bytes]) -> bytes | None:
    """Any /z/x/y.png gets one of `tiles`, chosen by x and y (so a misplaced tile shows)."""
    parts = path.split("?")[0].strip("/").split("/")
    try:
        z, x, y = (int(p.split(".")[0].split("@")[0]) for p in parts[-3:])
    except ValueError:
        return None
    return tiles[(3 * x + y) % len(tiles)]


def wms_image(raster: Path, query: str) -> tuple[bytes, str]:
    """Answer a WMS GetMap from `raster`: (PNG, "image/png"), or a ServiceException.
    BBOX axis order as WMS says: 1.3.0 with EPSG:4326 is latitude first."""
    q = {k.upper(): v for k, v in parse_qsl(query, keep_blank_values=True)}
    if q.get("REQUEST", "").lower() != "getmap" or not q.get("LAYERS"):
        return b'<?xml version="1.0"?><ServiceExceptionReport><ServiceException>bad request' \
               b'</ServiceException></ServiceExceptionReport>', "application/vnd.ogc.se_xml"
    version = q.get("VERSION", "1.3.0")
    crs = q.get("CRS" if version == "1.3.0" else "SRS", "EPSG:4326")
    a, b, c, d = (float(v) for v in q["BBOX"].split(","))
    if version == "1.3.0" and crs.upper() == "EPSG:4326":
        a, b, c, d = b, a, d, c
    width, height = int(q["WIDTH"]), int(q["HEIGHT"])
    transform = from_bounds(a, b, c, d, width, height)
    with rasterio.open(raster) as src, WarpedVRT(src, crs=crs, transform=transform, width=width, height=height,
                                                 add_alpha=True) as vrt:
        rgba = vrt.read()
    with MemoryFile() as mem:
        with mem.open(driver="PNG", count=4, width=width, height=height, dtype="uint8") as dst:
            dst.write(rgba)
        return mem.read(), "image/png"


def _handler(directory: Path | None, fail: Fail | Chaos | None, requests: Counter, times: dict,
             seen_headers: list, lock: threading.Lock, latency: float, synthetic: list[bytes] | None, wms: Path | None,
             moved: str | None = None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real tile servers do

        def do_GET(self) -> None:
            with lock:
                requests[self.path] += 1
                nth = requests[self.path]
                times.setdefault(self.path, []).append(time.monotonic())
                seen_headers.append(dict(self.headers))
            if latency:
                time.sleep(latency)
            if moved is not None and not self.path.startswith("/moved/"):
                return self._send(302, b"", "text/plain", {"Location": f"{moved}/moved{self.path}"})
            fault = fail.pick(self.path, nth) if isinstance(fail, Chaos) else \
                fail if fail is not None and fail.applies(self.path, nth) else None
            if fault is not None and not fault.sends_body:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                return self._send(fault.status, b"error", "text/plain", headers)
            body, content_type = self._body()
            if body is None:
                return self._send(404, b"not found", "text/plain")
            self._send(200, body, content_type, fault=fault)

        def _body(self) -> tuple[bytes | None, str]:
            if wms is not None:
                return wms_image(wms, urlsplit(self.path).query)
            path = self.path.removeprefix("/moved")  # where `moved` servers send their clients
            if synthetic is not None:
                return synthetic_tile(path, synthetic), "image/png"
            path = (directory / urlsplit(path).path.lstrip("/")).resolve()
            if directory.resolve() not in path.parents or not path.is_file():
                return None, ""
            return path.read_bytes(), "image/png"

        def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None,
                  fault: Fail | None = None) -> None:
            if fault is not None and fault.cut:  # half the body, announced as the whole of it
                body = body[: len(body) // 2]
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if fault is not None and fault.truncate:  # the full length announced, half sent, the connection dropped
                self.send_header("Connection", "close")
                self.close_connection = True
                body = body[: len(body) // 2]
            self.end_headers()
            try:
                if fault is not None and fault.trickle:
                    for i in range(min(fault.trickle_bytes, len(body))):
                        self.wfile.write(body[i:i + 1])
                        time.sleep(fault.trickle)
                    body = body[fault.trickle_bytes:]
                self.wfile.write(body)
            except OSError:  # the client gave up (a trickle past its deadline) and closed the connection
                self.close_connection = True

        def log_message(self, format: str, *args) -> None:  # keep test output quiet
            pass

    return Handler


@contextmanager
def serve(directory: Path | None = None, port: int = 0, fail: Fail | Chaos | None = None, latency: float = 0.0,
          synthetic: bool = False, wms: Path | None = None, moved: str | None = None) -> Iterator[ServedURL]:
    """Serve over HTTP on 127.0.0.1 (port 0: any free port) in a daemon thread;
    yield the URL template with its request counter. Sources: `directory`
    (z/x/y.png files), `synthetic` (any z/x/y gets a tile made once), or `wms`
    (a raster answering WMS GetMap). `latency`: seconds added to each answer.
    `moved`: answer each request with a 302 to MOVED/moved/PATH, which every
    server answers as PATH ("": to this server itself, another base URL: elsewhere)."""
    requests: Counter = Counter()
    times: dict = {}
    seen_headers: list = []
    tiles = synthetic_tiles() if synthetic else None
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(directory, fail, requests, times, seen_headers,
                                                               threading.Lock(), latency, tiles, wms, moved))
    server.daemon_threads = True
    server.request_queue_size = 128
    # A short poll interval: shutdown() waits for the next poll.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    url = ServedURL(f"{base}/wms?SERVICE=WMS" if wms else f"{base}/{{z}}/{{x}}/{{y}}.png")
    url.requests, url.times, url.headers = requests, times, seen_headers
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a raster as XYZ tiles on 127.0.0.1.")
    parser.add_argument("raster", type=Path)
    parser.add_argument("--zooms", default="19-21", help="zoom levels, e.g. 19-21")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--tiles-dir", type=Path, help="where to write the tiles (default: a temporary folder)")
    args = parser.parse_args(argv)
    # SIGTERM (the demo stopping us) unwinds like Ctrl-C, so the temporary tiles are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="tiles-") as tmp:
        tiles = make_tiles(args.raster, args.tiles_dir or Path(tmp), args.zooms)
        with serve(tiles, args.port) as url:
            print(url, flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
