"""Training-time augmentation on tensors (tf.data map functions).

Geometry (flips, 90-degree turns, small scale jitter) is applied alike to
image and mask; brightness/contrast to the image only. Masks are resized with
nearest neighbour so class values and the ignore value stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentParams:
    flips: bool = True
    rotations: bool = True
    brightness: float = 0.1  # +- in standardised units
    contrast: float = 0.1  # factor 1 +- this
    scale_jitter: float = 0.1  # zoom 1 +- this


def augment_fn(bands: int, tile: int, params: AugmentParams = AugmentParams()):
    """A function (x, y) -> (x, y) for tf.data.Dataset.map."""
    import tensorflow as tf

    def augment(x, y):
        both = tf.concat([x, y], axis=-1)
        if params.flips:
            both = tf.image.random_flip_left_right(both)
            both = tf.image.random_flip_up_down(both)
        if params.rotations:
            both = tf.image.rot90(both, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
        x, y = both[..., :bands], both[..., bands:]
        if params.scale_jitter > 0:
            scale = tf.random.uniform([], 1 - params.scale_jitter, 1 + params.scale_jitter)
            size = tf.cast(tf.round(tile * scale), tf.int32)
            x = tf.image.resize(x, [size, size], method="bilinear")
            y = tf.image.resize(y, [size, size], method="nearest")
            # Zooming out pads: the padding is ignored in the loss (255) and zero (the mean) in the image.
            x = tf.image.resize_with_crop_or_pad(x, tile, tile)
            y = 255.0 - tf.image.resize_with_crop_or_pad(255.0 - y, tile, tile)
            y = tf.concat([y[..., :1], tf.where(y[..., :1] == 255.0, 0.0, y[..., 1:])], axis=-1) \
                if y.shape[-1] and y.shape[-1] > 1 else y
        if params.contrast > 0:
            x = x * tf.random.uniform([], 1 - params.contrast, 1 + params.contrast)
        if params.brightness > 0:
            x = x + tf.random.uniform([], -params.brightness, params.brightness)
        return tf.ensure_shape(x, [tile, tile, bands]), y

    return augment
