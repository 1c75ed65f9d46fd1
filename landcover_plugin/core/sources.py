"""What the engine needs from QGIS layers and settings: file paths and URLs."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from qgis.core import QgsMapLayer, QgsProviderRegistry, QgsSettings
from qgis.PyQt.QtCore import QUrl

from ..contract.names import HEADERS_ENV  # read by the engine (engine/fetch.py)

# QGIS 3.22 stores XYZ connections under the first key, 3.30+ under the second.
_XYZ_GROUPS = ("qgis/connections-xyz", "connections/xyz/items")


class SourceError(ValueError):
    """A layer the engine cannot read; the message says what to do instead."""




@dataclass(frozen=True)
class ImagerySource:
    source: str  # XYZ URL template, WMS URL or raster path
    headers: dict[str, str] = field(default_factory=dict)
    # From QGIS's authentication database: they reach the engine through its
    # environment only (engine_env()), never the pipeline file, a command line or a log.
    secret_headers: dict[str, str] = field(default_factory=dict, repr=False)

    def engine_env(self) -> dict[str, str]:
        return {HEADERS_ENV: json.dumps(self.secret_headers)} if self.secret_headers else {}

    @property
    def is_xyz(self) -> bool:
        return self.source.startswith(("http://", "https://"))


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
                                            auth_headers(settings.value(f"{name}/authcfg", "")))
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
            return ImagerySource(parts["url"], _headers(parts.get("referer")), secret)
        if parts.get("url") and parts.get("layers") and not parts.get("tileMatrixSet"):
            return ImagerySource(wms_getmap_source(parts), _headers(parts.get("referer")), secret)
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
    """The file behind a vector layer (a file of several layers: its first layer)."""
    provider = layer.providerType()
    if provider == "ogr":
        return Path(layer.source().split("|")[0])
    if provider == "delimitedtext":  # e.g. a DeepForest CSV opened in QGIS
        return Path(QUrl(layer.source()).toLocalFile())
    raise SourceError(f"Layer '{layer.name()}' is not saved in a file ({provider}): "
                      "save it (e.g. as a GeoPackage) and choose the saved layer.")
