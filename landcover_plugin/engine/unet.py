"""A compact Keras 3 U-Net, small enough to train on a laptop CPU.

Imported only by train.py (it pulls in TensorFlow through Keras).
"""
from __future__ import annotations


def build_unet(tile_size: int, band_count: int, task: str, n_classes: int = 1,
               width: int = 16, depth: int = 3, dead: bool = False):
    """U-Net over (tile, tile, bands) inputs; `depth` poolings, `width` filters at
    full resolution, doubling per level (about 480k parameters at the defaults).

    - landcover: `n_classes`-way softmax.
    - trees: two sigmoid heads, crown probability and centre heatmap, concatenated
      into one 2-channel output (one output keeps the ONNX graph simple); with
      `dead`, a third channel: probability that a crown pixel is a dead crown.
    Heads compute in float32 even under a mixed_float16 policy (GPU), so the
    outputs, and the ONNX export, stay float32.
    """
    import keras
    from keras import layers

    def conv_block(x, filters: int):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization(momentum=0.9)(x)  # few steps per epoch: converge fast
            x = layers.Activation("relu")(x)
        return x

    inputs = keras.Input((tile_size, tile_size, band_count), name="input")
    x, skips = inputs, []
    for level in range(depth):
        x = conv_block(x, width * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = conv_block(x, width * 2**depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(width * 2**level, 2, strides=2, padding="same")(x)
        x = conv_block(layers.Concatenate()([x, skips[level]]), width * 2**level)
    if task == "trees":
        heads = [layers.Conv2D(1, 1, activation="sigmoid", name="crown", dtype="float32")(x),
                 # Start the heatmap near its mostly-zero target (CenterNet's bias trick).
                 layers.Conv2D(1, 1, activation="sigmoid", name="heatmap", dtype="float32",
                               bias_initializer=keras.initializers.Constant(-2.0))(x)]
        if dead:
            heads.append(layers.Conv2D(1, 1, activation="sigmoid", name="dead", dtype="float32")(x))
        outputs = layers.Concatenate(name="output", dtype="float32")(heads)
    else:
        outputs = layers.Conv2D(n_classes, 1, activation="softmax", name="output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"unet_{task}")
