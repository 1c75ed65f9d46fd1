"""Our model as Deepness and GeoDeep run it unchanged: `model-peers.onnx` beside `model.onnx`.

What they cannot be told through metadata goes into the graph (docs/DESIGN.md
"Deepness and GeoDeep"): both divide 8-bit values by 255 and GeoDeep then ignores
standardization_mean/std, so our scaling and standardisation come first in the graph
(their metadata says mean 0, std 1); both take a segmentor's channels as classes, so
a trees model's crown probability p becomes two classes [background 1 - p, crown p]
(with seg_thresh = our crown threshold: crown exactly where ours is, for thresholds
from 0.5). Land cover and buildings keep their softmax, with seg_thresh 0: the argmax,
as ours, and GeoDeep's sieve set to ours. Chip classification has no counterpart in
either tool: none is written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..vector.vectorize import MIN_REGION_PIXELS
from .model_package import PEER_ONNX_NAME, ModelInfo

PEER_TASKS = ("landcover", "buildings", "trees")


def peer_metadata(info: ModelInfo) -> dict[str, str]:
    """The keys Deepness's add_model_metadata.py and GeoDeep's yolo2geodeep write, as they write them."""
    trees = info.task == "trees"
    names = ["background", "crown"] if trees else info.class_names
    return {k: json.dumps(v) for k, v in {
        "model_type": "Segmentor",
        "class_names": {str(i): n for i, n in enumerate(names)},
        "resolution": info.resolution_m * 100.0,  # cm/px
        "tiles_size": info.tile_size,
        "tiles_overlap": info.overlap_percent(),
        "standardization_mean": [0.0] * info.band_count,  # done in the graph
        "standardization_std": [1.0] * info.band_count,
        "seg_thresh": info.threshold if trees else 0.0,
        # GeoDeep sieves regions under (2 s)² px (Deepness median-filters s px: nothing at 1): our
        # land-cover sieve of MIN_REGION_PIXELS (4 px, as GDAL's, 4-connected) is s = 1; crowns none.
        "seg_small_segment": 0 if trees else round(math.sqrt(MIN_REGION_PIXELS) / 2),
    }.items()}


def peer_graph(proto, info: ModelInfo):
    """The model with its input taking values / 255 (as the peers feed it) and, for trees,
    its output as [background, crown]."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    model_in = next(i for i in graph.input if i.name not in weights)
    bands = info.band_count
    # x / 255 -> ((x * 255 / scale) - mean) / std  ==  (x - mean * scale / 255) / (std * scale / 255)
    k = info.input_scale / 255.0
    mean = np.asarray(info.mean or [0.0] * bands, np.float32) * k
    std = np.asarray(info.std or [1.0] * bands, np.float32) * k
    peer_in = helper.make_tensor_value_info("image", model_in.type.tensor_type.elem_type, None)
    peer_in.type.CopyFrom(model_in.type)
    graph.initializer.extend([numpy_helper.from_array(mean.reshape(1, bands, 1, 1), "peers/mean"),
                              numpy_helper.from_array(std.reshape(1, bands, 1, 1), "peers/std")])
    head = [helper.make_node("Sub", ["image", "peers/mean"], ["peers/centred"]),
            helper.make_node("Div", ["peers/centred", "peers/std"], [model_in.name])]
    tail = []
    if info.task == "trees":
        out = graph.output[0]
        graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), f"peers/{n}")
                                  for n, v in (("starts", [0]), ("ends", [1]), ("axes", [1]))])
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "peers/one"))
        tail = [helper.make_node("Slice", [out.name, "peers/starts", "peers/ends", "peers/axes"], ["peers/crown"]),
                helper.make_node("Sub", ["peers/one", "peers/crown"], ["peers/background"]),
                helper.make_node("Concat", ["peers/background", "peers/crown"], ["classes"], axis=1)]
        dims = [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim]
        new_out = helper.make_tensor_value_info("classes", out.type.tensor_type.elem_type, [dims[0], 2, *dims[2:]])
        del graph.output[:]
        graph.output.append(new_out)
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    inputs = [peer_in] + [i for i in graph.input if i.name != model_in.name]
    del graph.input[:]
    graph.input.extend(inputs)
    return proto


def write_peer_model(onnx_file: Path, info: ModelInfo, out_dir: Path) -> Path | None:
    """Write `out_dir/model-peers.onnx` for a land-cover, buildings or trees model; None for
    a task neither peer runs (chip classification)."""
    import onnx

    if info.task not in PEER_TASKS:
        return None
    proto = peer_graph(onnx.load(str(onnx_file)), info)
    del proto.metadata_props[:]
    for key, value in peer_metadata(info).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    path = Path(out_dir) / PEER_ONNX_NAME
    onnx.save(proto, str(path))
    return path
