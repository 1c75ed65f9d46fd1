"""Hand-written .osm files for tests: ways given in a projected CRS become lon/lat nodes."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from rasterio.warp import transform as warp


def osm_file(path: Path, ways: list[tuple[list[tuple[float, float]], dict[str, str]]], crs: str) -> Path:
    """An .osm file with these ways (coordinates in `crs`); a ring closed in the input
    (last point = first) is closed on its first node, as OSM does."""
    root = ET.Element("osm", {"version": "0.6"})
    nid, way_elems = 0, []
    for wid, (coords, tags) in enumerate(ways, start=1):
        lons, lats = warp(crs, "EPSG:4326", [c[0] for c in coords], [c[1] for c in coords])
        refs = []
        for lon, lat in zip(lons, lats):
            if refs and len(refs) == len(coords) - 1 and coords[0] == coords[-1]:
                refs.append(refs[0])  # closed ring: the first node again
                break
            nid += 1
            ET.SubElement(root, "node", {"id": str(nid), "version": "1", "lat": repr(lat), "lon": repr(lon)})
            refs.append(nid)
        way_elems.append((wid, refs, tags))
    for wid, refs, tags in way_elems:
        way = ET.SubElement(root, "way", {"id": str(wid), "version": "1"})
        for r in refs:
            ET.SubElement(way, "nd", {"ref": str(r)})
        for k, v in tags.items():
            ET.SubElement(way, "tag", {"k": k, "v": v})
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path
