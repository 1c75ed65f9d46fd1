"""Names and values both processes use: environment variables, raster codes, folders."""
from __future__ import annotations

from pathlib import Path

# Extra HTTP headers for the engine, a JSON object: how the plugin hands over
# credentials from QGIS's authentication database without a file or an argument.
HEADERS_ENV = "LANDCOVER_HTTP_HEADERS"

# Mask value of pixels training ignores, and of prediction pixels outside the AOI or without imagery.
IGNORE = 255
NODATA = 255

# Imagery whose pixel size is off the model's by more than this share gets a warning.
RESOLUTION_TOLERANCE = 0.25

RESOURCES_DIR = Path(__file__).resolve().parents[1] / "resources"
PRESETS_DIR = RESOURCES_DIR / "presets"
MODELS_DIR = RESOURCES_DIR / "models"

OSM_ATTRIBUTION = "© OpenStreetMap contributors"
OVERPASS_DEFAULT = "https://overpass-api.de/api/interpreter"  # the public instance; users may run their own
OSM_SUFFIXES = (".osm", ".osm.bz2", ".osm.pbf", ".pbf", ".osm.gz")  # what the engine reads (pyosmium)
