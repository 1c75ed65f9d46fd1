"""WMS GetMap as a tile source: the AOI is cut into CHUNK-px requests on a grid
anchored at the CRS origin, so overlapping AOIs ask for (and cache) the same
images. Axis order: WMS 1.3.0 gives BBOX in the CRS's own axis order
(latitude first for EPSG:4326), 1.1.1 always x,y."""
from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from rasterio.crs import CRS

from ..errors import EngineError

CHUNK = 512  # px per request side: under every server's size limit, and several requests run at once
DEFAULT_CRS = "EPSG:3857"
METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class WmsSource:
    base: str  # the URL without the query
    params: dict[str, str]  # the user's query parameters (LAYERS, STYLES, FORMAT, ...), upper-case keys
    version: str
    crs: str | None = None  # CRS= (1.3.0) or SRS= (1.1.1) given in the URL: the CRS to request in


def is_wms(url: str) -> bool:
    query = {k.upper(): v.upper() for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    return query.get("SERVICE") == "WMS" or query.get("REQUEST") == "GETMAP"


def parse_wms(url: str) -> WmsSource:
    parts = urlsplit(url)
    params = {k.upper(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    crs = params.get("CRS") or params.get("SRS") or None
    for key in ("REQUEST", "BBOX", "WIDTH", "HEIGHT", "CRS", "SRS", "SERVICE"):
        params.pop(key, None)  # ours to set per request
    version = params.pop("VERSION", "1.3.0")
    if version not in ("1.1.1", "1.3.0"):
        raise EngineError("BAD_SOURCE", f"WMS version {version} is not supported.", "Use VERSION=1.3.0 or 1.1.1.")
    if not params.get("LAYERS"):
        raise EngineError("BAD_SOURCE", f"The WMS URL for {parts.hostname} names no layer.",
                          "Add LAYERS=name to the URL (see the server's GetCapabilities).")
    params.setdefault("STYLES", "")
    params.setdefault("FORMAT", "image/png")
    return WmsSource(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), params, version, crs)


def axis_swapped(version: str, crs: str) -> bool:
    """True when 1.3.0 wants BBOX as (y, x): EPSG geographic CRSs and the few projected ones with northing first."""
    if version != "1.3.0":
        return False
    crs_ = CRS.from_user_input(crs)
    try:
        return bool(crs_._epsg_treats_as_latlong() or crs_._epsg_treats_as_northingeasting())
    except AttributeError:  # older rasterio: geographic EPSG codes are the common case
        return crs_.is_geographic and crs.upper().startswith("EPSG:")


def getmap_url(src: WmsSource, crs: str, bbox: tuple[float, float, float, float], width: int, height: int) -> str:
    minx, miny, maxx, maxy = bbox
    order = (miny, minx, maxy, maxx) if axis_swapped(src.version, crs) else (minx, miny, maxx, maxy)
    query = {"SERVICE": "WMS", "VERSION": src.version, "REQUEST": "GetMap", **src.params,
             ("CRS" if src.version == "1.3.0" else "SRS"): crs, "BBOX": ",".join(repr(round(v, 9)) for v in order),
             "WIDTH": str(width), "HEIGHT": str(height)}
    return f"{src.base}?{urlencode(query)}"


def request_res(crs: str, gsd: float, lat: float) -> float:
    """The request's pixel size in `crs` units for `gsd` metres at latitude `lat`."""
    crs_ = CRS.from_user_input(crs)
    if crs_.is_geographic:
        return gsd / METRES_PER_DEGREE
    if crs_.to_epsg() == 3857:  # mercator metres shrink on the ground with cos(latitude)
        return gsd / math.cos(math.radians(lat))
    return gsd / (crs_.linear_units_factor[1] if crs_.is_projected else 1.0)


def chunk_range(bounds: tuple[float, float, float, float], span: float) -> tuple[int, int, int, int]:
    """(col0, row0, col1, row1) inclusive of the chunks of side `span` covering `bounds`;
    rows count down from y = 0."""
    minx, miny, maxx, maxy = bounds
    return (math.floor(minx / span), math.floor(-maxy / span),
            math.ceil(maxx / span) - 1, math.ceil(-miny / span) - 1)


def chunk_bounds(col: int, row: int, span: float) -> tuple[float, float, float, float]:
    return col * span, -(row + 1) * span, (col + 1) * span, -row * span
