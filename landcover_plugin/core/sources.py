"""What the engine needs from QGIS layers and settings: file paths and URLs."""
from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from qgis.core import QgsMapLayer, QgsProject, QgsProviderRegistry, QgsSettings, QgsVectorFileWriter, QgsVectorLayer
from qgis.PyQt.QtCore import QUrl

from ..contract.names import HEADERS_ENV  # read by the engine (engine/fetch.py)

# QGIS 3.22 stores XYZ connections under the first key, 3.30+ under the second.
_XYZ_GROUPS = ("qgis/connections-xyz", "connections/xyz/items")


class SourceError(ValueError):
    """A layer the engine cannot read; the message says what to do instead."""




# Tile servers of street maps: cartography, not imagery (a model learns nothing from them), and
# OpenStreetMap's tile usage policy forbids bulk downloads.
STREET_MAP_HOSTS = ("openstreetmap.org", "openstreetmap.fr", "opentopomap.org", "cartocdn.com",
                    "thunderforest.com", "stamen", "wmflabs.org", "wikimedia.org")
# Words in a connection's name or URL that say it is aerial or satellite imagery: offered first.
IMAGERY_WORDS = ("satellite", "aerial", "ortho", "imagery", "luchtfoto", "photo", "sentinel", "naip", "lyrs=s")


@dataclass(frozen=True)
class ImagerySource:
    source: str  # XYZ URL template, WMS URL or raster path
    headers: dict[str, str] = field(default_factory=dict)
    max_zoom: int | None = None  # an XYZ connection's last zoom level
    # From QGIS's authentication database: they reach the engine through its
    # environment only (engine_env()), never the pipeline file, a command line or a log.
    secret_headers: dict[str, str] = field(default_factory=dict, repr=False)

    def engine_env(self) -> dict[str, str]:
        return {HEADERS_ENV: json.dumps(self.secret_headers)} if self.secret_headers else {}

    @property
    def is_xyz(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    @property
    def is_street_map(self) -> bool:
        return self.is_xyz and any(host in self.source.lower() for host in STREET_MAP_HOSTS)


def imagery_rank(name: str, source: ImagerySource) -> int:
    """Order of XYZ connections in the dock: aerial or satellite imagery first, street maps last."""
    if source.is_street_map:
        return 2
    text = f"{name} {source.source}".lower()
    return 0 if any(word in text for word in IMAGERY_WORDS) else 1


def _zoom(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _headers(referer: str | None) -> dict[str, str]:
    return {"Referer": referer} if referer else {}


def auth_headers(authcfg: str | None) -> dict[str, str]:
    """HTTP headers for a QGIS authentication configuration: Basic (user, password)
    or API header methods; {} for none or a method the engine cannot replay."""
    if not authcfg:
        return {}
    from qgis.core import QgsApplication, QgsAuthMethodConfig

    config = QgsAuthMethodConfig()
    if not QgsApplication.authManager().loadAuthenticationConfig(authcfg, config, True):
        raise SourceError(f"The QGIS authentication configuration '{authcfg}' cannot be loaded: "
                          "unlock or check it in Settings > Options > Authentication.")
    if config.method() == "Basic":
        token = base64.b64encode(f"{config.config('username')}:{config.config('password')}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if config.method() == "APIHeader":
        return {str(k): str(v) for k, v in config.configMap().items()}
    raise SourceError(f"The authentication method {config.method()} of '{config.name()}' is not supported "
                      "for imagery yet: use Basic or API header authentication.")


def xyz_connections(settings: QgsSettings | None = None) -> dict[str, ImagerySource]:
    """The XYZ tile connections saved in QGIS (Browser > XYZ Tiles), by name."""
    settings = settings or QgsSettings()
    found: dict[str, ImagerySource] = {}
    for group in _XYZ_GROUPS:
        settings.beginGroup(group)
        for name in settings.childGroups():
            url = settings.value(f"{name}/url", "")
            if url and name not in found:
                found[name] = ImagerySource(url, _headers(settings.value(f"{name}/referer", "")),
                                            secret_headers=auth_headers(settings.value(f"{name}/authcfg", "")),
                                            max_zoom=_zoom(settings.value(f"{name}/zmax", "")))
        settings.endGroup()
    return found


def raster_layer_source(layer: QgsMapLayer) -> ImagerySource:
    """A raster layer as the engine sees it: a GDAL file, or an XYZ layer's URL."""
    provider = layer.providerType()
    if provider == "gdal":
        path = layer.source().split("|")[0]
        if not Path(path).exists():
            raise SourceError(f"Layer '{layer.name()}' is not a local file ({path}): save it as a GeoTIFF first.")
        return ImagerySource(path)
    if provider == "wms":
        parts = QgsProviderRegistry.instance().decodeUri("wms", layer.source())
        secret = auth_headers(parts.get("authcfg"))
        if parts.get("type") == "xyz" and parts.get("url"):
            return ImagerySource(parts["url"], _headers(parts.get("referer")), secret_headers=secret,
                                 max_zoom=_zoom(parts.get("zmax")))
        if parts.get("url") and parts.get("layers") and not parts.get("tileMatrixSet"):
            return ImagerySource(wms_getmap_source(parts), _headers(parts.get("referer")), secret_headers=secret)
        raise SourceError(f"Layer '{layer.name()}' is a WMTS service; only XYZ tiles, WMS and raster files "
                          "are supported yet: add it as an XYZ connection or save it as a GeoTIFF.")
    raise SourceError(f"Layer '{layer.name()}' ({provider}) cannot be read by the engine: "
                      "use a raster file or an XYZ connection.")


def _joined(value) -> str:
    return ",".join(value) if isinstance(value, (list, tuple)) else str(value or "")


def wms_getmap_source(parts: dict) -> str:
    """A QGIS WMS layer (its decoded URI) as the engine's WMS source: the service URL
    with the layer's layers, styles, format and CRS (the engine asks for GetMap images in it)."""
    query = {"SERVICE": "WMS", "VERSION": "1.3.0", "LAYERS": _joined(parts.get("layers")),
             "STYLES": _joined(parts.get("styles")), "FORMAT": parts.get("format") or "image/png"}
    if parts.get("crs"):
        query["CRS"] = parts["crs"]
    url = parts["url"]
    return f"{url}{'&' if '?' in url else '?'}{urlencode(query)}"


def vector_layer_path(layer: QgsMapLayer) -> Path:
    """The file behind a vector layer, for inputs the engine reads whole (an AOI file)."""
    provider = layer.providerType()
    if provider == "ogr":
        return Path(layer.source().split("|")[0])
    if provider == "delimitedtext":  # e.g. a DeepForest CSV opened in QGIS
        return Path(QUrl(layer.source()).toLocalFile())
    raise SourceError(f"Layer '{layer.name()}' is not saved in a file ({provider}): "
                      "save it (e.g. as a GeoPackage) and choose the saved layer.")


def is_whole_file(layer: QgsVectorLayer) -> bool:
    """The layer is all of its file: the file's only layer, no filter, nothing selected."""
    if layer.providerType() == "delimitedtext":  # a DeepForest CSV: the engine reads its pixel boxes itself
        return True
    if layer.providerType() != "ogr" or layer.subsetString() or layer.selectedFeatureCount():
        return False
    from .layers import gpkg_layer_names  # the engine reads a file's first layer

    try:
        return len(gpkg_layer_names(vector_layer_path(layer))) <= 1
    except OSError:
        return False


def labels_for_engine(layer: QgsVectorLayer, folder: Path) -> Path:
    """The file the engine trains on: exactly the chosen layer. A layer that is its whole file
    goes as it is; otherwise (a GeoPackage's second layer, a filter, selected features, a layer
    not saved in a file) its features are written to a GeoPackage in `folder`, named by what
    it holds, so an unchanged choice reuses the file and the finished stages built on it."""
    if is_whole_file(layer):
        return vector_layer_path(layer)
    selected = sorted(layer.selectedFeatureIds())
    source = Path(layer.source().split("|")[0])
    stamp = source.stat().st_mtime_ns if source.is_file() else time.time_ns()  # a memory layer: always anew
    key = json.dumps([layer.source(), layer.subsetString(), selected, stamp])
    path = Path(folder) / f"labels-{hashlib.sha256(key.encode()).hexdigest()[:12]}.gpkg"
    if path.exists():
        return path
    try:
        write_gpkg(layer, path, "labels", only_selected=bool(selected))
    except OSError as exc:
        raise SourceError(f"Layer '{layer.name()}' could not be written for the engine: {exc}") from None
    return path


def write_gpkg(layer: QgsVectorLayer, path: Path, layer_name: str, only_selected: bool = False) -> None:
    """A layer's features as a one-layer GeoPackage, written whole (a temporary name, then renamed);
    OSError with QGIS's reason when it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName, options.layerName = "GPKG", layer_name
    options.onlySelectedFeatures = only_selected
    partial = path.with_name(f".{path.name}.partial.gpkg")
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(layer, str(partial),
                                                                   QgsProject.instance().transformContext(), options)
    if error != QgsVectorFileWriter.NoError:
        partial.unlink(missing_ok=True)
        raise OSError(f"{path}: {message}")
    partial.replace(path)
