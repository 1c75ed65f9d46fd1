"""The fetch stage: tile maths, XYZ over a loopback server, local rasters, bad input."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import rasterio
import requests
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform, transform_bounds
from rasterio.windows import from_bounds
from shapely.geometry import box

from landcover_plugin.engine.errors import Cancelled, EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.imagery import mosaic
from landcover_plugin.engine.imagery.aoi import AOI
from landcover_plugin.engine.imagery.decode import decode_tile
from landcover_plugin.engine.imagery.tile_cache import TileCache
from landcover_plugin.engine.imagery.tiles import (MAX_LAT, Tile, count_tiles, expand_template, ground_resolution,
                                                   lnglat_to_tile, nearest_zoom, quadkey, template_tile_size,
                                                   tile_bounds_lnglat, tile_bounds_mercator, tiles_covering)
from landcover_plugin.engine.stages.fetch import FetchParams, fetch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tile_server import Chaos, Fail, make_tiles, serve  # noqa: E402

# The loopback servers write PNGs without georeference, in their threads.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

OSBS_CRS = "EPSG:32617"
# OSBS_029 covers x 404211.9..404251.9, y 3285102.9..3285142.9 (EPSG:32617); the AOI is its middle 30 m.
AOI_UTM = (404216.9, 3285107.9, 404246.9, 3285137.9)


def wgs84_aoi(utm_bounds: tuple[float, float, float, float]) -> AOI:
    return AOI(box(*transform_bounds(OSBS_CRS, "EPSG:4326", *utm_bounds)), "EPSG:4326")


@pytest.fixture(scope="module")
def tiles_dir(osbs_tif, tmp_path_factory) -> Path:
    return make_tiles(osbs_tif, tmp_path_factory.mktemp("xyz") / "tiles", "19-21")


@pytest.fixture(scope="module")
def aoi() -> AOI:
    return wgs84_aoi(AOI_UTM)


def run(source: str, tmp_path: Path, aoi: AOI, name: str = "mosaic.tif", reporter: Reporter | None = None, **kw):
    params = FetchParams(aoi=aoi, source=source, out=tmp_path / "out" / name,
                         cache_dir=kw.pop("cache_dir", tmp_path / "cache"), **kw)
    return fetch(params, reporter or Reporter(json_mode=True, out=open("/dev/null", "w")))


def out_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "out"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- tile maths ---------------------------------------------------------------------------------


def test_tile_math_known_values():
    assert lnglat_to_tile(-105.0, 40.0, 1) == Tile(0, 0, 1)
    assert lnglat_to_tile(0.0, 0.0, 0) == Tile(0, 0, 0)
    half = 20037508.342789244  # half the side of the EPSG:3857 square
    assert tile_bounds_mercator(Tile(0, 0, 0)) == pytest.approx((-half, -half, half, half))
    assert tile_bounds_mercator(Tile(1, 0, 1)) == pytest.approx((0, 0, half, half))
    assert tile_bounds_lnglat(Tile(0, 0, 1)) == pytest.approx((-180, 0, 0, MAX_LAT))
    assert ground_resolution(0, 0) == pytest.approx(156543.03392804097)
    assert ground_resolution(60, 1) == pytest.approx(156543.03392804097 / 4)
    assert nearest_zoom(0.1, 29.7) == 20
    assert nearest_zoom(0.065, 29.7) == 21
    assert nearest_zoom(28.5, 35.8) == 12


def test_tiles_covering_matches_gdal2tiles(osbs_tif, tiles_dir):
    """The tiles GDAL's gdal2tiles cut for the orthophoto are the ones we compute for its extent."""
    with rasterio.open(osbs_tif) as src:
        bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    for z in (19, 20, 21):
        cut = {Tile(int(p.parent.name), int(p.stem), z) for p in (tiles_dir / str(z)).glob("*/*.png")}
        assert set(tiles_covering(bounds, z)) == cut
        assert count_tiles(bounds, z) == len(cut) > 0


def test_tile_round_trips():
    rng = np.random.default_rng(0)
    for lng, lat, z in zip(rng.uniform(-179.9, 179.9, 50), rng.uniform(-85, 85, 50), rng.integers(0, 23, 50)):
        tile = lnglat_to_tile(lng, lat, int(z))
        west, south, east, north = tile_bounds_lnglat(tile)
        assert west <= lng <= east and south <= lat <= north
        assert lnglat_to_tile((west + east) / 2, (south + north) / 2, int(z)) == tile
        # Both bounds functions describe the same square.
        xs, ys = transform("EPSG:4326", "EPSG:3857", [west, east], [south, north])
        assert tile_bounds_mercator(tile) == pytest.approx((xs[0], ys[0], xs[1], ys[1]), rel=1e-9, abs=1e-3)
        # A box ending exactly on tile edges covers that tile only.
        assert list(tiles_covering((west, south, east, north), int(z))) == [tile]
    assert count_tiles((10.0, 86.0, 11.0, 89.0), 12) == 0  # beyond Web Mercator


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # writing test tiles
def test_decode_tile_formats():
    def encode(driver: str, bands: np.ndarray, **kw) -> bytes:
        with MemoryFile() as mem:
            with mem.open(driver=driver, count=bands.shape[0], width=bands.shape[2], height=bands.shape[1],
                          dtype="uint8", **kw) as dst:
                dst.write(bands)
            return mem.read()

    rgb = np.random.default_rng(1).integers(0, 255, (3, 256, 256), dtype=np.uint8)
    jpeg = decode_tile(encode("JPEG", rgb))
    assert jpeg.shape == (4, 256, 256) and (jpeg[3] == 255).all()
    assert np.abs(jpeg[:3].astype(int) - rgb).mean() < 80  # lossy, but the same picture
    grey = decode_tile(encode("PNG", rgb[:1, :, :]))
    assert grey.shape == (4, 256, 256) and (grey[1] == rgb[0]).all()
    rgba = np.concatenate([rgb, np.zeros((1, 256, 256), np.uint8)])
    assert (decode_tile(encode("PNG", rgba))[3] == 0).all()
    with pytest.raises(ValueError, match="not 256 or 512"):
        decode_tile(encode("PNG", rgb[:, :100, :100]))
    with pytest.raises(ValueError):
        decode_tile(b"<html>rate limited</html>")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # writing test tiles
def test_decode_tile_refuses_tiles_cut_short():
    """GDAL decodes a PNG cut short without an error (the missing rows come out as garbage):
    such a tile must not pass as imagery, whatever its format and wherever it was cut."""
    rgb = np.random.default_rng(2).integers(0, 255, (3, 256, 256), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((1, 256, 256), 255, np.uint8)])
    for driver, bands in (("PNG", rgb), ("PNG", rgba), ("JPEG", rgb), ("WEBP", rgb)):
        with MemoryFile() as mem:
            with mem.open(driver=driver, count=bands.shape[0], width=256, height=256, dtype="uint8") as dst:
                dst.write(bands)
            whole = mem.read()
        assert decode_tile(whole).shape == (4, 256, 256)
        for keep in (0.5, 0.9, len(whole) - 1):
            with pytest.raises(ValueError, match="cut short"):
                decode_tile(whole[: int(keep * len(whole)) if keep < 1 else keep])


# --- XYZ over loopback --------------------------------------------------------------------------


def block_diff(mosaic: Path, source: Path, rows: slice, cols: slice, shift: tuple[int, int] = (0, 0)) -> float:
    """Mean |mosaic - source| over a mosaic window and the source window at the
    same map coordinates (shifted by `shift` source pixels east, south), both
    averaged over 0.4 m blocks: the orthophoto's texture changes a lot from one
    0.1 m pixel to the next, so single pixels would measure resampling, not position."""
    with rasterio.open(mosaic) as mos, rasterio.open(source) as src:
        window = rasterio.windows.Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        a = mos.read(window=window).astype(float)
        assert (mos.read_masks(1, window=window) > 0).all()
        left, bottom, right, top = rasterio.windows.bounds(window, mos.transform)
        dx, dy = shift[0] * src.res[0], -shift[1] * src.res[1]
        b = src.read(window=from_bounds(left + dx, bottom + dy, right + dx, top + dy, src.transform)
                     .round_offsets().round_lengths()).astype(float)
    assert a.shape == b.shape

    def blocks(x: np.ndarray, k: int = 4) -> np.ndarray:
        c, h, w = x.shape
        return x[:, :h // k * k, :w // k * k].reshape(c, h // k, k, w // k, k).mean(axis=(2, 4))

    return float(np.abs(blocks(a) - blocks(b)).mean())


def test_fetch_xyz_is_georeferenced(tiles_dir, aoi, osbs_tif, tmp_path):
    with serve(tiles_dir) as url:
        result = run(url, tmp_path, aoi, gsd=0.1)
        requests_made = url.request_count
    s = result.summary
    assert (s["zoom"], s["tiles"], s["downloaded"], s["from_cache"], s["missing"]) == (20, 4, 4, 0, 0)
    assert requests_made == 4 and s["bytes"] > 0 and s["crs"] == OSBS_CRS and s["gsd_m"] == 0.1
    mosaic = Path(result.outputs["mosaic"])
    assert out_files(tmp_path) == ["mosaic.tif"]
    with rasterio.open(mosaic) as m:
        assert m.crs.to_epsg() == 32617 and m.res == pytest.approx((0.1, 0.1)) and m.count == 3
        assert m.dtypes[0] == "uint8" and m.compression.name == "deflate" and m.overviews(1)
        assert m.block_shapes[0] == (256, 256)
        # The AOI's 30 m, widened to the bounds of the AOI box as it lies in UTM.
        assert m.bounds.left == pytest.approx(AOI_UTM[0], abs=0.5) and m.bounds.top == pytest.approx(AOI_UTM[3], abs=0.5)
        assert 300 <= m.width <= 310 and 300 <= m.height <= 310
        assert (m.dataset_mask() > 0).all()
    for rows, cols in ((slice(20, 100), slice(20, 100)), (slice(150, 250), slice(60, 140)),
                       (slice(200, 280), slice(200, 290))):
        aligned = block_diff(mosaic, osbs_tif, rows, cols)
        assert aligned < 12, (rows, cols, aligned)
        for shift in ((5, 0), (0, 5), (-5, -5)):  # 0.5 m off
            assert block_diff(mosaic, osbs_tif, rows, cols, shift) > 2 * aligned, (rows, cols, shift)
    # The best match among shifts of up to 0.3 m is the unshifted one, give or take a pixel.
    rows, cols = slice(100, 200), slice(100, 200)
    diffs = {(dx, dy): block_diff(mosaic, osbs_tif, rows, cols, (dx, dy)) for dx in range(-3, 4) for dy in range(-3, 4)}
    best = min(diffs, key=diffs.get)
    assert abs(best[0]) <= 1 and abs(best[1]) <= 1, best


def test_tile_outside_the_imagery_is_transparent(tiles_dir, tmp_path):
    """An AOI half over the orthophoto's east edge: the outside half is masked, not black."""
    with serve(tiles_dir) as url:
        result = run(url, tmp_path, wgs84_aoi((404236.9, 3285112.9, 404261.9, 3285132.9)), gsd=0.1)
    with rasterio.open(result.outputs["mosaic"]) as m:
        mask = m.dataset_mask() > 0
        east_edge = int((404251.9 - m.bounds.left) / 0.1)
        assert mask[:, : east_edge - 2].all() and not mask[:, east_edge + 2:].any()
    # Cropped again as a local raster, at another resolution, the mask is kept.
    again = run(result.outputs["mosaic"], tmp_path, wgs84_aoi((404230.0, 3285115.0, 404260.0, 3285130.0)),
                name="again.tif", gsd=0.2)
    with rasterio.open(again.outputs["mosaic"]) as m:
        assert m.res == pytest.approx((0.2, 0.2)) and m.crs.to_epsg() == 32617
        mask = m.dataset_mask() > 0
        east_edge = int((404251.9 - m.bounds.left) / 0.2)
        assert mask[:, : east_edge - 2].all() and not mask[:, east_edge + 2:].any()


def test_second_fetch_uses_cache(tiles_dir, aoi, tmp_path):
    with serve(tiles_dir) as url:
        first = run(url, tmp_path, aoi, name="a.tif", zoom=20)
        count = url.request_count
        second = run(url, tmp_path, aoi, name="b.tif", zoom=20)
        assert url.request_count == count == 4
    assert (second.summary["from_cache"], second.summary["downloaded"], second.summary["bytes"]) == (4, 0, 0)
    cached = list((tmp_path / "cache").rglob("*.tile"))
    assert len(cached) == 4 and not list((tmp_path / "cache").rglob(".*partial*"))
    assert TileCache.for_source(tmp_path / "cache", url).root.name not in url  # a hash, not the URL
    with rasterio.open(first.outputs["mosaic"]) as a, rasterio.open(second.outputs["mosaic"]) as b:
        assert np.array_equal(a.read(), b.read()) and a.transform == b.transform


def test_max_zoom_of_the_source_is_respected(tiles_dir, aoi, tmp_path):
    """A source that stops at zoom 19 (a QGIS connection's zmax) is never asked for zoom 21."""
    with serve(tiles_dir) as url:
        result = run(url, tmp_path, aoi, gsd=0.1, max_zoom=19)  # 0.1 m would be zoom 21
    assert result.summary["zoom"] == 19


@pytest.mark.parametrize("fail", [Fail(first=2), Fail(first=2, status=429), Fail(first=1, truncate=True),
                                  Fail(first=1, cut=True)], ids=["500", "429", "truncated", "cut"])
def test_transient_errors_are_retried(tiles_dir, aoi, tmp_path, fail):
    with serve(tiles_dir) as url:
        clean = run(url, tmp_path, aoi, name="clean.tif", zoom=20, cache_dir=tmp_path / "c1")
    with serve(tiles_dir, fail=fail) as url:
        flaky = run(url, tmp_path, aoi, name="flaky.tif", zoom=20, cache_dir=tmp_path / "c2")
        assert url.request_count == 4 * (fail.first + 1)
    s = flaky.summary
    assert (s["downloaded"], s["missing"], s["failed"], s["retried"]) == (4, 0, 0, 4 * fail.first)
    with rasterio.open(clean.outputs["mosaic"]) as a, rasterio.open(flaky.outputs["mosaic"]) as b:
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.dataset_mask(), b.dataset_mask())


def test_server_answering_errors(tiles_dir, aoi, tmp_path):
    with serve(tiles_dir, fail=Fail(status=503)) as url:
        with pytest.raises(EngineError) as err:
            run(url + "?key=SECRET", tmp_path, aoi, zoom=20)
    assert err.value.code == "TILE_SERVER_ERROR"
    assert "127.0.0.1" in err.value.message and "503" in err.value.message and err.value.hint
    assert "SECRET" not in err.value.message + err.value.hint
    assert out_files(tmp_path) == [] and not list((tmp_path / "cache").rglob("*.tile"))
    # A server refusing every tile is given up on early, not asked for all of them.
    bounds = aoi.to_crs("EPSG:4326").bounds
    assert count_tiles(bounds, 22) > 16
    with serve(tiles_dir, fail=Fail(status=403)) as url:
        with pytest.raises(EngineError) as err:
            run(url, tmp_path, aoi, zoom=22, workers=1)
        # 16, give or take the few a worker fetched ahead while the 16th answer was being looked at.
        assert 16 <= url.request_count <= 19 < count_tiles(bounds, 22)
    assert err.value.code == "TILE_SERVER_ERROR" and "403" in err.value.message
    assert out_files(tmp_path) == []


def tile_paths(aoi: AOI, z: int) -> list[str]:
    """The request paths of the tiles covering `aoi` at zoom `z`, in row order."""
    return [f"/{t.z}/{t.x}/{t.y}.png" for t in sorted(tiles_covering(aoi.bounds, z), key=lambda t: (t.y, t.x))]


def fetch_events(url: str, tmp_path: Path, aoi: AOI, name: str, **kw) -> tuple[object, list[dict]]:
    log = tmp_path / f"{name}.jsonl"
    with open(log, "w") as out:
        result = run(url, tmp_path, aoi, name=name, reporter=Reporter(json_mode=True, out=out), **kw)
    return result, [json.loads(line) for line in log.read_text().splitlines()]


def test_cut_tiles_are_retried_reported_and_never_cached(tiles_dir, aoi, tmp_path, monkeypatch):
    """Tiles cut in half with a matching Content-Length (HTTP cannot tell): each is retried,
    then reported as failed by name (a warning and the summary); none is cached, so a
    rerun once the server is well fetches just those. A cut tile left in the cache by
    an older version is downloaded again."""
    from landcover_plugin.engine.imagery import http_client

    monkeypatch.setattr(http_client, "BACKOFF_BASE", 0.01)  # the retries' waits: not what is tested
    paths = tile_paths(aoi, 20)
    with serve(tiles_dir) as url:
        clean = run(url, tmp_path, aoi, name="clean.tif", zoom=20, cache_dir=tmp_path / "c1")
    with serve(tiles_dir, fail=Fail(cut=True, paths=frozenset(paths[:2]))) as url:
        cut, events = fetch_events(url, tmp_path, aoi, "cut.tif", zoom=20)
        assert all(url.requests[p] == http_client.ATTEMPTS for p in paths[:2])
        port = int(url.split(":")[2].split("/")[0])  # the same URL later: the cache is the URL's
    s = cut.summary
    assert (s["downloaded"], s["failed"], s["retried"]) == (2, 2, 2 * (http_client.ATTEMPTS - 1))
    assert s["failed_tiles"] == sorted(p.strip("/").removesuffix(".png") for p in paths[:2])
    warned, = warnings_of(events)
    assert "2 of 4 tiles could not be fetched" in warned and "cut short" in warned and paths[0][1:-4] in warned
    assert len(list((tmp_path / "cache").rglob("*.tile"))) == 2
    with serve(tiles_dir, port=port) as url:  # the server is well again
        again = run(url, tmp_path, aoi, name="again.tif", zoom=20)
        assert sorted(url.requests) == sorted(paths[:2])
        assert (again.summary["from_cache"], again.summary["downloaded"], again.summary["failed"]) == (2, 2, 0)
        tile = next((tmp_path / "cache").rglob("*.tile"))
        tile.write_bytes(tile.read_bytes()[: tile.stat().st_size // 2])  # as an older version cached it
        healed = run(url, tmp_path, aoi, name="healed.tif", zoom=20)
        assert healed.summary["downloaded"] == 1 and url.request_count == 3
    with rasterio.open(clean.outputs["mosaic"]) as a, rasterio.open(healed.outputs["mosaic"]) as b:
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.dataset_mask(), b.dataset_mask())


def test_tile_trickled_past_its_deadline_is_reported_failed(tiles_dir, aoi, tmp_path):
    """A server sending a tile one byte at a time, each gap under the 30 s read timeout, held
    a worker as long as it pleased: a tile now has a deadline for its whole answer (short
    here), and a tile past it is reported as failed while the others make the mosaic."""
    paths = tile_paths(aoi, 20)
    with serve(tiles_dir, fail=Fail(trickle=0.25, trickle_bytes=40, paths=frozenset(paths[:2]))) as url:
        result, events = fetch_events(url, tmp_path, aoi, "slow.tif", zoom=20, tile_deadline=1.0)
    s = result.summary
    assert (s["downloaded"], s["failed"]) == (2, 2)
    assert s["failed_tiles"] == sorted(p.strip("/").removesuffix(".png") for p in paths[:2])
    warned, = warnings_of(events)
    assert "2 of 4 tiles could not be fetched (no complete answer within 1 s)" in warned
    assert len(list((tmp_path / "cache").rglob("*.tile"))) == 2


def test_server_sending_only_cut_tiles(tiles_dir, aoi, tmp_path, monkeypatch):
    """Every tile cut: the error says the server sends broken tiles, not that the AOI is outside the imagery."""
    from landcover_plugin.engine.imagery import http_client

    monkeypatch.setattr(http_client, "BACKOFF_BASE", 0.01)
    with serve(tiles_dir, fail=Fail(cut=True)) as url:
        with pytest.raises(EngineError) as err:
            run(url, tmp_path, aoi, zoom=20)
    assert err.value.code == "TILE_SERVER_ERROR" and "broken tiles" in err.value.message
    assert "cut short" in err.value.message and err.value.hint
    assert out_files(tmp_path) == [] and not list((tmp_path / "cache").rglob("*.tile"))


def test_server_down(aoi, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EngineError) as err:
        run(f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png?api_key=SECRET", tmp_path, aoi, gsd=0.1)
    assert err.value.code == "TILE_SERVER_UNREACHABLE"
    assert f"127.0.0.1:{port}" in err.value.message and "SECRET" not in err.value.message
    assert out_files(tmp_path) == []


def test_aoi_without_tiles_on_the_server(tiles_dir, tmp_path):
    elsewhere = wgs84_aoi((404300.0, 3285102.9, 404330.0, 3285132.9))  # 50 m east of the orthophoto
    with serve(tiles_dir) as url:
        with pytest.raises(EngineError) as err:
            run(url, tmp_path, elsewhere, zoom=20)
    assert err.value.code == "AOI_OUTSIDE_IMAGERY" and "zoom 20" in err.value.message
    assert out_files(tmp_path) == []


def test_bad_xyz_requests_fail_before_any_download(aoi, tmp_path):
    url = "http://127.0.0.1:9/{z}/{x}/{y}.png"  # never contacted
    cases = [
        ({}, "NEED_ZOOM", "--zoom"),
        ({"zoom": 20, "aoi": AOI(box(10.0, 86.0, 10.1, 86.1))}, "NO_TILES", "85"),
        ({"zoom": 20, "aoi": AOI(box(-82.1, 29.6, -81.9, 29.8))}, "TOO_MANY_TILES", "smaller area"),
        ({"gsd": -1.0}, "BAD_GSD", "--gsd"),
        ({"zoom": 20, "gsd": 0.0001}, "TOO_LARGE", "larger --gsd"),
    ]
    for kw, code, text in cases:
        with pytest.raises(EngineError) as err:
            run(url, tmp_path, kw.pop("aoi", aoi), **kw)
        assert err.value.code == code and text in err.value.message + err.value.hint
    with pytest.raises(EngineError) as err:
        run("http://127.0.0.1:9/tiles.png", tmp_path, aoi, zoom=20)
    assert err.value.code == "BAD_SOURCE"
    with pytest.raises(EngineError) as err:
        run(str(tmp_path / "no-such.tif"), tmp_path, aoi)
    assert err.value.code == "BAD_SOURCE"
    assert out_files(tmp_path) == []


def test_cancel_leaves_nothing_and_stops_workers(tiles_dir, aoi, tmp_path):
    class CancelOnFirstTile(Reporter):
        def progress(self, stage, done, total, message=""):
            raise Cancelled("SIGTERM")

    before = set(threading.enumerate())  # other tests' abandoned workers may still be winding down

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "fetch-tile" and t not in before]

    with serve(tiles_dir) as url:
        with pytest.raises(Cancelled):
            run(url, tmp_path, aoi, zoom=21, workers=2, reporter=CancelOnFirstTile())
        assert all(t.daemon for t in workers())  # they cannot hold the process at exit
        deadline = time.monotonic() + 2
        while workers() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not workers()
        assert url.request_count < 12  # zoom 21 has 12 tiles: the rest were never asked for
    assert out_files(tmp_path) == []


# --- local rasters ------------------------------------------------------------------------------


def test_local_raster_is_cropped(osbs_tif, aoi, tmp_path):
    result = run(str(osbs_tif), tmp_path, aoi)
    assert result.summary["crs"] == OSBS_CRS and result.summary["gsd_m"] == pytest.approx(0.1)
    with rasterio.open(result.outputs["mosaic"]) as crop, rasterio.open(osbs_tif) as src:
        assert crop.crs == src.crs and crop.res == src.res and crop.nodata == src.nodata
        assert crop.bounds.left == pytest.approx(AOI_UTM[0], abs=0.5)
        assert crop.bounds.top == pytest.approx(AOI_UTM[3], abs=0.5)
        window = from_bounds(*crop.bounds, src.transform).round_offsets().round_lengths()
        assert np.array_equal(crop.read(), src.read(window=window))
    coarse = run(str(osbs_tif), tmp_path, aoi, name="coarse.tif", gsd=0.4)
    with rasterio.open(coarse.outputs["mosaic"]) as c:
        assert c.crs.to_epsg() == 32617 and c.res == pytest.approx((0.4, 0.4)) and 74 <= c.width <= 78


def test_local_raster_partly_outside_the_aoi_is_said(osbs_tif, tmp_path):
    """An AOI much larger than the raster: the mosaic holds the raster's part, and the log says how much."""
    import io

    out = io.StringIO()
    big = wgs84_aoi((404211.9 - 40, 3285102.9 - 40, 404251.9 + 40, 3285142.9 + 40))  # 120 m around the 40 m image
    result = run(str(osbs_tif), tmp_path, big, reporter=Reporter(json_mode=True, out=out))
    warnings = [e["message"] for e in map(json.loads, out.getvalue().splitlines()) if e.get("level") == "warning"]
    assert any("covers 1" in w and "of the AOI" in w for w in warnings), warnings  # about 11 %
    assert 0.08 < result.summary["aoi_covered"] < 0.14
    inside = run(str(osbs_tif), tmp_path, wgs84_aoi(AOI_UTM), name="inside.tif")
    assert inside.summary["aoi_covered"] == 1.0


def test_local_raster_outside_aoi(osbs_tif, tmp_path):
    with pytest.raises(EngineError) as err:
        run(str(osbs_tif), tmp_path, AOI(box(-82.5, 29.0, -82.4, 29.1)))
    assert err.value.code == "AOI_OUTSIDE_IMAGERY"
    assert "lon -81.99" in err.value.message and "lat 29.69" in err.value.message and err.value.hint
    assert out_files(tmp_path) == []


# --- the tile server as the demo runs it --------------------------------------------------------


def test_tile_server_script(osbs_tif):
    script = Path(__file__).resolve().parents[1] / "tile_server.py"
    proc = subprocess.Popen([sys.executable, str(script), str(osbs_tif), "--zooms", "20", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        template = proc.stdout.readline().strip()
        assert template.startswith("http://127.0.0.1:") and template.endswith("/{z}/{x}/{y}.png")
        tile = next(iter(tiles_covering(transform_bounds(OSBS_CRS, "EPSG:4326", *AOI_UTM), 20)))
        response = requests.get(template.format(z=20, x=tile.x, y=tile.y), timeout=10)
        assert response.status_code == 200 and decode_tile(response.content).shape == (4, 256, 256)
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# --- URL templates ------------------------------------------------------------------------------


def test_url_templates():
    assert quadkey(Tile(3, 5, 3)) == "213" and quadkey(Tile(0, 0, 0)) == ""  # Bing Maps' documented example
    tile = Tile(35, 10, 6)
    assert expand_template("http://h/{z}/{x}/{-y}.png", tile) == "http://h/6/35/53.png"  # 2**6 - 1 - 10
    assert expand_template("http://h/{q}.jpeg?g=1", Tile(3, 5, 3)) == "http://h/213.jpeg?g=1"
    hosts = {expand_template("http://{s}.h/{z}/{x}/{y}.png", Tile(x, 0, 3), "abc").split(".")[0] for x in range(3)}
    assert hosts == {"http://a", "http://b", "http://c"}
    assert template_tile_size("http://h/{z}/{x}/{y}@2x.png") == 512 and template_tile_size("http://h/{z}/{x}/{y}") == 256


def relayout(tiles_dir: Path, out: Path, z: int, name: Callable[[Tile], str]) -> Path:
    for png in (tiles_dir / str(z)).glob("*/*.png"):
        target = out / name(Tile(int(png.parent.name), int(png.stem), z))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
    return out


def test_tms_and_quadkey_templates(tiles_dir, aoi, tmp_path):
    """The same tiles laid out as TMS ({-y}) and by quadkey ({q}) give the same mosaic."""
    tms = relayout(tiles_dir, tmp_path / "tms", 20, lambda t: f"{t.z}/{t.x}/{2 ** t.z - 1 - t.y}.png")
    bing = relayout(tiles_dir, tmp_path / "bing", 20, lambda t: f"q/a{quadkey(t)}.png")
    with serve(tiles_dir) as url:
        xyz = run(url, tmp_path, aoi, name="xyz.tif", zoom=20)
    with serve(tms) as url:
        flipped = run(url.replace("{y}", "{-y}"), tmp_path, aoi, name="tms.tif", zoom=20)
    with serve(bing) as url:
        keyed = run(url.replace("{z}/{x}/{y}", "q/{s}{q}"), tmp_path, aoi, name="q.tif", zoom=20, subdomains="a")
    assert flipped.summary["downloaded"] == keyed.summary["downloaded"] == 4
    with rasterio.open(xyz.outputs["mosaic"]) as a:
        for other in (flipped, keyed):
            with rasterio.open(other.outputs["mosaic"]) as b:
                assert np.array_equal(a.read(), b.read()) and a.transform == b.transform


def test_512_px_tiles_are_georeferenced(osbs_tif, aoi, tmp_path):
    tiles = make_tiles(osbs_tif, tmp_path / "t512", "19", tile_size=512)
    for png in list(tiles.rglob("*.png")):
        png.rename(png.with_name(f"{png.stem}@2x.png"))
    with serve(tiles) as url:
        result = run(url.replace("{y}.png", "{y}@2x.png"), tmp_path, aoi, gsd=0.1)
    assert result.summary["zoom"] == 19 and result.summary["downloaded"] > 0  # 512 px at z19 = 256 px at z20
    for rows, cols in ((slice(20, 100), slice(20, 100)), (slice(150, 250), slice(60, 140))):
        aligned = block_diff(Path(result.outputs["mosaic"]), osbs_tif, rows, cols)
        assert aligned < 12 and block_diff(Path(result.outputs["mosaic"]), osbs_tif, rows, cols, (5, 0)) > 2 * aligned


# --- caps, politeness, faults -------------------------------------------------------------------


def test_caps_refuse_with_a_way_forward(aoi, tmp_path):
    url = "http://127.0.0.1:9/{z}/{x}/{y}.png"  # never contacted
    with pytest.raises(EngineError) as err:
        run(url, tmp_path, aoi, zoom=21, max_tiles=5)
    assert err.value.code == "TOO_MANY_TILES" and "9 tiles" in err.value.message
    assert "--max-tiles 9" in err.value.hint and "--zoom" in err.value.hint and "smaller area" in err.value.hint
    with pytest.raises(EngineError) as err:
        run(url, tmp_path, aoi, zoom=21, max_bytes=100_000)
    assert err.value.code == "TOO_MANY_BYTES" and "--max-bytes" in err.value.hint
    assert out_files(tmp_path) == []


def test_retry_after_is_honoured(tiles_dir, aoi, tmp_path):
    with serve(tiles_dir, fail=Fail(status=429, first=1, retry_after=1)) as url:
        result = run(url, tmp_path, aoi, zoom=20)
    assert result.summary["retried"] == 4 and result.summary["requested"] == 8
    for path, times in url.times.items():
        assert len(times) == 2 and times[1] - times[0] >= 0.95, path  # waited as asked, not the short back-off


def test_fault_mix_gives_the_clean_mosaic(tiles_dir, aoi, tmp_path):
    """500s, 429s with Retry-After and truncated bodies: every tile ends up right, none bad is cached."""
    chaos = Chaos(p500=0.3, p429=0.1, ptruncate=0.2, retry_after=0)
    with serve(tiles_dir) as url:
        clean = run(url, tmp_path, aoi, name="clean.tif", zoom=21, cache_dir=tmp_path / "c1")
    with serve(tiles_dir, fail=chaos) as url:
        flaky = run(url, tmp_path, aoi, name="flaky.tif", zoom=21, cache_dir=tmp_path / "c2", workers=8)
        faults = sum(chaos.pick(path, n) is not None for path, count in url.requests.items()
                     for n in range(1, count + 1))
    s = flaky.summary
    assert faults > 0 and s["retried"] == faults and s["requested"] == url.request_count
    assert (s["downloaded"], s["failed"]) == (9, 0)
    for tile in (tmp_path / "c2").rglob("*.tile"):
        decode_tile(tile.read_bytes())
    with rasterio.open(clean.outputs["mosaic"]) as a, rasterio.open(flaky.outputs["mosaic"]) as b:
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.dataset_mask(), b.dataset_mask())


# --- windowed writing, cache, resume ------------------------------------------------------------


def test_windows_stitch_seamlessly(tiles_dir, aoi, tmp_path, monkeypatch):
    with serve(tiles_dir) as url:
        whole = run(url, tmp_path, aoi, name="whole.tif", gsd=0.1, cache_dir=tmp_path / "c1")
        monkeypatch.setattr(mosaic, "WINDOW", 96)  # 16 windows over the 300-odd px output
        windowed = run(url, tmp_path, aoi, name="windowed.tif", gsd=0.1, cache_dir=tmp_path / "c2")
    with rasterio.open(whole.outputs["mosaic"]) as a, rasterio.open(windowed.outputs["mosaic"]) as b:
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.dataset_mask(), b.dataset_mask())


def test_warping_during_the_download_changes_nothing(tiles_dir, aoi, tmp_path, monkeypatch):
    """Windows warped as soon as their tile rows are in (overlapping the download) give the
    same mosaic as warping everything after the download: no window reads a piece row
    that may still be missing. Each window is warped at the earliest moment allowed."""
    from landcover_plugin.engine.imagery.download import ProgressiveWarp

    monkeypatch.setattr(mosaic, "WINDOW", 256)  # 16 windows of 256 x 64 px over 3 rows of tiles
    early = []
    piece_done, warp_one = ProgressiveWarp.piece_done, ProgressiveWarp._warp

    def eager(self, row):
        piece_done(self, row)
        while self.step():  # every window that is ready, at once
            pass

    monkeypatch.setattr(ProgressiveWarp, "piece_done", eager)
    monkeypatch.setattr(ProgressiveWarp, "_warp",
                        lambda self, window: (early.append(sum(self.pending) > 0), warp_one(self, window))[1])
    with serve(tiles_dir) as url:
        during = run(url, tmp_path, aoi, name="during.tif", zoom=21, workers=1, cache_dir=tmp_path / "c1")
        assert sum(early) >= 4  # windows were warped while tiles were still to come
        monkeypatch.setattr(ProgressiveWarp, "piece_done", piece_done)
        monkeypatch.setattr(ProgressiveWarp, "step", lambda self: False)
        after = run(url, tmp_path, aoi, name="after.tif", zoom=21, workers=1, cache_dir=tmp_path / "c2")
    with rasterio.open(during.outputs["mosaic"]) as a, rasterio.open(after.outputs["mosaic"]) as b:
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.dataset_mask(), b.dataset_mask())
        assert a.dataset_mask().mean() > 200  # imagery nearly everywhere, not an empty match


def test_same_tiles_reuse_the_finished_mosaic(tiles_dir, aoi, tmp_path):
    """A rerun over unchanged cached tiles links the mosaic made before instead of warping
    again; a changed tile, another AOI or resolution warps anew."""
    def fetched(name: str, **kw) -> tuple[Path, bool]:
        log = tmp_path / f"{name}.jsonl"
        with open(log, "w") as out:
            result = run(url, tmp_path, kw.pop("aoi", aoi), name=name, reporter=Reporter(json_mode=True, out=out), **kw)
        return Path(result.outputs["mosaic"]), "reused" in log.read_text()

    with serve(tiles_dir) as url:
        first, reused_first = fetched("a.tif", zoom=21)
        second, reused_second = fetched("b.tif", zoom=21)
        assert (reused_first, reused_second) == (False, True) and url.request_count == 9
        tile = next((tmp_path / "cache").rglob("*.tile"))
        tile.write_bytes(tile.read_bytes())  # a tile downloaded again since: the mosaic may differ
        _, reused_changed = fetched("c.tif", zoom=21)
        _, reused_gsd = fetched("d.tif", zoom=21, gsd=0.1)
        _, reused_aoi = fetched("e.tif", zoom=21, aoi=wgs84_aoi((404218.9, 3285107.9, 404246.9, 3285137.9)))
    assert not (reused_changed or reused_gsd or reused_aoi)
    with rasterio.open(first) as a, rasterio.open(second) as b, rasterio.open(tmp_path / "out" / "c.tif") as c:
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.read(), c.read())
        assert a.profile == b.profile and np.array_equal(a.dataset_mask(), b.dataset_mask())
    first.unlink()  # the outputs are independent files for the user
    assert rasterio.open(second).read().any()


def test_cache_expiry_and_offline_use(tiles_dir, aoi, tmp_path):
    with serve(tiles_dir) as url:
        run(url, tmp_path, aoi, name="a.tif", zoom=20)
        old = time.time() - 40 * 86400
        for tile in (tmp_path / "cache").rglob("*.tile"):
            os.utime(tile, (old, old))
        again = run(url, tmp_path, aoi, name="b.tif", zoom=20, cache_days=30)
        assert again.summary["downloaded"] == 4 and url.request_count == 8
        for tile in (tmp_path / "cache").rglob("*.tile"):
            os.utime(tile, (old, old))
        template = str(url)
    # The server is gone (offline): expired tiles still serve.
    offline = run(template, tmp_path, aoi, name="c.tif", zoom=20, cache_days=30)
    assert offline.summary["from_cache"] == 4


def landcover(*args: str) -> list[str]:
    return [sys.executable, "-m", "landcover_plugin.engine", "--json", "fetch", *args]


def test_two_runs_at_once_share_the_cache(tiles_dir, aoi, tmp_path):
    bounds = ",".join(f"{v:.9f}" for v in aoi.bounds)
    with serve(tiles_dir, latency=0.05) as url:
        procs = [subprocess.Popen(landcover("--aoi", bounds, "--source", url, "--zoom", "21", "--workers", "3",
                                            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / f"{i}.tif")),
                                  stdout=subprocess.PIPE, text=True) for i in range(2)]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outputs:  # the run report: a result event and a summary line
        events = [json.loads(line) for line in out.splitlines()]
        summary = events[-1]["summary"]
        assert events[-1]["event"] == "result" and summary["tiles"] == 9
        assert {"requested", "from_cache", "retried", "failed", "bytes", "seconds"} <= set(summary)
        assert any(e["event"] == "log" and "9 tiles" in e["message"] and "from cache" in e["message"]
                   for e in events)
    cached = list((tmp_path / "cache").rglob("*.tile"))
    assert len(cached) == 9 and not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".part")]
    for tile in cached:
        decode_tile(tile.read_bytes())
    with rasterio.open(tmp_path / "0.tif") as a, rasterio.open(tmp_path / "1.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_resume_after_kill(tiles_dir, aoi, tmp_path):
    bounds = ",".join(f"{v:.9f}" for v in aoi.bounds)
    with serve(tiles_dir, latency=0.2) as url:
        proc = subprocess.Popen(landcover("--aoi", bounds, "--source", url, "--zoom", "21", "--workers", "1",
                                          "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "m.tif")),
                                stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(list((tmp_path / "cache").rglob("*.tile"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        kept = {p for p in (tmp_path / "cache").rglob("*.tile")}
        before = dict(url.requests)
        resumed = run(url, tmp_path, aoi, zoom=21)
    assert 4 <= len(kept) < 9 and not (tmp_path / "m.tif").exists()
    assert resumed.summary["from_cache"] >= len(kept) and resumed.summary["failed"] == 0
    asked_again = [p for p, n in url.requests.items() if n > before.get(p, 0) and before.get(p, 0)]
    assert len(asked_again) <= 1  # at most the tile in flight when killed


def test_mbtiles_for_offline_use(tiles_dir, aoi, tmp_path):
    with serve(tiles_dir) as url:
        result = run(url, tmp_path, aoi, zoom=20, mbtiles=tmp_path / "out" / "tiles.mbtiles")
    path = Path(result.outputs["mbtiles"])
    with sqlite3.connect(path) as db:
        meta = dict(db.execute("SELECT name, value FROM metadata"))
        rows = db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles").fetchall()
    assert meta["format"] == "png" and meta["minzoom"] == meta["maxzoom"] == "20"
    expected = set(tiles_covering(aoi.bounds, 20))
    assert {Tile(x, 2 ** z - 1 - row, z) for z, x, row, _ in rows} == expected  # TMS rows
    for z, x, row, data in rows:
        assert data == (tiles_dir / str(z) / str(x) / f"{2 ** z - 1 - row}.png").read_bytes()
    with rasterio.open(path) as mb:  # GDAL's (and QGIS's) MBTiles driver reads it, in place
        west, south, east, north = transform_bounds(mb.crs, "EPSG:4326", *mb.bounds)
        lon, lat = (aoi.bounds[0] + aoi.bounds[2]) / 2, (aoi.bounds[1] + aoi.bounds[3]) / 2
        assert west < lon < east and south < lat < north


# --- WMS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version,crs,in_url", [("1.3.0", "EPSG:4326", False), ("1.1.1", "EPSG:4326", False),
                                                ("1.3.0", "EPSG:3857", False), ("1.3.0", "EPSG:32617", False),
                                                ("1.3.0", "EPSG:4326", True)])
def test_wms_getmap(osbs_tif, aoi, tmp_path, version, crs, in_url):
    served = tmp_path / "served.tif"  # without OSBS's nodata 255, so that the WMS image is opaque
    with rasterio.open(osbs_tif) as src, rasterio.open(served, "w", **{**src.profile, "nodata": None}) as dst:
        dst.write(src.read())
    with serve(wms=served) as url:
        if in_url:  # as the plugin passes a QGIS WMS layer: its CRS in the URL
            result = run(f"{url}&VERSION={version}&LAYERS=ortho&CRS={crs}", tmp_path, aoi, gsd=0.1)
        else:
            result = run(f"{url}&VERSION={version}&LAYERS=ortho", tmp_path, aoi, gsd=0.1, wms_crs=crs)
        query = next(iter(url.requests))
    assert ("CRS=" if version == "1.3.0" else "SRS=") + crs.replace(":", "%3A") in query
    assert result.summary["crs"] == OSBS_CRS and result.summary["downloaded"] >= 1
    mosaic = Path(result.outputs["mosaic"])
    for rows, cols in ((slice(20, 100), slice(20, 100)), (slice(150, 250), slice(60, 140))):
        aligned = block_diff(mosaic, osbs_tif, rows, cols)
        assert aligned < 12 and block_diff(mosaic, osbs_tif, rows, cols, (5, 0)) > 2 * aligned


def test_wms_needs_layers_and_gsd(aoi, tmp_path):
    for source, kw, code in (("http://127.0.0.1:9/wms?SERVICE=WMS", {"gsd": 0.1}, "BAD_SOURCE"),
                             ("http://127.0.0.1:9/wms?SERVICE=WMS&LAYERS=a", {}, "NEED_GSD")):
        with pytest.raises(EngineError) as err:
            run(source, tmp_path, aoi, **kw)
        assert err.value.code == code and err.value.hint


# --- local rasters of any CRS, band count and type ----------------------------------------------


def test_local_geographic_raster_is_warped_to_utm(osbs_tif, aoi, tmp_path):
    geo = tmp_path / "geo.tif"
    with rasterio.open(osbs_tif) as src, WarpedVRT(src, crs="EPSG:4326") as vrt:
        profile = {**vrt.profile, "driver": "GTiff"}
        with rasterio.open(geo, "w", **profile) as dst:
            dst.write(vrt.read())
    result = run(str(geo), tmp_path, aoi)
    assert result.summary["crs"] == OSBS_CRS and result.summary["gsd_m"] == pytest.approx(0.1, rel=0.15)
    with rasterio.open(result.outputs["mosaic"]) as m:
        assert m.crs.to_epsg() == 32617 and m.count == 3
    coarse = run(str(geo), tmp_path, aoi, name="coarse.tif", gsd=0.4)
    mosaic = Path(coarse.outputs["mosaic"])
    with rasterio.open(mosaic) as m, rasterio.open(osbs_tif) as src:
        assert m.res == pytest.approx((0.4, 0.4)) and m.crs.to_epsg() == 32617
        a = m.read(window=rasterio.windows.Window(10, 10, 50, 50)).astype(float)
        bounds = rasterio.windows.bounds(rasterio.windows.Window(10, 10, 50, 50), m.transform)
        b = src.read(out_shape=(3, 50, 50), window=from_bounds(*bounds, src.transform),
                     resampling=rasterio.enums.Resampling.average).astype(float)
        assert np.abs(a - b).mean() < 12  # the same place on the ground


def test_local_four_band_uint16_with_nir(osbs_tif, aoi, tmp_path, monkeypatch):
    """A 4-band 16-bit raster (RGB + NIR) keeps its bands and type, read in windows."""
    four = tmp_path / "rgbn.tif"
    with rasterio.open(osbs_tif) as src:
        rgb = src.read().astype(np.uint16) * 200
        nir = (np.arange(src.width, dtype=np.uint16)[None, :] * 100).repeat(src.height, 0)[None]
        profile = {**src.profile, "count": 4, "dtype": "uint16", "nodata": 0, "tiled": True, "blockxsize": 128,
                   "blockysize": 128}
        profile.pop("photometric", None)
        with rasterio.open(four, "w", **profile) as dst:
            dst.write(np.concatenate([rgb, nir]))
    monkeypatch.setattr(mosaic, "WINDOW", 64)
    result = run(str(four), tmp_path, aoi)
    with rasterio.open(result.outputs["mosaic"]) as crop, rasterio.open(four) as src:
        assert crop.count == 4 and crop.dtypes == ("uint16",) * 4 and crop.nodata == 0 and crop.crs == src.crs
        window = from_bounds(*crop.bounds, src.transform).round_offsets().round_lengths()
        assert np.array_equal(crop.read(), src.read(window=window))
    warped = run(str(four), tmp_path, aoi, name="warped.tif", gsd=0.2)
    with rasterio.open(warped.outputs["mosaic"]) as w:
        assert w.count == 4 and w.dtypes[3] == "uint16" and w.res == pytest.approx((0.2, 0.2))
        nir_band = w.read(4).astype(float)
        assert (np.diff(nir_band[5], axis=0) > 0).mean() > 0.9  # NIR still grows eastwards


def test_credentials_from_the_environment(tiles_dir, aoi, tmp_path, monkeypatch):
    """How the plugin hands over QGIS's credentials: the environment, never the command line or a log."""
    monkeypatch.setenv("LANDCOVER_HTTP_HEADERS", '{"Authorization": "Basic ZmllbGQ6czNjcmV0"}')
    log = tmp_path / "events.jsonl"
    with serve(tiles_dir) as url, open(log, "w") as out:
        run(url, tmp_path, aoi, zoom=20, headers={"Referer": "https://example.org/"},
            reporter=Reporter(json_mode=True, out=out))
    assert all(h["Authorization"] == "Basic ZmllbGQ6czNjcmV0" and h["Referer"] == "https://example.org/"
               and h["User-Agent"].startswith("landcover-plugin/") for h in url.headers)
    assert len(url.headers) == 4 and "ZmllbGQ6czNjcmV0" not in log.read_text()
    monkeypatch.setenv("LANDCOVER_HTTP_HEADERS", "not json")
    with pytest.raises(EngineError) as err:
        run("http://127.0.0.1:9/{z}/{x}/{y}.png", tmp_path, aoi, zoom=20, cache_dir=tmp_path / "empty")
    assert err.value.code == "BAD_HEADERS"


def test_credentials_go_only_to_their_host(tiles_dir, aoi, tmp_path, monkeypatch):
    """A 302 to another host (127.0.0.1 -> localhost) carries none of the user's headers, whether
    from LANDCOVER_HTTP_HEADERS or given with the source (--header, a pipeline's imagery.headers):
    requests itself strips only Authorization. A redirect within the host keeps them."""
    monkeypatch.setenv("LANDCOVER_HTTP_HEADERS", '{"X-Api-Key": "env-s3cret", "Authorization": "Bearer t0ken"}')
    given = {"X-Other-Key": "param-s3cret", "Referer": "https://example.org/"}
    user_headers = {"X-Api-Key", "Authorization", "X-Other-Key", "Referer"}
    with serve(tiles_dir) as target:
        elsewhere = target.replace("127.0.0.1", "localhost").split("/{z}")[0]
        with serve(tiles_dir, moved=elsewhere) as redirecting:
            result = run(redirecting, tmp_path, aoi, zoom=20, headers=given)
    assert result.summary["downloaded"] == 4 and len(target.headers) == 4
    assert all(user_headers <= set(h) for h in redirecting.headers)  # sent where they were given
    assert not any(user_headers & set(h) for h in target.headers)
    assert all(h["User-Agent"].startswith("landcover-plugin/") for h in target.headers)
    with serve(tiles_dir, moved="") as same_host:
        run(same_host, tmp_path, aoi, zoom=20, headers=given, cache_dir=tmp_path / "c2")
    assert len(same_host.headers) == 8 and all(user_headers <= set(h) for h in same_host.headers)


@pytest.mark.parametrize("where", ["param", "env", "cli"])
@pytest.mark.parametrize("name,value,problem", [
    ("X-Key", "s3cr\net", "line break"), ("X-Key", "s3cr\ret", "line break"), ("X-Key", "s3cr\x00et", "control"),
    ("X-Key", "s3cr€t", "cannot carry"), ("X Key", "s3cret", "not a valid"), ("X-Key\n", "s3cret", "not a valid")])
def test_bad_header_is_refused_up_front_without_its_value(aoi, tmp_path, monkeypatch, capsys, where, name, value,
                                                          problem):
    """A header a request cannot carry (a line break would end its head early) was reported as a
    server failure, or crashed: it is refused before any request, naming the header, never its value."""
    url = "http://127.0.0.1:9/{z}/{x}/{y}.png"  # never contacted
    if where == "cli":
        if name.strip() != name:
            pytest.skip("the command line strips names")
        bounds = ",".join(f"{v:.9f}" for v in aoi.bounds)
        from landcover_plugin.engine.cli import main

        code = main(["--json", "fetch", "--aoi", bounds, "--source", url, "--zoom", "20", "--header",
                     f"{name}:{value}", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "m.tif")])
        out = capsys.readouterr().out
        error = json.loads(out.splitlines()[-1])
        assert code == 2 and error["code"] == "BAD_HEADERS" and "s3cr" not in out
        message, hint = error["message"], error["hint"]
    else:
        if where == "env":
            monkeypatch.setenv("LANDCOVER_HTTP_HEADERS", json.dumps({name: value}))
        with pytest.raises(EngineError) as err:
            run(url, tmp_path, aoi, zoom=20, headers={name: value} if where == "param" else {})
        assert err.value.code == "BAD_HEADERS"
        message, hint = err.value.message, err.value.hint
    assert name.strip() in message and problem in message and hint
    assert "s3cr" not in message + hint
    assert out_files(tmp_path) == []


def test_header_values_lose_surrounding_blanks(tiles_dir, aoi, tmp_path, monkeypatch):
    """Blanks around a value are not part of it in HTTP (the command line strips them already);
    from the environment or a pipeline they made every request fail."""
    monkeypatch.setenv("LANDCOVER_HTTP_HEADERS", '{"X-Api-Key": "  k3y "}')
    with serve(tiles_dir) as url:
        run(url, tmp_path, aoi, zoom=20, headers={"X-Other": "\tv "})
    assert all(h["X-Api-Key"] == "k3y" and h["X-Other"] == "v" for h in url.headers) and len(url.headers) == 4


def test_header_without_a_colon_on_the_command_line(aoi, tmp_path, capsys):
    from landcover_plugin.engine.cli import main

    bounds = ",".join(f"{v:.9f}" for v in aoi.bounds)
    code = main(["--json", "fetch", "--aoi", bounds, "--source", "http://127.0.0.1:9/{z}/{x}/{y}.png", "--zoom",
                 "20", "--header", "s3cret", "--out", str(tmp_path / "m.tif")])
    out = capsys.readouterr().out
    assert code == 2 and json.loads(out.splitlines()[-1])["code"] == "BAD_HEADERS" and "s3cret" not in out


# --- resolution against the model's -----------------------------------------------------------


def warnings_of(events: list[dict]) -> list[str]:
    return [e["message"] for e in events if e["event"] == "log" and e.get("level") == "warning"]


def test_model_resolution_is_reported_and_checked(tiles_dir, aoi, osbs_tif, tmp_path):
    """`fetch --model M`: the tiles' ground resolution at the AOI's latitude is reported and
    compared with the model's (trees-base: 0.1 m/px); more than 25% off warns, saying what to do."""
    bounds = ",".join(f"{v:.9f}" for v in aoi.bounds)
    with serve(tiles_dir) as url:
        out = subprocess.run(landcover("--aoi", bounds, "--source", url, "--zoom", "19", "--model", "trees-base",
                                       "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "z19.tif")),
                             capture_output=True, text=True, timeout=120).stdout
        events = [json.loads(line) for line in out.splitlines()]
        assert events[-1]["event"] == "result" and events[-1]["summary"]["native_gsd_m"] == pytest.approx(0.26, abs=0.01)
        warned, = warnings_of(events)
        assert "0.259 m/px at the AOI, +159%" in warned and "0.1 m/px the model expects" in warned
        assert "nearest zoom to the model's resolution is 20" in warned

        # No zoom or gsd: the model's resolution is the output's; zoom 20 is the nearest (0.13 m, +30%).
        log = tmp_path / "default.jsonl"
        with open(log, "w") as stream:
            result = run(url, tmp_path, aoi, name="default.tif", model_gsd=0.1,
                         reporter=Reporter(json_mode=True, out=stream))
        assert (result.summary["zoom"], result.summary["gsd_m"]) == (20, 0.1)
        warned, = warnings_of([json.loads(line) for line in log.read_text().splitlines()])
        assert "+30% from the 0.1 m/px the model expects" in warned
    # A local raster at the model's resolution: no warning.
    log = tmp_path / "local.jsonl"
    with open(log, "w") as stream:
        local = run(str(osbs_tif), tmp_path, aoi, name="local.tif", model_gsd=0.1, reporter=Reporter(json_mode=True, out=stream))
    assert local.summary["native_gsd_m"] == pytest.approx(0.1)
    assert not warnings_of([json.loads(line) for line in log.read_text().splitlines()])


def test_pipeline_fetch_checks_the_models_resolution(tiles_dir, aoi, tmp_path):
    """`landcover run` with a model: its fetch stage takes the model's resolution and warns like `fetch --model`."""
    from landcover_plugin.contract.names import MODELS_DIR
    from landcover_plugin.engine.stages.pipeline import load_pipeline, run_pipeline

    log = tmp_path / "run.jsonl"
    with serve(tiles_dir) as url:
        (tmp_path / "p.yaml").write_text(f"task: trees\nimagery: '{url}'\naoi: '{','.join(map(str, aoi.bounds))}'\n"
                                         f"model: {MODELS_DIR / 'trees-base'}\nout: trees.gpkg\n")
        with open(log, "w") as stream:
            result = run_pipeline(load_pipeline(tmp_path / "p.yaml"), Reporter(json_mode=True, out=stream))
    assert (result.summary["fetch"]["zoom"], result.summary["fetch"]["gsd_m"]) == (20, 0.1)
    warned = warnings_of([json.loads(line) for line in log.read_text().splitlines()])
    assert any("+30% from the 0.1 m/px the model expects" in w for w in warned)
