"""A compact Keras 3 U-Net, small enough to train on a laptop CPU; optionally
with an ImageNet-pretrained MobileNetV2 encoder read from a local weights file;
and the chip classifier (an encoder, global pooling, softmax).

Imported only by train.py (it pulls in TensorFlow through Keras).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import EngineError

ENCODERS = ("unet", "mobilenetv2")
# MobileNetV2 activations at 1/2, 1/4, 1/8 and 1/16 of the input (the skips), then 1/32.
MOBILENET_SKIPS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu")
MOBILENET_WEIGHTS = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
MOBILENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
# torchvision's ImageNet weights, fetched at setup into data/imagenet/ (resources/sample-data.json).
TORCHVISION_WEIGHTS = "mobilenet_v2-b0353104.pth"
TORCH_SUFFIXES = (".pth", ".pt")
TORCH_BN_EPSILON = 1e-5  # torch's BatchNorm2d default; Keras's is 1e-3


def build_unet(tile_size: int, band_count: int, task: str, n_classes: int = 1,
               width: int = 16, depth: int = 3, dead: bool = False, encoder: str = "unet",
               encoder_weights: Path | None = None):
    """U-Net over (tile, tile, bands) inputs; `depth` poolings, `width` filters at
    full resolution, doubling per level (about 480k parameters at the defaults).

    - landcover, buildings: `n_classes`-way softmax.
    - trees: two sigmoid heads, crown probability and centre heatmap, concatenated
      into one 2-channel output (one output keeps the ONNX graph simple); with
      `dead`, a third channel: probability that a crown pixel is a dead crown.
    Heads compute in float32 even under a mixed_float16 policy (GPU), so the
    outputs, and the ONNX export, stay float32.
    With `encoder="mobilenetv2"` the contracting half is MobileNetV2 (see
    `mobilenet_encoder`), `depth` is then fixed by it (5 poolings).
    """
    import keras
    from keras import layers

    if encoder != "unet":
        return _pretrained_unet(tile_size, band_count, task, n_classes, width, dead, encoder, encoder_weights)
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
    return keras.Model(inputs, _heads(x, task, n_classes, dead), name=f"unet_{task}")


def conv_block(x, filters: int):
    from keras import layers

    for _ in range(2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)  # few steps per epoch: converge fast
        x = layers.Activation("relu")(x)
    return x


def _heads(x, task: str, n_classes: int, dead: bool):
    import keras
    from keras import layers

    if task == "trees":
        heads = [layers.Conv2D(1, 1, activation="sigmoid", name="crown", dtype="float32")(x),
                 # Start the heatmap near its mostly-zero target (CenterNet's bias trick).
                 layers.Conv2D(1, 1, activation="sigmoid", name="heatmap", dtype="float32",
                               bias_initializer=keras.initializers.Constant(-2.0))(x)]
        if dead:
            heads.append(layers.Conv2D(1, 1, activation="sigmoid", name="dead", dtype="float32")(x))
        return layers.Concatenate(name="output", dtype="float32")(heads)
    return layers.Conv2D(n_classes, 1, activation="softmax", name="output", dtype="float32")(x)


def _pretrained_unet(tile: int, bands: int, task: str, n_classes: int, width: int, dead: bool,
                     encoder: str, weights: Path | None):
    """U-Net decoder over the MobileNetV2 encoder (one nested layer named "encoder",
    so that --freeze-encoder freezes exactly it)."""
    import keras
    from keras import layers

    backbone = mobilenet_encoder(tile, bands, weights)
    inputs = keras.Input((tile, tile, bands), name="input")
    *skips, x = backbone(inputs)
    for level, skip in reversed(list(enumerate(skips, start=1))):  # 1/16 .. 1/2
        x = layers.Conv2DTranspose(width * 2 ** (level - 1), 2, strides=2, padding="same")(x)
        x = conv_block(layers.Concatenate()([x, skip]), width * 2 ** (level - 1))
    x = layers.Conv2DTranspose(width, 2, strides=2, padding="same")(x)  # back to full resolution
    x = conv_block(layers.Concatenate()([x, inputs]), width)
    return keras.Model(inputs, _heads(x, task, n_classes, dead), name=f"{encoder}_unet_{task}")


def build_classifier(tile_size: int, band_count: int, n_classes: int, width: int = 16, depth: int = 3,
                     encoder: str = "unet", encoder_weights: Path | None = None):
    """Chip classifier: the U-Net's encoder (or MobileNetV2), global average pooling
    and a `n_classes`-way softmax: one class per chip, output (n, n_classes)."""
    import keras
    from keras import layers

    inputs = keras.Input((tile_size, tile_size, band_count), name="input")
    if encoder == "unet":
        x = inputs
        for level in range(depth):
            x = layers.MaxPooling2D()(conv_block(x, width * 2**level))
        x = conv_block(x, width * 2**depth)
    else:
        x = mobilenet_encoder(tile_size, band_count, encoder_weights)(inputs)[-1]
    x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(x))
    outputs = layers.Dense(n_classes, activation="softmax", name="output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{encoder}_classifier")


def mobilenet_encoder(tile: int, bands: int, weights: Path | None):
    """Keras applications' MobileNetV2 (no top) as a model with five outputs: the
    skips at 1/2..1/16 and the features at 1/32. `weights`: a local weights file
    (nothing is downloaded at run time); None: random initialisation.

    ImageNet weights are for 3 bands (RGB). For another band count the first
    convolution's kernel is adapted: its mean over R, G, B is given to every band,
    scaled by 3/bands, so a band-average input gives the same first activations."""
    import keras

    if tile % 32:
        raise EngineError("BAD_CHIP_SIZE", f"MobileNetV2 pools 5 times: its chips must be a multiple of 32 px, "
                          f"not {tile}.", "Rebuild the dataset with e.g. --chip-size 128 or 256.")
    if weights is not None and not Path(weights).is_file():
        raise EngineError("ENCODER_WEIGHTS_NOT_FOUND", f"No encoder weights file at {weights}.",
                          f"Nothing is downloaded while training: on a machine with internet, download "
                          f"{MOBILENET_WEIGHTS} from {MOBILENET_URL}, copy it here and give its path with "
                          f"--encoder-weights (or torchvision's data/imagenet/{TORCHVISION_WEIGHTS}, fetched "
                          "by scripts/install.sh); or leave out --encoder-weights to start from random weights.")
    alpha = _alpha(weights)
    net = keras.applications.MobileNetV2(input_shape=(tile, tile, bands), include_top=False, weights=None,
                                         alpha=alpha)
    if weights is not None:
        _load_encoder_weights(net, Path(weights), tile, bands, alpha)
    outputs = [net.get_layer(name).output for name in MOBILENET_SKIPS] + [net.output]
    return keras.Model(net.input, outputs, name="encoder")


def _alpha(weights: Path | None) -> float:
    """MobileNetV2's width multiplier, read from Keras's weights file name (..._0.35_224_no_top.h5)."""
    match = re.search(r"_(\d\.\d+)_\d+_no_top", Path(weights).name) if weights else None
    return float(match.group(1)) if match else 1.0


def _load_torchvision_weights(net, path: Path) -> None:
    """torchvision's ImageNet MobileNetV2 (.pth, read without torch) into a Keras
    MobileNetV2 (alpha 1.0, no top); see torch_weights.py for the mapping."""
    from .torch_weights import mobilenet_v2_keras_weights, read_legacy_pth

    for name, values in mobilenet_v2_keras_weights(read_legacy_pth(path)).items():
        net.get_layer(name).set_weights(values)  # ValueError on a shape mismatch


def _load_encoder_weights(net, path: Path, tile: int, bands: int, alpha: float) -> None:
    import keras
    import numpy as np

    rgb = net if bands == 3 else keras.applications.MobileNetV2(
        input_shape=(tile, tile, 3), include_top=False, weights=None, alpha=alpha)
    from_torch = path.suffix in TORCH_SUFFIXES
    try:
        if from_torch:
            _load_torchvision_weights(rgb, path)
        else:
            rgb.load_weights(str(path))
    except (OSError, ValueError, KeyError) as exc:  # TorchFileError is a ValueError
        raise EngineError("ENCODER_WEIGHTS_BAD", f"{path.name} is not a MobileNetV2 (alpha {alpha:g}, no top) "
                          f"weights file: {exc}",
                          f"Give Keras's {MOBILENET_WEIGHTS} (or another alpha's *_no_top.h5), or "
                          f"torchvision's {TORCHVISION_WEIGHTS} (data/imagenet/ after setup).") from None
    if from_torch:  # torch's BN epsilon, also on the multi-band copy
        for layer in net.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.epsilon = TORCH_BN_EPSILON
    if rgb is net:
        return
    for src, dst in zip(rgb.layers, net.layers):
        values = src.get_weights()
        if src.name == "Conv1":  # (3, 3, 3, filters) -> (3, 3, bands, filters)
            mean = values[0].mean(axis=2, keepdims=True)
            values = [np.repeat(mean * 3.0 / bands, bands, axis=2)]
        dst.set_weights(values)
