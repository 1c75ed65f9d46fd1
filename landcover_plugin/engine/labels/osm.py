"""OpenStreetMap features for a preset: from a local file or the Overpass API.

Local `.osm`, `.osm.bz2` and `.osm.pbf` files are read with pyosmium, which
assembles multipolygon relations into areas. Overpass answers (OSM JSON) are
written as an .osm file in the cache and read the same way, so both sources
share one parser and one multipolygon assembly.
"""
from __future__ import annotations

import hashlib
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from shapely import wkb
from shapely.geometry.base import BaseGeometry

from ...contract.names import OSM_SUFFIXES
from ..atomic import atomic_output
from ..errors import EngineError
from ..imagery.http_client import retry_after
from ..imagery.tile_cache import user_cache_dir
from .presets import ANY, Preset

RETRY_STATUS = (429, 502, 503, 504)  # Overpass: rate limited, busy, gateway timeout


@dataclass
class OsmFeature:
    osm_id: str  # "n123", "w45", "r6" (areas from relations keep the relation's id)
    class_name: str
    priority: int
    buffer: float | None
    geometry: BaseGeometry  # WGS84 lon/lat


@dataclass
class OsmRead:
    features: list[OsmFeature] = field(default_factory=list)
    invalid: int = 0  # geometries osmium could not build (broken rings, missing nodes)


def read_osm_file(path: Path, preset: Preset) -> OsmRead:
    """The features of `path` matching `preset`, classified, in WGS84."""
    import osmium

    path = Path(path)
    if not path.is_file():
        raise EngineError("OSM_FILE_NOT_FOUND", f"OSM file {path} does not exist.",
                          "Give an .osm, .osm.bz2 or .osm.pbf file.")
    if not path.name.lower().endswith(OSM_SUFFIXES):
        raise EngineError("BAD_OSM_FILE", f"{path.name} is not an OSM file (.osm, .osm.bz2, .osm.pbf).",
                          "Export OSM data as .osm or .osm.pbf (e.g. from Geofabrik or the Overpass API).")
    factory = osmium.geom.WKBFactory()
    out = OsmRead()

    def add(kind: str, obj, linear: bool, make: Callable) -> None:
        if not len(obj.tags):
            return
        rule = preset.classify({t.k: t.v for t in obj.tags}, linear)
        if rule is None:
            return
        try:
            geom = wkb.loads(make(obj), hex=True)
        except (RuntimeError, osmium.InvalidLocationError):
            out.invalid += 1
            return
        out.features.append(OsmFeature(f"{kind}{obj.id}", rule.class_name, rule.priority, rule.buffer, geom))

    class Handler(osmium.SimpleHandler):
        def node(self, n):
            add("n", n, True, factory.create_point)

        def way(self, w):
            add("w", w, True, factory.create_linestring)

        def area(self, a):
            add("w" if a.from_way() else "r", _AreaId(a), False, lambda _: factory.create_multipolygon(a))

    try:
        Handler().apply_file(str(path), locations=True)
    except RuntimeError as exc:
        raise EngineError("BAD_OSM_FILE", f"Cannot read OSM file {path.name}: {exc}",
                          "Check that the file is complete (not truncated) OSM XML or PBF.") from None
    return out


class _AreaId:
    """An area seen with its original way/relation id (osmium numbers areas 2*id(+1))."""

    def __init__(self, area) -> None:
        self.tags, self.id = area.tags, area.orig_id()


# --- Overpass ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OverpassParams:
    url: str
    bbox: tuple[float, float, float, float]  # WGS84 west, south, east, north
    timeout_s: int = 180  # server-side [timeout:], also bounds the HTTP wait
    maxsize: int = 512 * 1024 * 1024  # server-side [maxsize:] in bytes
    date: str | None = None  # "YYYY-MM-DD" or ISO time: OSM as it was then ([date:])
    cache_dir: Path | None = None
    retries: int = 4
    backoff_s: float = 2.0  # first wait; doubles each retry
    http_timeout_s: float | None = None  # seconds without a byte before giving up; None: timeout_s + 30


def default_cache_dir() -> Path:
    return user_cache_dir("overpass")


def overpass_date(date: str) -> str:
    """Overpass wants a full UTC timestamp: 2020-06-01 -> 2020-06-01T00:00:00Z."""
    from datetime import datetime

    try:
        parsed = datetime.fromisoformat(date.replace("Z", "+00:00"))
    except ValueError:
        raise EngineError("BAD_DATE", f"Date '{date}' is not an ISO date.",
                          "Give e.g. --date 2020-06-01 (the imagery's date).") from None
    return parsed.strftime("%Y-%m-%dT%H:%M:%SZ")


def _filter(tags: dict[str, tuple[str, ...]]) -> str:
    parts = []
    for key, values in sorted(tags.items()):
        if values == (ANY,):
            parts.append(f'["{key}"]')
        else:
            parts.append(f'["{key}"~"^({"|".join(values)})$"]')
    return "".join(parts)


def overpass_query(preset: Preset, params: OverpassParams) -> str:
    """Overpass QL for every rule of the preset in the bbox; limits in the header;
    `(._;>;)` adds the ways' nodes and the relations' members for the geometry."""
    west, south, east, north = params.bbox
    header = f"[out:json][timeout:{params.timeout_s}][maxsize:{params.maxsize}]"
    header += f"[bbox:{south},{west},{north},{east}]"
    if params.date:
        header += f'[date:"{overpass_date(params.date)}"]'
    statements = sorted({f"{'nw' if r.buffer is not None else 'wr'}{_filter(r.tags)};" for r in preset.rules})
    return header + ";\n(\n" + "\n".join(f"  {s}" for s in statements) + "\n);\n(._;>;);\nout body;\n"


def fetch_overpass(preset: Preset, params: OverpassParams, log: Callable[[str], None]) -> Path:
    """Run the preset's query (or take it from the cache); return an .osm file of the answer."""
    import requests

    query = overpass_query(preset, params)
    cache = Path(params.cache_dir or default_cache_dir())
    key = hashlib.sha256(f"{params.url}\n{query}".encode()).hexdigest()[:32]
    osm_path = cache / f"{key}.osm"
    if osm_path.is_file() and has_elements(osm_path):  # an empty answer is never taken from the cache
        log(f"Overpass: answer from the cache ({osm_path})")
        return osm_path
    wait = params.backoff_s
    # The server stops the query after [timeout:]; past that (plus the transfer) it is stuck or overloaded.
    http_timeout = params.http_timeout_s or params.timeout_s + 30
    for attempt in range(params.retries + 1):
        timed_out = False
        try:
            response = requests.post(params.url, data={"data": query}, timeout=http_timeout,
                                     headers={"User-Agent": "landcover-plugin/0.1"})
        except requests.ConnectTimeout:  # before Timeout: no connection at all is not a busy server
            raise _unreachable(params.url, "the connection timed out") from None
        except requests.Timeout:
            problem, timed_out = f"no answer within {http_timeout:g} s", True
        except requests.ConnectionError as exc:
            raise _unreachable(params.url, connection_problem(exc)) from None
        else:
            if response.status_code == 200:
                document = _json_answer(response, params.url)
                break
            if response.status_code not in RETRY_STATUS:
                raise EngineError("OVERPASS_ERROR",
                                  f"Overpass API answered HTTP {response.status_code}: {_remark(response.text)}",
                                  "Check the URL (it ends in /api/interpreter) and the preset's tags.")
            problem = f"HTTP {response.status_code} ({'too many requests' if response.status_code == 429 else 'busy or timed out'})"
            wait = max(wait, min(retry_after(response) or 0.0, 120.0))
        if attempt == params.retries and timed_out:
            raise EngineError("OVERPASS_TIMEOUT",
                              f"Overpass API at {params.url} gave no answer within {http_timeout:g} s, "
                              f"{params.retries + 1} times: the server is overloaded or the query too large.",
                              "Use a smaller area, another Overpass server (--overpass URL, e.g. "
                              "https://overpass.kumi.systems/api/interpreter), or a local OSM extract "
                              "(--osm-file area.osm.pbf, e.g. from download.geofabrik.de).")
        if attempt == params.retries:
            raise EngineError("OVERPASS_BUSY",
                              f"Overpass API at {params.url} failed {params.retries + 1} times; last: {problem}.",
                              "Try again later, use a smaller area, another Overpass server (--overpass URL), "
                              "or a local OSM file (--osm-file).")
        log(f"Overpass: {problem}; retrying in {wait:.0f} s")
        time.sleep(wait)
        wait *= 2
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output(osm_path) as tmp:
            write_osm_xml(document, tmp)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # elements that are not OSM JSON
        raise _malformed(params.url, f"{type(exc).__name__}: {exc}"[:200]) from None
    if not document["elements"]:
        # An overloaded server or one still loading its data may answer nothing: written for this
        # run only (the lookup above skips it), so that the next run asks again.
        log("Overpass: the answer holds no elements; not cached (asked again next time)")
        return osm_path
    (cache / f"{key}.query").write_text(f"{params.url}\n{query}")
    return osm_path


def has_elements(osm_path: Path) -> bool:
    """Whether an .osm file written by write_osm_xml holds any element (they follow the root tag)."""
    with open(osm_path, "rb") as f:
        return re.search(rb"<(node|way|relation)\b", f.read(4096)) is not None


def connection_problem(exc: BaseException) -> str:
    """Why a connection failed, in a user's words: the cause is buried in requests' and
    urllib3's wrappers (`HTTPSConnectionPool(...): Max retries exceeded ... NameResolutionError`)."""
    import socket

    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
            return "the name does not resolve"
        if isinstance(e, ConnectionRefusedError):
            return "the connection was refused"
        if isinstance(e, TimeoutError) or type(e).__name__ == "ConnectTimeoutError":
            return "the connection timed out"
        todo += [c for c in (e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ()))
                 if isinstance(c, BaseException)]
    return "the connection failed"


def _unreachable(url: str, why: str) -> EngineError:
    host = urlsplit(url).hostname or url
    return EngineError("OVERPASS_UNREACHABLE", f"Cannot reach the Overpass server {host}: {why}.",
                       "Check the network connection, or choose another Overpass server or a local OSM file.")


def _malformed(url: str, what: str) -> EngineError:
    return EngineError("OVERPASS_ERROR", f"Overpass API at {url} sent a malformed answer ({what}): not the OSM "
                       "JSON of an Overpass interpreter.", "Try again later (a busy server or a proxy may cut or "
                       "replace answers), another Overpass server (--overpass URL), or a local OSM file (--osm-file).")


def _remark(text: str) -> str:
    """The useful line of an Overpass error page (HTML with <strong>Error</strong>: ...)."""
    import re

    found = re.findall(r"<strong[^>]*>Error</strong>:?(.*?)</p>", text, flags=re.S)
    return (found[0] if found else text[:200]).strip()


def _json_answer(response, url: str) -> dict:
    try:
        document = response.json()
    except ValueError:
        raise EngineError("OVERPASS_ERROR", f"Overpass API at {url} did not answer JSON: {response.text[:200]}",
                          "Check the URL: it is an Overpass interpreter endpoint, e.g. "
                          "https://overpass-api.de/api/interpreter.") from None
    if not isinstance(document, dict) or not isinstance(document.get("elements"), list):
        raise _malformed(url, "not an object with a list of elements")
    remark = document.get("remark", "")
    if not isinstance(remark, str):
        raise _malformed(url, "its remark is not text")
    if "error" in remark.lower():  # e.g. "runtime error: Query timed out" with HTTP 200
        raise EngineError("OVERPASS_ERROR", f"Overpass API: {remark}",
                          "Use a smaller area or raise --overpass-timeout / --overpass-maxsize.")
    return document


def write_osm_xml(document: dict, path: Path) -> None:
    """OSM JSON (Overpass `out body`) -> OSM XML, nodes before ways before relations (osmium needs that).
    KeyError, TypeError, ValueError or AttributeError when an element is not OSM JSON: ids and
    coordinates are written as numbers only, so a broken answer never becomes a broken .osm file."""
    root = ET.Element("osm", {"version": "0.6", "generator": "landcover (from Overpass JSON)"})
    order = {"node": 0, "way": 1, "relation": 2}
    elements = sorted((e for e in document.get("elements", []) if e.get("type") in order),
                      key=lambda e: (order[e["type"]], int(e["id"])))
    for e in elements:
        attrs = {"id": str(int(e["id"])), "version": "1"}
        if e["type"] == "node":
            attrs |= {"lat": repr(float(e["lat"])), "lon": repr(float(e["lon"]))}
        el = ET.SubElement(root, e["type"], attrs)
        for ref in e.get("nodes", []):
            ET.SubElement(el, "nd", {"ref": str(int(ref))})
        for m in e.get("members", []):
            if m["type"] not in order:
                raise ValueError(f"member type {m['type']!r}")
            ET.SubElement(el, "member", {"type": m["type"], "ref": str(int(m["ref"])), "role": str(m.get("role", ""))})
        for k, v in e.get("tags", {}).items():
            ET.SubElement(el, "tag", {"k": str(k), "v": str(v)})
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
