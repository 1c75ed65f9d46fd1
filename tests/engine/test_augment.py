"""Training augmentation: per-band colour jitter changes the image's colours, never the mask."""
import numpy as np

from landcover_plugin.engine.augment import AugmentParams, augment_fn

COLOUR_ONLY = dict(flips=False, rotations=False, brightness=0.0, contrast=0.0, scale_jitter=0.0)


def _run(params: AugmentParams, seed: int = 0):
    import tensorflow as tf

    tf.random.set_seed(seed)
    x = np.full((16, 16, 3), 0.5, np.float32)
    y = np.random.default_rng(0).integers(0, 3, (16, 16, 2)).astype(np.float32)
    ax, ay = augment_fn(3, 16, params)(tf.constant(x), tf.constant(y))
    return x, y, ax.numpy(), ay.numpy()


def test_band_jitter_casts_a_colour_per_band_and_keeps_the_mask():
    x, y, ax, ay = _run(AugmentParams(**COLOUR_ONLY, band_jitter=0.3))
    np.testing.assert_array_equal(ay, y)
    per_band = ax.reshape(-1, 3)
    assert np.allclose(per_band, per_band[0])  # one gain and offset per band, the same over the chip
    assert np.ptp(per_band[0]) > 1e-3  # ... but different between bands: a colour cast
    assert np.all(np.abs(per_band[0] - 0.5) <= 0.3 * 0.5 + 0.3 + 1e-6)


def test_no_band_jitter_by_default():
    x, _, ax, _ = _run(AugmentParams(**COLOUR_ONLY))
    np.testing.assert_array_equal(ax, x)
