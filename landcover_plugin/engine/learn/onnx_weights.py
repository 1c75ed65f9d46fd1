"""A Keras model to fine-tune, rebuilt from an ONNX model package alone.

Our exports are the compact U-Net (unet.py) through tf2onnx, which folds each
BatchNormalization into the convolution before it: the Conv node carries the scaled
kernel and the folded bias (export.py may split a convolution after a skip's Concat
in two; they are joined again). Rebuilding the same architecture (width from the first
convolution, depth from the poolings, heads from the metadata) and taking the Conv and
ConvTranspose initializers in graph order gives the same function; the BatchNorm layers
get identity statistics plus that bias, and `calibrate_batchnorm` later sets statistics
measured on the user's chips, so training-mode normalisation starts where inference
stands. The result is checked against onnxruntime before it is used.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EngineError
from .model_package import ModelInfo

TOLERANCE = 1e-3  # outputs are probabilities: 1e-3 is far below any map difference
NOT_RESTORABLE = ("Fine-tune from a model folder that holds model.keras (every `landcover train` writes one), "
                  "or train from scratch.")


def keras_from_onnx(path: Path, info: ModelInfo):
    """The Keras U-Net with the ONNX model's weights; BASE_NOT_RESTORABLE when the graph is
    not one of our compact U-Nets or the rebuilt model computes something else."""
    import onnx
    from onnx import numpy_helper

    from .unet import build_unet

    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    pools = sum(n.op_type == "MaxPool" for n in graph.node)
    if info.task not in ("trees", "landcover", "buildings") or not convs or convs[0].input[1] not in weights:
        raise EngineError("BASE_NOT_RESTORABLE", f"{path} is not a U-Net exported by landcover.", NOT_RESTORABLE)
    width = weights[convs[0].input[1]].shape[0]
    dead = info.task == "trees" and "dead" in info.class_names
    model = build_unet(info.tile_size, info.band_count, info.task, len(info.class_names), width=int(width),
                       depth=pools, dead=dead)
    _load(model, convs, weights, path)
    _check(model, path, info)
    return model


def _layers(model, kind: str) -> list:
    return [layer for layer in model.layers if type(layer).__name__ == kind]


def _body_convs(convs: list, weights: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(kernel, folded bias) of each 3x3 convolution in graph order; a convolution that
    export.py split by input channels (`NAME/partK/w`, after a skip's Concat) is joined again."""
    found: list[tuple[np.ndarray, np.ndarray | None]] = []
    parts: dict[str, int] = {}  # split convolution -> its index in `found`
    for node in convs:
        kernel = weights.get(node.input[1])
        if node.op_type != "Conv" or kernel is None or kernel.shape[2:] != (3, 3):
            continue
        bias = weights.get(node.input[2]) if len(node.input) > 2 else None
        whole = node.input[1].rsplit("/part", 1)[0] if "/part" in node.input[1] else None
        if whole in parts:
            first, first_bias = found[parts[whole]]
            found[parts[whole]] = (np.concatenate([first, kernel], axis=1), first_bias if bias is None else bias)
            continue
        if whole:
            parts[whole] = len(found)
        found.append((kernel, bias))
    return found


def _load(model, convs: list, weights: dict[str, np.ndarray], path: Path) -> None:
    body = _body_convs(convs, weights)
    transposed = [n for n in convs if n.op_type == "ConvTranspose"]
    heads = [n for n in convs if n.op_type == "Conv" and weights[n.input[1]].shape[2:] == (1, 1)]
    k_body = [c for c in _layers(model, "Conv2D") if c.kernel_size == (3, 3)]
    k_heads = [c for c in _layers(model, "Conv2D") if c.kernel_size == (1, 1)]
    k_norms, k_transposed = _layers(model, "BatchNormalization"), _layers(model, "Conv2DTranspose")
    if (len(body), len(transposed), len(heads)) != (len(k_body), len(k_transposed), len(k_heads)):
        raise EngineError("BASE_NOT_RESTORABLE", f"{path}'s layers do not match the U-Net it names.", NOT_RESTORABLE)
    # Heads by name (their order in the graph is not fixed), the rest in graph order.
    if len(k_heads) > 1:
        heads = [next(n for n in heads if f"/{layer.name}_" in n.input[1] or f"/{layer.name}/" in n.input[1])
                 for layer in k_heads]
    try:
        for (kernel, bias), conv, norm in zip(body, k_body, k_norms):
            conv.set_weights([kernel.transpose(2, 3, 1, 0)])
            bias = np.zeros(conv.filters, np.float32) if bias is None else bias
            ones = np.ones_like(bias)
            norm.set_weights([np.sqrt(ones + norm.epsilon), bias, np.zeros_like(bias), ones])
        for node, layer in zip(transposed, k_transposed):
            layer.set_weights([weights[node.input[1]].transpose(2, 3, 1, 0), weights[node.input[2]].reshape(-1)])
        for node, layer in zip(heads, k_heads):
            layer.set_weights([weights[node.input[1]].transpose(2, 3, 1, 0), weights[node.input[2]].reshape(-1)])
    except (ValueError, KeyError, IndexError, StopIteration) as exc:
        raise EngineError("BASE_NOT_RESTORABLE", f"{path}'s weights do not fit the U-Net it names: {exc}",
                          NOT_RESTORABLE) from None


def _check(model, path: Path, info: ModelInfo) -> None:
    """The rebuilt model computes what the ONNX model does, on random input."""
    import onnxruntime as ort

    x = np.random.default_rng(0).normal(size=(2, info.tile_size, info.tile_size, info.band_count)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})[0]
    got = np.asarray(model(x, training=False)).transpose(0, 3, 1, 2)
    if got.shape != expected.shape or float(np.abs(got - expected).max()) > TOLERANCE:
        raise EngineError("BASE_NOT_RESTORABLE", f"The model rebuilt from {path} does not compute what it does.",
                          NOT_RESTORABLE)


def calibrate_batchnorm(model, chips: np.ndarray) -> None:
    """Give each BatchNorm the mean and variance of its input on `chips`, keeping the
    function: gamma = sqrt(var + eps), beta = bias + mean, so that y = x + bias as before,
    and a training step's batch statistics start close to the stored ones."""
    import keras

    norms = _layers(model, "BatchNormalization")
    probe = keras.Model(model.input, [norm.input for norm in norms])
    outputs = probe(chips, training=False)
    for norm, x in zip(norms, outputs):
        x = np.asarray(x, dtype=np.float64)
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        gamma, beta, old_mean, old_var = norm.get_weights()
        bias = beta - gamma * old_mean / np.sqrt(old_var + norm.epsilon)  # y = x * scale + bias now
        norm.set_weights([np.sqrt(var + norm.epsilon).astype(np.float32), (bias + mean).astype(np.float32),
                          mean.astype(np.float32), var.astype(np.float32)])
