"""Web Mercator (XYZ / "slippy map") tile arithmetic.

Tiles follow the XYZ convention used by OpenStreetMap, QGIS and gdal2tiles
--xyz: zoom z splits the EPSG:3857 square into 2**z x 2**z tiles, x grows to
the east and y to the south, tile (0, 0) is the north-west corner.
Pure functions, no I/O (the same maths as the `mercantile` package).
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

EARTH_RADIUS = 6378137.0  # WGS84 semi-major axis, the sphere of EPSG:3857
ORIGIN_SHIFT = math.pi * EARTH_RADIUS  # half the EPSG:3857 square's side, in metres
MAX_LAT = 85.0511287798066  # Web Mercator's latitude limit: the square's edge


class Tile(NamedTuple):
    x: int
    y: int
    z: int


def lnglat_to_tile(lng: float, lat: float, z: int) -> Tile:
    """The tile holding the point (lng, lat) at zoom z (clamped to the mercator square)."""
    n = 2 ** z
    lat = max(-MAX_LAT, min(MAX_LAT, lat))
    fx = (lng + 180.0) / 360.0
    fy = (1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0
    # A point on the east or south edge of the world belongs to the last tile.
    return Tile(min(n - 1, max(0, math.floor(fx * n))), min(n - 1, max(0, math.floor(fy * n))), z)


def tile_bounds_mercator(tile: Tile) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a tile in EPSG:3857 metres."""
    size = 2 * ORIGIN_SHIFT / 2 ** tile.z
    minx = -ORIGIN_SHIFT + tile.x * size
    maxy = ORIGIN_SHIFT - tile.y * size
    return minx, maxy - size, minx + size, maxy


def tile_bounds_lnglat(tile: Tile) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a tile in WGS84 degrees."""
    n = 2 ** tile.z

    def lat(y: int) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / n))))

    return tile.x / n * 360.0 - 180.0, lat(tile.y + 1), (tile.x + 1) / n * 360.0 - 180.0, lat(tile.y)


def tile_range(bounds: tuple[float, float, float, float], z: int) -> tuple[int, int, int, int] | None:
    """(xmin, ymin, xmax, ymax), inclusive, of the tiles covering WGS84 `bounds`
    (west, south, east, north) at zoom z; None when the box lies wholly beyond
    Web Mercator's latitude limit (near the poles), where there are no tiles."""
    west, south, east, north = bounds
    if south >= MAX_LAT or north <= -MAX_LAT:
        return None
    xmin, ymin, _ = lnglat_to_tile(west, north, z)
    xmax, ymax, _ = lnglat_to_tile(east, south, z)
    # A box lying exactly on tile edges does not reach into the neighbours
    # (compared with the edges as tile_bounds_lnglat computes them: no rounding gap).
    _, first_south, first_east, _ = tile_bounds_lnglat(Tile(xmin, ymin, z))
    last_west, _, _, last_north = tile_bounds_lnglat(Tile(xmax, ymax, z))
    if xmax > xmin and west >= first_east:
        xmin += 1
    if ymax > ymin and north <= first_south:
        ymin += 1
    if xmax > xmin and east <= last_west:
        xmax -= 1
    if ymax > ymin and south >= last_north:
        ymax -= 1
    return xmin, ymin, xmax, ymax


def tiles_covering(bounds: tuple[float, float, float, float], z: int) -> Iterator[Tile]:
    """The tiles covering WGS84 `bounds` at zoom z, row by row from the north-west."""
    rng = tile_range(bounds, z)
    if rng is None:
        return
    xmin, ymin, xmax, ymax = rng
    for y in range(ymin, ymax + 1):
        for x in range(xmin, xmax + 1):
            yield Tile(x, y, z)


def count_tiles(bounds: tuple[float, float, float, float], z: int) -> int:
    """How many tiles cover `bounds` at zoom z (without listing them)."""
    rng = tile_range(bounds, z)
    return 0 if rng is None else (rng[2] - rng[0] + 1) * (rng[3] - rng[1] + 1)


def ground_resolution(lat: float, z: int, tile_size: int = 256) -> float:
    """Metres on the ground per pixel at latitude `lat` and zoom z (mercator
    pixels shrink with the cosine of the latitude)."""
    return math.cos(math.radians(lat)) * 2 * ORIGIN_SHIFT / (tile_size * 2 ** z)


def nearest_zoom(gsd: float, lat: float, tile_size: int = 256, max_zoom: int = 24) -> int:
    """The zoom whose ground resolution at `lat` is nearest to `gsd` (metres per
    pixel). Nearest by ratio, not difference: zooms halve the pixel size."""
    if gsd <= 0:
        raise ValueError(f"gsd must be positive, got {gsd}")
    return min(range(max_zoom + 1), key=lambda z: abs(math.log(ground_resolution(lat, z, tile_size) / gsd)))


def quadkey(tile: Tile) -> str:
    """Bing Maps quadkey of a tile: one base-4 digit per zoom level, from zoom 1 down."""
    digits = []
    for level in range(tile.z, 0, -1):
        mask = 1 << (level - 1)
        digits.append(str((1 if tile.x & mask else 0) + (2 if tile.y & mask else 0)))
    return "".join(digits)


def expand_template(template: str, tile: Tile, subdomains: str = "abc") -> str:
    """The URL of `tile`: {z} {x} {y}; {-y} counts rows from the south (TMS, as in
    QGIS's XYZ connections); {q} is the Bing quadkey; {s} rotates over `subdomains`
    (by tile, so one tile always hits the same host and its cache entry)."""
    url = (template.replace("{z}", str(tile.z)).replace("{x}", str(tile.x))
           .replace("{-y}", str(2 ** tile.z - 1 - tile.y)).replace("{y}", str(tile.y))
           .replace("{q}", quadkey(tile)))
    if "{s}" in url and subdomains:
        url = url.replace("{s}", subdomains[(tile.x + tile.y) % len(subdomains)])
    return url


def template_tile_size(template: str) -> int:
    """512 for retina templates (`@2x`, `/512/`), else 256: the size the mosaic grid is laid out in."""
    return 512 if "@2x" in template or "/512/" in template or "tilesize=512" in template.lower() else 256
