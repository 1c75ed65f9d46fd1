"""Tiles larger than a model was trained on, for throughput.

A U-Net is fully convolutional: it runs on any tile whose side its pooling
divides. Its seams need only the context it was trained with (the tile
overlap, kept as it is), so a larger tile runs fewer pixels twice: 128 px
tiles overlapping by 16 px on each side run 1.78 x the pixels, 256 px ones
1.31 x (docs/DESIGN.md "Throughput"). The model file keeps its fixed
shapes; the session gets a copy whose height and width are free, checked to
give the same output as the original before it is used.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

THROUGHPUT_TILE = 256  # trees-base: per-pixel speed the same at 128 and 256 px, 25% lower at 512 (caches)
SAME_OUTPUT_ATOL = 1e-4  # the freed copy against the original on one tile of the original's size


def free_spatial_dims(model_bytes: bytes, tile: int) -> bytes | None:
    """The model with its input's and outputs' height and width free instead of `tile`, or None
    when its graph ties them elsewhere than in shape constants of Reshapes that keep their
    input's shape (such a Reshape, e.g. tf2onnx's (-1, 1, 128, 128) after a Sigmoid, becomes
    a copy of its input's dims)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    for value in list(graph.input[:1]) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 4 or [d.dim_value for d in dims[2:]] != [tile, tile]:
            return None
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    shapes = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in shapes:
            continue
        shape = numpy_helper.to_array(shapes[node.input[1]])
        if tile not in shape.tolist():
            continue
        if len(shape) != 4 or shape.tolist()[2:] != [tile, tile]:
            return None
        shapes[node.input[1]].CopyFrom(numpy_helper.from_array(np.zeros(4, np.int64), node.input[1]))
    del graph.value_info[:]  # inferred for the old size
    return model.SerializeToString()


def resized_model(model_file: Path, tile: int, size: int, bands: int, session_for) -> bytes | None:
    """The model's bytes for `size` px tiles (it was made for `tile` px), or None when it
    cannot run them: shapes tied in its graph, a side its pooling does not divide, or an
    output that differs from the original's on a tile of the original size.
    `session_for(bytes)` opens an onnxruntime session as predict does."""
    original = model_file.read_bytes()
    freed = free_spatial_dims(original, tile)
    if freed is None:
        return None
    x = np.random.default_rng(0).standard_normal((1, bands, tile, tile)).astype(np.float32)
    try:
        reference, session = session_for(original), session_for(freed)
        name = session.get_inputs()[0].name
        same = np.allclose(session.run(None, {name: x})[0], reference.run(None, {name: x})[0], atol=SAME_OUTPUT_ATOL)
        big = session.run(None, {name: np.zeros((1, bands, size, size), np.float32)})[0]
    except Exception:  # noqa: BLE001 - onnxruntime's untyped errors: the model cannot run other sizes
        return None
    return freed if same and big.ndim == 4 and big.shape[2:] == (size, size) else None
