"""Labels from the real sample data: NC land-cover polygons and NEON crown boxes."""
from __future__ import annotations

import shutil

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.geometry import Point, box, mapping, shape

from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.imagery.aoi import reproject_geometry
from landcover_plugin.engine.labels.read import read_labels

NC_CLASSES = ["agriculture", "developed", "forest", "herbaceous", "sediment", "shrubland", "water"]


def _raster_bounds(path):
    with rasterio.open(path) as src:
        return box(*src.bounds), src.crs


def test_nc_polygons_are_reprojected_into_the_landsat_crs(landsat_polygons, landsat_stack):
    labels = read_labels(landsat_polygons, landsat_stack, "landcover", "label")
    footprint, crs = _raster_bounds(landsat_stack)
    # 33 of the 34 polygons lie over the raster (one small water polygon lies just south of it).
    assert len(labels.geometries) == len(labels.classes) == 33
    assert labels.class_names == NC_CLASSES
    assert rasterio.crs.CRS.from_wkt(labels.crs) == crs
    assert all(footprint.contains(g.centroid) for g in labels.geometries)
    assert labels.footprint is None  # polygons: no "complete annotation" area


def test_labels_in_degrees_land_where_the_projected_ones_do(landsat_polygons, landsat_stack, tmp_path):
    """The same polygons stored in WGS84 come out within a metre of the EPSG:3358 ones."""
    wgs84 = tmp_path / "polygons_wgs84.gpkg"
    with fiona.open(landsat_polygons) as src:
        schema, src_crs, feats = src.schema, src.crs_wkt, list(src)
    with fiona.open(wgs84, "w", driver="GPKG", schema=schema, crs="EPSG:4326") as dst:
        for f in feats:
            geom = reproject_geometry(shape(f["geometry"]), src_crs, "EPSG:4326")
            dst.write({"geometry": mapping(geom), "properties": dict(f["properties"])})
    projected = read_labels(landsat_polygons, landsat_stack, "landcover", "label")
    degrees = read_labels(wgs84, landsat_stack, "landcover", None)  # finds the "label" field itself
    assert degrees.classes == projected.classes
    for a, b in zip(degrees.geometries, projected.geometries):
        assert a.centroid.distance(b.centroid) < 1.0
        assert abs(a.area - b.area) / b.area < 1e-3


def test_deepforest_boxes_map_to_utm_coordinates(osbs_csv, osbs_tif):
    labels = read_labels(osbs_csv, osbs_tif, "trees", None)
    assert len(labels.geometries) == 61
    assert labels.class_names == ["Tree"]
    # First row: OSBS_029.tif,203,67,227,90 with transform (0.1, 0, 404211.9, 0, -0.1, 3285142.9):
    # x = 404211.9 + 0.1 * col, y = 3285142.9 - 0.1 * row.
    assert labels.geometries[0].bounds == pytest.approx((404232.2, 3285133.9, 404234.6, 3285136.2), abs=1e-6)
    assert labels.footprint.bounds == pytest.approx((404211.9, 3285102.9, 404251.9, 3285142.9), abs=1e-6)


def test_boxes_follow_imagery_in_another_crs_and_resolution(osbs_csv, osbs_tif, tmp_path):
    """A mosaic in Web Mercator at 0.2 m: boxes are placed on it through the CSV image's georeference."""
    mosaic = tmp_path / "mosaic_3857.tif"
    with rasterio.open(osbs_tif) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height,
                                                               *src.bounds, resolution=0.2)
        profile = src.profile | {"crs": "EPSG:3857", "transform": transform, "width": width, "height": height}
        with rasterio.open(mosaic, "w", **profile) as dst:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.bilinear)
        utm = src.crs.to_wkt()
    labels = read_labels(osbs_csv, mosaic, "trees", None)
    assert len(labels.geometries) == 61
    back = reproject_geometry(labels.geometries[0].centroid, "EPSG:3857", utm)
    assert back.distance(Point(404233.4, 3285135.05)) < 0.01
    assert _raster_bounds(mosaic)[0].contains(labels.geometries[0])


def test_missing_label_file(tmp_path, osbs_tif):
    with pytest.raises(EngineError) as err:
        read_labels(tmp_path / "nope.gpkg", osbs_tif, "trees", None)
    assert err.value.code == "LABELS_NOT_FOUND"


def test_unreadable_label_file(tmp_path, osbs_tif):
    junk = tmp_path / "labels.gpkg"
    junk.write_bytes(b"this is not a geopackage")
    with pytest.raises(EngineError) as err:
        read_labels(junk, osbs_tif, "trees", None)
    assert err.value.code == "BAD_LABELS"
    assert "labels.gpkg" in err.value.message


def test_empty_label_files(tmp_path, osbs_tif, landsat_stack):
    empty = tmp_path / "empty.gpkg"
    schema = {"geometry": "Polygon", "properties": {"class": "str"}}
    with fiona.open(empty, "w", driver="GPKG", schema=schema, crs="EPSG:32119"):
        pass
    with pytest.raises(EngineError) as err:
        read_labels(empty, landsat_stack, "landcover", None)
    assert err.value.code == "LABELS_EMPTY"
    header_only = tmp_path / "boxes.csv"
    header_only.write_text("image_path,xmin,ymin,xmax,ymax,label\n")
    with pytest.raises(EngineError) as err:
        read_labels(header_only, osbs_tif, "trees", None)
    assert err.value.code == "LABELS_EMPTY"


def test_missing_class_field_lists_the_fields(landsat_polygons, landsat_stack):
    with pytest.raises(EngineError) as err:
        read_labels(landsat_polygons, landsat_stack, "landcover", "landuse")
    assert err.value.code == "CLASS_FIELD_MISSING"
    assert "'landuse'" in err.value.message and "label, id" in err.value.message


def test_labels_elsewhere_than_the_imagery(landsat_polygons, osbs_tif):
    """NC polygons against the Florida orthophoto."""
    with pytest.raises(EngineError) as err:
        read_labels(landsat_polygons, osbs_tif, "landcover", "label")
    assert err.value.code == "LABELS_OUTSIDE_IMAGERY"


def test_csv_image_not_found(osbs_csv, osbs_tif, tmp_path):
    shutil.copy(osbs_csv, tmp_path / "boxes.csv")
    with pytest.raises(EngineError) as err:
        read_labels(tmp_path / "boxes.csv", osbs_tif, "trees", None)
    assert err.value.code == "LABEL_IMAGE_NOT_FOUND"
    assert "OSBS_029.tif" in err.value.message


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_csv_image_not_georeferenced(osbs_csv, osbs_tif, tmp_path):
    shutil.copy(osbs_csv, tmp_path / "boxes.csv")
    with rasterio.open(osbs_tif) as src:
        data = src.read()
    with rasterio.open(tmp_path / "OSBS_029.tif", "w", driver="GTiff", width=data.shape[2],
                       height=data.shape[1], count=3, dtype="uint8") as dst:
        dst.write(data)
    with pytest.raises(EngineError) as err:
        read_labels(tmp_path / "boxes.csv", osbs_tif, "trees", None)
    assert err.value.code == "LABEL_IMAGE_NOT_GEOREFERENCED"
    assert np.any(data)  # the copy held real pixels, only the georeference was missing


def test_pascal_voc_boxes_land_where_the_csv_ones_do(osbs_csv, osbs_tif, tmp_path):
    """A VOC file written by hand from the CSV's first two rows, beside a copy of its image."""
    shutil.copy(osbs_tif, tmp_path / "OSBS_029.tif")
    voc = tmp_path / "OSBS_029.xml"
    voc.write_text("<annotation><filename>OSBS_029.tif</filename>"
                   "<object><name>Tree</name><bndbox><xmin>203</xmin><ymin>67</ymin><xmax>227</xmax><ymax>90</ymax>"
                   "</bndbox></object><object><name>Dead</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>10</xmax>"
                   "<ymax>10</ymax></bndbox></object></annotation>")
    labels = read_labels(voc, osbs_tif, "trees")
    csv_labels = read_labels(osbs_csv, osbs_tif, "trees")
    assert labels.classes == ["Tree", "Dead"]
    assert labels.geometries[0].bounds == pytest.approx(csv_labels.geometries[0].bounds, abs=1e-6)
    assert labels.footprint.bounds == pytest.approx(csv_labels.footprint.bounds, abs=1e-6)
    voc.write_text("<annotation><filename>OSBS_029.tif</filename><object><name>x</name></object></annotation>")
    with pytest.raises(EngineError) as err:
        read_labels(voc, osbs_tif, "trees")
    assert err.value.code == "BAD_LABELS"


def test_class_map_renames_values_and_refuses_unknown_ones(landsat_polygons, landsat_stack):
    from landcover_plugin.engine.labels.read import parse_class_map

    mapping_ = parse_class_map("agriculture=cultivated,developed=developed,forest=forested,"
                               "herbaceous=herbaceous,sediment=barren,shrubland=shrub,water=water")
    labels = read_labels(landsat_polygons, landsat_stack, "landcover", "label", mapping_)
    assert labels.class_names == ["barren", "cultivated", "developed", "forested", "herbaceous", "shrub", "water"]
    del mapping_["sediment"]
    with pytest.raises(EngineError) as err:
        read_labels(landsat_polygons, landsat_stack, "landcover", "label", mapping_)
    assert err.value.code == "UNKNOWN_CLASS" and "'sediment'" in err.value.message
    with pytest.raises(EngineError) as err:
        parse_class_map("water")
    assert err.value.code == "BAD_CLASS_MAP"
