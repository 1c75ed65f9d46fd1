"""Shared test fixtures: paths of the real sample data fetched by `make install`."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make install` (it fetches the sample data)")
    return path


@pytest.fixture(scope="session")
def osbs_tif() -> Path:
    """NEON orthophoto OSBS_029: 400x400 px RGB uint8, 0.1 m, EPSG:32617."""
    return _need(DATA / "deepforest" / "OSBS_029.tif")


@pytest.fixture(scope="session")
def osbs_csv() -> Path:
    """DeepForest crown boxes (pixel coordinates in OSBS_029.tif), 61 crowns."""
    return _need(DATA / "deepforest" / "OSBS_029.csv")


@pytest.fixture(scope="session")
def landsat_bands() -> list[Path]:
    """Landsat-7 bands 1-5 and 7, float32, 28.5 m, EPSG:32119, nodata -99999."""
    return [_need(DATA / "nc_landsat" / f"lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)]


@pytest.fixture(scope="session")
def landsat_polygons() -> Path:
    """34 land-cover polygons (field `label`, 7 classes), EPSG:3358 (not the raster's CRS)."""
    return _need(DATA / "nc_landsat" / "landsat96_polygons.shp")


def crop_raster(src_path: Path, window, out: Path) -> Path:
    """A windowed copy of a raster (same CRS and resolution)."""
    import rasterio

    with rasterio.open(src_path) as src:
        profile = src.profile | {"width": window.width, "height": window.height,
                                 "transform": src.window_transform(window), "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        data = src.read(window=window)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


@pytest.fixture(scope="session")
def crop():
    """crop(raster, rasterio Window, out_path) -> out_path: a small piece of a sample raster."""
    return crop_raster


@pytest.fixture(scope="session")
def landsat_stack(landsat_bands, tmp_path_factory) -> Path:
    """The six Landsat bands stacked into one 6-band GeoTIFF."""
    from landcover_plugin.engine.imagery.raster import stack_bands

    return stack_bands(landsat_bands, tmp_path_factory.mktemp("landsat") / "lsat7_2000.tif")
