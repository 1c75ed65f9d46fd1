"""A loopback XYZ tile server for tests and the demo.

    tiles = make_tiles(Path("data/deepforest/OSBS_029.tif"), tmp / "tiles", "19-21")
    with serve(tiles, fail=Fail(first=2)) as url:   # "http://127.0.0.1:PORT/{z}/{x}/{y}.png"
        ...                                         # url.requests: Counter of paths served

As a script (the demo uses it): prints the URL template, serves until killed.

    python tests/tile_server.py RASTER --zooms 19-21 --port 8765
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

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


def make_tiles(raster: Path, out_dir: Path, zooms: str = "19-21") -> Path:
    """Cut `raster` into XYZ PNG tiles (RGBA, transparent outside the image) with
    Debian's gdal2tiles; returns `out_dir` (laid out as z/x/y.png)."""
    cmd = [SYSTEM_PYTHON, GDAL2TILES, "--xyz", "-z", zooms, "-w", "none", "--processes=1",
           str(raster), str(out_dir)]
    proc = subprocess.run(cmd, env=_system_env(), capture_output=True, text=True)
    if proc.returncode != 0 or not any(Path(out_dir).rglob("*.png")):
        raise RuntimeError(f"gdal2tiles failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return Path(out_dir)


@dataclass(frozen=True)
class Fail:
    """Faults to inject. `first`: only the first N requests of each tile fail
    (None: every request). `truncate`: fail by cutting the body in half after
    sending the full Content-Length, instead of answering `status`."""

    status: int = 500
    first: int | None = None
    truncate: bool = False


class ServedURL(str):
    """The URL template, carrying the server's request counter (path -> count)."""

    requests: Counter

    @property
    def request_count(self) -> int:
        return sum(self.requests.values())


def _handler(directory: Path, fail: Fail | None, requests: Counter, lock: threading.Lock):
    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                requests[self.path] += 1
                nth = requests[self.path]
            if fail is not None and (fail.first is None or nth <= fail.first):
                if fail.truncate:
                    return self._truncated()
                self.send_error(fail.status)
                return
            super().do_GET()

        def _truncated(self) -> None:
            path = Path(self.translate_path(self.path))
            if not path.is_file():
                self.send_error(404)
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True

        def log_message(self, format: str, *args) -> None:  # keep test output quiet
            pass

    return partial(Handler, directory=str(directory))


@contextmanager
def serve(directory: Path, port: int = 0, fail: Fail | None = None) -> Iterator[ServedURL]:
    """Serve `directory` over HTTP on 127.0.0.1 (port 0: any free port) in a
    daemon thread; yield the XYZ URL template with its request counter."""
    requests: Counter = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(directory, fail, requests, threading.Lock()))
    server.daemon_threads = True
    # A short poll interval: shutdown() waits for the next poll.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = ServedURL(f"http://127.0.0.1:{server.server_address[1]}/{{z}}/{{x}}/{{y}}.png")
    url.requests = requests
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
