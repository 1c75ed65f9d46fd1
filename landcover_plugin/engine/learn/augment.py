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


def paste_crowns(x, y, share: float, seed: int, per_chip: int = 4):
    """Copy-paste augmentation for few-shot crowns: `share` x len(x) more training samples,
    each a training chip with up to `per_chip` labelled crowns of other chips pasted where
    it has no crown (pixels, crown mask and centre heatmap moved together). A few hundred
    labelled crowns are then seen on more backgrounds and in more neighbourhoods.
    x: (n, h, w, bands) floats; y: (n, h, w, 2) crown (0/1/2, 255 ignore) and heatmap."""
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n, size = len(x), x.shape[1]
    crowns = []  # (chip, its box, its pixels in the box) of every labelled crown not cut by the chip's edge
    for i in range(n):
        labels, _ = ndimage.label((y[i, ..., 0] == 1) | (y[i, ..., 0] == 2))
        for k, slc in enumerate(ndimage.find_objects(labels), start=1):
            if slc is not None and min(slc[0].start, slc[1].start) > 0 and max(slc[0].stop, slc[1].stop) < size:
                crowns.append((i, slc, labels[slc] == k))
    extra = int(round(share * n))
    if not crowns or not extra:
        return x, y
    picks = rng.integers(0, n, extra)
    new_x, new_y = x[picks].copy(), y[picks].copy()
    for t in range(extra):
        for c in rng.integers(0, len(crowns), per_chip):
            i, slc, own = crowns[c]
            h, w = own.shape
            r0, c0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            target = new_y[t, r0:r0 + h, c0:c0 + w]
            if (target[..., 0] != 0)[own].any():  # would cover a crown or ignored pixels: skip
                continue
            new_x[t, r0:r0 + h, c0:c0 + w][own] = x[i][slc][own]
            target[own] = y[i][slc][own]
    return np.concatenate([x, new_x]), np.concatenate([y, new_y])
