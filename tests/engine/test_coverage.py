"""coverage: traced class polygons simplified as one coverage (shared edges stay shared)."""
from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio.features import shapes, sieve
from scipy import ndimage

from landcover_plugin.engine.vector.coverage import PixelPolygons, simplify_coverage


def traced(classes: np.ndarray, origin: tuple[int, int] = (0, 0)) -> tuple[list[dict], PixelPolygons]:
    geoms = [g for g, _ in shapes(classes, connectivity=4, transform=Affine.translation(*origin))]
    return geoms, PixelPolygons.from_geojson(geoms)


def blobs(seed: int, size: int = 80) -> np.ndarray:
    """Three classes in small blobs, with one- and two-pixel-wide necks and strips."""
    fields = ndimage.gaussian_filter(np.random.default_rng(seed).random((3, size, size)), (0, 1.2, 1.2))
    return sieve(np.argmax(fields, axis=0).astype(np.uint8), 3, connectivity=4)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tolerance", [0.75, 1.5])  # 1.5 px makes arcs cross in narrow strips: they go back
def test_polygons_stay_valid_and_tile_the_block(seed, tolerance):
    classes = blobs(seed)
    geoms, pixels = traced(classes, origin=(100, 40))
    out = simplify_coverage(pixels, classes, (100, 40), tolerance)
    assert len(out) == len(geoms)
    assert shapely.is_valid(out).all()
    union = shapely.union_all(out)
    assert union.area == pytest.approx(classes.size)  # no gaps
    assert shapely.area(out).sum() == pytest.approx(union.area)  # no overlaps
    assert union.equals(shapely.box(100, 40, 180, 120))  # the block's outline is untouched
    originals = [shapely.geometry.shape(g) for g in geoms]
    assert max(shapely.hausdorff_distance(out, originals)) <= tolerance + 1e-9
    assert np.allclose(pixels.areas(), shapely.area(originals))


def test_staircase_becomes_a_line_and_holes_stay():
    classes = np.zeros((40, 40), np.uint8)
    rows, cols = np.indices(classes.shape)
    classes[rows > cols] = 1  # a diagonal staircase: 79 corners between the two classes
    classes[5:9, 25:29] = 2  # an island: a hole in class 0
    _, pixels = traced(classes)
    out = simplify_coverage(pixels, classes, (0, 0), 0.75)
    by_class = {int(classes[int(p.representative_point().y), int(p.representative_point().x)]): p for p in out}
    assert len(by_class[0].interiors) == 1 and by_class[0].interiors[0].equals(by_class[2].exterior)
    assert shapely.get_num_coordinates(by_class[1]) <= 6  # a triangle, maybe a corner kept
    assert by_class[0].intersection(by_class[1]).length == pytest.approx(40 * 2 ** 0.5, rel=0.05)


def test_t_junction_on_a_straight_edge():
    """Class 0 runs straight along the top of classes 1 and 2; the corner where 1 and 2
    meet is a node of all three, although it is no vertex of class 0's traced ring."""
    classes = np.zeros((30, 30), np.uint8)
    classes[15:, :] = 1
    classes[15:, 10:] = 2
    stairs = np.indices((15, 20))
    classes[15:, 10:][stairs[0] > stairs[1]] = 1  # a staircase from the junction down
    _, pixels = traced(classes)
    out = simplify_coverage(pixels, classes, (0, 0), 0.75)
    assert shapely.is_valid(out).all()
    union = shapely.union_all(out)
    assert union.area == pytest.approx(900) and shapely.area(out).sum() == pytest.approx(900)
