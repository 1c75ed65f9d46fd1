"""Keras model -> ONNX (tf2onnx, opset 17), rewritten into the operators onnxruntime runs
fastest on CPUs, and checked against Keras (docs/DESIGN.md: one export path)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EngineError


MAX_ONNX_DIFF = 1e-4


def export_onnx(model, path: Path, tile: int, bands: int) -> None:
    """Keras -> ONNX (opset 17), NCHW in and out as Deepness expects."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec([None, tile, tile, bands], tf.float32, name="input")]
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(*spec).outputs[0]
    output = concrete.name  # "Identity:0"
    image_out = len(concrete.shape) == 4  # chip classes are (n, classes): nothing to transpose
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17, inputs_as_nchw=["input:0"],
                                             outputs_as_nchw=[output] if image_out else None)
    if [o.name for o in proto.graph.output] != [output]:
        raise AssertionError(f"unexpected ONNX outputs {[o.name for o in proto.graph.output]}")
    import onnx

    onnx.save(concat_conv_as_sum(channel_softmax_as_ops(proto)), str(path))


def channel_softmax_as_ops(proto):
    """Softmax over the channels of an NCHW tensor, written as exp(x - max) / sum.
    Same output; onnxruntime's CPU Softmax on a non-last axis transposes the tensor
    there and back, which took 15% of the U-Net's time; these ops take 1.5%."""
    from onnx import helper, numpy_helper

    nodes = []
    for node in proto.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if node.op_type != "Softmax" or axis != 1:
            nodes.append(node)
            continue
        x, y, p = node.input[0], node.output[0], node.output[0] + "/softmax"
        proto.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), p + "/axes"))
        nodes += [helper.make_node("ReduceMax", [x], [p + "/max"], axes=[1], keepdims=1),  # opset 17: an attribute
                  helper.make_node("Sub", [x, p + "/max"], [p + "/shifted"]),
                  helper.make_node("Exp", [p + "/shifted"], [p + "/exp"]),
                  helper.make_node("ReduceSum", [p + "/exp", p + "/axes"], [p + "/sum"], keepdims=1),
                  helper.make_node("Div", [p + "/exp", p + "/sum"], [y])]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def concat_conv_as_sum(proto):
    """Conv(Concat([a, b], channels)) written as Conv(a, W_a) + Conv(b, W_b), W split by
    input channels: the same output (a convolution sums over its input channels, and
    zero padding pads each part alike). The U-Net's decoder concatenates each upsampled
    map with its skip; onnxruntime's blocked (NCHWc) layout has no Concat there, so it
    converted both maps back and forth (reorders and Concat: 17% of the time, 5% after);
    the Add folds into the second Conv."""
    from onnx import helper, numpy_helper, shape_inference

    shapes = shape_inference.infer_shapes(proto).graph
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in list(shapes.value_info) + list(shapes.input)
                if len(v.type.tensor_type.shape.dim) == 4}
    weights = {t.name: t for t in proto.graph.initializer}
    users: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in proto.graph.output}

    def split(concat) -> bool:  # a channel Concat whose only user is a plain Conv with known weights
        if concat.op_type != "Concat" or concat.output[0] in graph_outputs or len(concat.input) < 2:
            return False
        axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
        convs = users.get(concat.output[0], [])
        return (axis == 1 and len(convs) == 1 and convs[0].op_type == "Conv" and convs[0].input[1] in weights
                and all(a.i == 1 for a in convs[0].attribute if a.name == "group")
                and all(channels.get(name) for name in concat.input))

    concats = {n.output[0]: n for n in proto.graph.node if split(n)}
    nodes = []
    for node in proto.graph.node:
        if node.output[0] in concats:
            continue
        if node.op_type != "Conv" or node.input[0] not in concats:
            nodes.append(node)
            continue
        parts = concats[node.input[0]].input
        w = numpy_helper.to_array(weights[node.input[1]])
        bounds = np.cumsum([0] + [channels[p] for p in parts])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        total = None
        for k, part in enumerate(parts):
            name = f"{node.output[0]}/part{k}"
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, bounds[k]:bounds[k + 1]]),
                                                                   name + "/w"))
            bias = [node.input[2]] if k == 0 and len(node.input) > 2 else []
            nodes.append(helper.make_node("Conv", [part, name + "/w", *bias], [name], **attrs))
            if total is not None:
                out = node.output[0] if k == len(parts) - 1 else name + "/sum"
                nodes.append(helper.make_node("Add", [total, name], [out]))
                name = out
            total = name
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in proto.graph.initializer if t.name in used]  # the whole kernels are split now
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


def check_onnx(path: Path, model, x: np.ndarray) -> float:
    """Largest difference between ONNX and Keras outputs on `x` (NHWC); raise if too large."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})[0]
    want = model(x, training=False).numpy()
    want = want.transpose(0, 3, 1, 2) if want.ndim == 4 else want
    diff = float(np.max(np.abs(got - want)))
    if got.shape != want.shape or diff > MAX_ONNX_DIFF:
        raise EngineError("EXPORT_MISMATCH", f"The ONNX export differs from the Keras model (max {diff:.2e}, "
                          f"shapes {got.shape} vs {want.shape}).",
                          "This is a bug in the export; please report it with the log.")
    return diff
