"""A loopback stand-in for the Overpass API, for tests.

It speaks the interpreter's HTTP protocol: POST /api/interpreter with the form
field `data` = an Overpass QL query; the answer is OSM JSON. It holds a real OSM
extract (read with pyosmium) and answers with what lies in the query's
`[bbox:south,west,north,east]`: nodes inside, ways touching it (with all their
nodes) and relations with such members (with their other members too), as
`(._;>;); out body;` would. Faults can be scripted: HTTP statuses answered
before the real answer (429, 504 ...), a Retry-After for the 429s, a
runtime-error remark, raw bodies answered (HTTP 200, JSON) before the real
answer (an empty or malformed one), or stalls: the first `stalls` requests get
no answer for `stall_s` seconds (a server stuck past the client's read timeout).

    with serve_overpass(Path("data/osm/test.osm.pbf"), statuses=[429, 504]) as server:
        server.url          # "http://127.0.0.1:PORT/api/interpreter"
        server.queries      # the queries received, in order
"""
from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs


def load_osm(path: Path) -> dict[str, dict[int, dict]]:
    """An OSM file as OSM JSON elements by type and id."""
    import osmium

    data: dict[str, dict[int, dict]] = {"node": {}, "way": {}, "relation": {}}

    class Handler(osmium.SimpleHandler):
        def node(self, n):
            data["node"][n.id] = {"type": "node", "id": n.id, "lat": n.location.lat, "lon": n.location.lon,
                                  **_tags(n)}

        def way(self, w):
            data["way"][w.id] = {"type": "way", "id": w.id, "nodes": [r.ref for r in w.nodes], **_tags(w)}

        def relation(self, r):
            data["relation"][r.id] = {"type": "relation", "id": r.id, **_tags(r), "members": [
                {"type": {"n": "node", "w": "way", "r": "relation"}[m.type], "ref": m.ref, "role": m.role}
                for m in r.members]}

    Handler().apply_file(str(path))
    return data


def _tags(obj) -> dict:
    tags = {t.k: t.v for t in obj.tags}
    return {"tags": tags} if tags else {}


def in_bbox(data: dict[str, dict[int, dict]], south: float, west: float, north: float, east: float) -> list[dict]:
    nodes = {i for i, n in data["node"].items() if south <= n["lat"] <= north and west <= n["lon"] <= east}
    ways = {i for i, w in data["way"].items() if nodes.intersection(w["nodes"])}
    relations = {i for i, r in data["relation"].items()
                 if any((m["type"] == "way" and m["ref"] in ways) or (m["type"] == "node" and m["ref"] in nodes)
                        for m in r["members"])}
    for i in relations:  # recurse down: all members of the relations found
        for m in data["relation"][i]["members"]:
            if m["type"] == "way" and m["ref"] in data["way"]:
                ways.add(m["ref"])
    for i in ways:
        nodes.update(n for n in data["way"][i]["nodes"] if n in data["node"])
    return ([data["node"][i] for i in sorted(nodes)] + [data["way"][i] for i in sorted(ways)]
            + [data["relation"][i] for i in sorted(relations)])


@dataclass
class OverpassStandIn:
    url: str = ""
    queries: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answered (and consumed) before real answers
    bodies: list[str] = field(default_factory=list)  # then these, with HTTP 200 (and consumed)
    remark: str | None = None  # e.g. "runtime error: Query timed out in \"query\" at line 3"
    retry_after: str = "0"  # Retry-After of the 429 answers
    stalls: int = 0  # requests (the first ones) answered only after stall_s, or at shutdown
    stall_s: float = 0.0
    release: threading.Event = field(default_factory=threading.Event)  # set at shutdown: stalls end


def _handler(data: dict, state: OverpassStandIn, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            form = parse_qs(self.rfile.read(length).decode())
            query = form.get("data", [""])[0]
            with lock:
                state.queries.append(query)
                status = state.statuses.pop(0) if state.statuses else 200
                body = state.bodies.pop(0) if status == 200 and state.bodies else None
                stall = state.stalls > 0
                state.stalls -= stall
            if stall:
                state.release.wait(state.stall_s)  # the client's read timeout fires meanwhile
            if self.path != "/api/interpreter":
                return self._answer(404, "text/html", "<p><strong>Error</strong>: not found</p>")
            if status != 200:
                headers = {"Retry-After": state.retry_after} if status == 429 else {}
                return self._answer(status, "text/html", f"<p><strong>Error</strong>: status {status}</p>", headers)
            if body is not None:
                return self._answer(200, "application/json", body)
            bbox = re.search(r"\[bbox:([-\d.]+),([-\d.]+),([-\d.]+),([-\d.]+)\]", query)
            if not query.startswith("[out:json]") or not bbox:
                return self._answer(400, "text/html", "<p><strong>Error</strong>: line 1: parse error</p>")
            document = {"version": 0.6, "generator": "Overpass stand-in", "osm3s": {"copyright": "ODbL"},
                        "elements": in_bbox(data, *map(float, bbox.groups()))}
            if state.remark:
                document["remark"] = state.remark
            self._answer(200, "application/json", json.dumps(document))

        def _answer(self, status: int, ctype: str, body: str, headers: dict | None = None) -> None:
            raw = body.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)
            except OSError:  # the client gave up waiting (a stall) and closed the connection
                pass

        def log_message(self, *args) -> None:  # quiet tests
            pass

    return Handler


@contextmanager
def serve_overpass(osm_file: Path, statuses: list[int] | None = None, remark: str | None = None,
                   retry_after: str = "0", stalls: int = 0, stall_s: float = 0.0,
                   bodies: list[str] | None = None) -> Iterator[OverpassStandIn]:
    state = OverpassStandIn(statuses=list(statuses or []), bodies=list(bodies or []), remark=remark,
                            retry_after=retry_after, stalls=stalls, stall_s=stall_s)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(load_osm(osm_file), state, threading.Lock()))
    state.url = f"http://127.0.0.1:{server.server_address[1]}/api/interpreter"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
