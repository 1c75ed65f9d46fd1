"""Fixtures for the plugin tests, run in real QGIS (pytest-qgis, offscreen):

    make test-plugin    (from the repository root; see the Makefile for the environment it sets)
"""
from __future__ import annotations

import sqlite3
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the plugin package, as QGIS would import it

ENGINE_PYTHON = ROOT / ".venv" / "bin" / "python"


@pytest.fixture
def engine_python(monkeypatch) -> Path:
    """The checkout's engine environment, named explicitly so the user's
    LANDCOVER_ENGINE_PYTHON cannot change what the tests run."""
    if not ENGINE_PYTHON.exists():
        pytest.fail(f"{ENGINE_PYTHON} is missing: run `make install`")
    monkeypatch.setenv("LANDCOVER_ENGINE_PYTHON", str(ENGINE_PYTHON))
    return ENGINE_PYTHON


@pytest.fixture
def no_engine(monkeypatch, tmp_path) -> Path:
    missing = tmp_path / "no-such-venv" / "bin" / "python"
    monkeypatch.setenv("LANDCOVER_ENGINE_PYTHON", str(missing))
    return missing


@pytest.fixture
def basic_authcfg(qgis_iface) -> str:
    """The id of a Basic authentication configuration (field / s3cret) in QGIS's database."""
    from qgis.core import QgsApplication, QgsAuthMethodConfig

    manager = QgsApplication.authManager()
    manager.setMasterPassword("test-master", True)
    config = QgsAuthMethodConfig("Basic")
    config.setName("agency")
    config.setConfig("username", "field")
    config.setConfig("password", "s3cret")
    assert manager.storeAuthenticationConfig(config)
    return config.id()


@pytest.fixture
def plugin(qgis_iface):
    """The plugin as QGIS loads it: classFactory + initGui; unloaded afterwards."""
    import landcover_plugin

    plugin = landcover_plugin.classFactory(qgis_iface)
    plugin.initGui()
    yield plugin
    plugin.unload()


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Process Qt events (QgsTask.finished runs in the main loop) until condition()."""
    from qgis.PyQt.QtCore import QCoreApplication

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        QCoreApplication.processEvents()
        if condition():
            return True
        time.sleep(0.02)
    QCoreApplication.processEvents()
    return condition()


@pytest.fixture
def wait_until() -> Callable[[Callable[[], bool], float], bool]:
    return _wait_until


def _assert_styled(layer, gpkg) -> None:
    """The layer shows the style the engine stored as default in layer_styles."""
    from qgis.core import QgsVectorLayer
    from qgis.PyQt.QtXml import QDomDocument

    with sqlite3.connect(gpkg) as db:
        (qml,) = db.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = ? AND useAsDefault",
                            (layer.name(),)).fetchone()
    bare = QgsVectorLayer(layer.source(), "bare", "ogr", QgsVectorLayer.LayerOptions(False))
    doc = QDomDocument()
    assert doc.setContent(qml)[0]
    ok, message = bare.importNamedStyle(doc)
    assert ok, message
    assert layer.renderer().dump() == bare.renderer().dump()


@pytest.fixture
def assert_styled() -> Callable:
    return _assert_styled


def png_tile(size: int = 256, rgb: tuple[int, int, int] = (60, 120, 60)) -> bytes:
    """A plain PNG image (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(rgb) * size
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * size)) + chunk(b"IEND", b""))


class SlowTiles:
    """An XYZ tile server on 127.0.0.1 that takes `delay_s` per tile."""

    def __init__(self, delay_s: float) -> None:
        tile = png_tile()
        self.requested = threading.Event()
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server_self.requested.set()
                time.sleep(delay_s)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(tile)))
                    self.end_headers()
                    self.wfile.write(tile)
                except OSError:
                    pass  # the engine was cancelled and hung up

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{{z}}/{{x}}/{{y}}.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_tiles() -> Iterator[SlowTiles]:
    server = SlowTiles(delay_s=2.0)
    yield server
    server.close()
