"""A random forest over per-pixel features, for few labels at medium resolution (the
Semi-Automatic Classification Plugin's and dzetsaka's kind of model, the bar a network must beat).

Features per pixel: the bands (as normalised for the U-Net), spectral indices when band roles
are known (NDVI, NDWI, NDBI from `--bands`), and the 5 x 5 neighbourhood mean and standard
deviation of each band. They are computed by ONNX operators, and the exported model is
    features (ONNX ops) -> scikit-learn forest (skl2onnx, ai.onnx.ml) -> probabilities,
reshaped so that it takes the U-Net's NCHW tiles and returns its (N, C, H, W) class
probabilities: predict, quantize, the metadata and Deepness see one kind of model. Training
runs the very same feature graph (onnxruntime) on the chips, so features cannot drift
between training and prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ...contract.names import IGNORE
from ..errors import EngineError

OPSET = {"": 17, "ai.onnx.ml": 3}
IR_VERSION = 8  # opset 17's: what every onnxruntime reading opset 17 accepts (onnx's newest is not)
RADIUS = 2  # neighbourhood: (2 * RADIUS + 1) pixels square
ROLES = ("blue", "green", "red", "nir", "swir1", "swir2")
# Normalised differences (a - b) / (a + b), each computed when both roles are given.
INDICES = {"ndvi": ("nir", "red"), "ndwi": ("green", "nir"), "ndbi": ("swir1", "nir")}
MAX_PIXELS = 200_000  # training pixels sampled: a forest gains little beyond, and its file grows
EPS = 1e-6
TILE = 256  # the smallest tile predict runs a forest on: pixel features need no chip-sized tiles


@dataclass(frozen=True)
class ForestParams:
    trees: int = 100
    min_leaf: int = 2  # pixels per leaf: smaller leaves memorise single noisy pixels
    seed: int = 0


def parse_roles(text: str | None, band_count: int) -> dict[str, int]:
    """`--bands "blue=1,green=2,red=3,nir=4,swir1=5"` -> {role: 1-based band}."""
    if not text:
        return {}
    roles = {}
    for part in text.split(","):
        role, _, band = part.partition("=")
        role = role.strip().lower()
        if role not in ROLES or not band.strip().isdigit() or not 1 <= int(band) <= band_count:
            raise EngineError("BAD_BANDS", f"--bands: '{part}' is not ROLE=BAND with a role of {', '.join(ROLES)} "
                              f"and a band between 1 and {band_count}.",
                              "Use e.g. --bands blue=1,green=2,red=3,nir=4,swir1=5,swir2=6 (Landsat TM/ETM+).")
        roles[role] = int(band)
    return roles


def index_names(roles: dict[str, int]) -> list[str]:
    return [name for name, (a, b) in INDICES.items() if a in roles and b in roles]


def feature_names(band_count: int, roles: dict[str, int]) -> list[str]:
    bands = [f"b{i + 1}" for i in range(band_count)]
    return bands + index_names(roles) + [f"{b}_mean" for b in bands] + [f"{b}_sd" for b in bands]


def _feature_nodes(band_count: int, mean: list[float], std: list[float], roles: dict[str, int], x: str, out: str):
    """ONNX nodes and initialisers: normalised input `x` (N, B, H, W) -> features `out` (N, F, H, W)."""
    from onnx import helper, numpy_helper

    def const(name: str, value, dtype=np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name
    inits: list = []
    shape = [1, band_count, 1, 1]
    nodes = [helper.make_node("Mul", [x, const("lc_std", np.reshape(std, shape))], ["lc_scaled"]),
             helper.make_node("Add", ["lc_scaled", const("lc_mean", np.reshape(mean, shape))], ["lc_raw"])]
    parts = [x]
    for name in index_names(roles):
        a, b = (roles[r] - 1 for r in INDICES[name])
        ia, ib = const(f"lc_{name}_ia", [a], np.int64), const(f"lc_{name}_ib", [b], np.int64)
        nodes += [helper.make_node("Gather", ["lc_raw", ia], [f"lc_{name}_a"], axis=1),
                  helper.make_node("Gather", ["lc_raw", ib], [f"lc_{name}_b"], axis=1),
                  helper.make_node("Sub", [f"lc_{name}_a", f"lc_{name}_b"], [f"lc_{name}_num"]),
                  helper.make_node("Add", [f"lc_{name}_a", f"lc_{name}_b"], [f"lc_{name}_sum"]),
                  helper.make_node("Abs", [f"lc_{name}_sum"], [f"lc_{name}_abs"]),
                  helper.make_node("Add", [f"lc_{name}_abs", const(f"lc_{name}_eps", EPS)], [f"lc_{name}_den"]),
                  helper.make_node("Div", [f"lc_{name}_num", f"lc_{name}_den"], [f"lc_{name}"])]
        parts.append(f"lc_{name}")
    k = 2 * RADIUS + 1
    pool = {"kernel_shape": [k, k], "pads": [RADIUS] * 4, "strides": [1, 1], "count_include_pad": 0}
    nodes += [helper.make_node("AveragePool", [x], ["lc_local_mean"], **pool),
              helper.make_node("Mul", [x, x], ["lc_square"]),
              helper.make_node("AveragePool", ["lc_square"], ["lc_local_square"], **pool),
              helper.make_node("Mul", ["lc_local_mean", "lc_local_mean"], ["lc_mean_square"]),
              helper.make_node("Sub", ["lc_local_square", "lc_mean_square"], ["lc_local_var"]),
              helper.make_node("Relu", ["lc_local_var"], ["lc_local_var_pos"]),  # rounding can make it -0.0001
              helper.make_node("Sqrt", ["lc_local_var_pos"], ["lc_local_sd"]),
              helper.make_node("Concat", [*parts, "lc_local_mean", "lc_local_sd"], [out], axis=1)]
    return nodes, inits


def _model(nodes, inits, inputs, outputs):
    from onnx import helper

    graph = helper.make_graph(nodes, "landcover_forest", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSET.items()],
                             producer_name="landcover", ir_version=IR_VERSION)


def features_model(band_count: int, mean: list[float], std: list[float], roles: dict[str, int]):
    """The feature graph alone, any tile size: what training computes features with."""
    from onnx import TensorProto, helper

    nodes, inits = _feature_nodes(band_count, mean, std, roles, "input", "features")
    tensor = helper.make_tensor_value_info
    return _model(nodes, inits, [tensor("input", TensorProto.FLOAT, ["n", band_count, "h", "w"])],
                  [tensor("features", TensorProto.FLOAT, ["n", None, "h", "w"])])


def feature_batches(model, x_nhwc: np.ndarray, batch: int = 64) -> Iterator[np.ndarray]:
    """Features (n, H, W, F) of normalised chips (N, H, W, B), batch by batch, by the ONNX feature graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i in range(0, len(x_nhwc), batch):
        yield session.run(None, {"input": np.ascontiguousarray(x_nhwc[i:i + batch].transpose(0, 3, 1, 2))})[0] \
            .transpose(0, 2, 3, 1)


def training_pixels(model, x_nhwc: np.ndarray, y: np.ndarray, seed: int, batch: int = 64
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Features and classes of the labelled pixels, about MAX_PIXELS of them at most (a seeded
    sample drawn batch by batch: the features of every chip never sit in memory at once)."""
    labels = y[..., 0]
    share = min(1.0, MAX_PIXELS / max(int(np.sum(labels != IGNORE)), 1))
    rng = np.random.default_rng(seed)
    features, classes = [], []
    for i, f in zip(range(0, len(x_nhwc), batch), feature_batches(model, x_nhwc, batch)):
        part = labels[i:i + batch]
        pick = (part != IGNORE) & (rng.random(part.shape) < share)
        features.append(f[pick])
        classes.append(part[pick].astype(np.int64))
    return np.concatenate(features), np.concatenate(classes)


def fit_forest(f: np.ndarray, c: np.ndarray, params: ForestParams):
    """A random forest; classes weighted by their training pixels (balanced), so small classes count."""
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=params.trees, min_samples_leaf=params.min_leaf,
                                    class_weight="balanced", n_jobs=-1, random_state=params.seed)
    return forest.fit(f, c)


def export_forest(forest, path: Path, band_count: int, n_classes: int, mean: list[float],
                  std: list[float], roles: dict[str, int]) -> None:
    """The whole model as one ONNX file: NCHW tiles (of any size: the metadata's tile size is
    the one predict uses) in, (N, C, H, W) probabilities out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from skl2onnx import to_onnx

    n_features = len(feature_names(band_count, roles))
    skl = to_onnx(forest, np.zeros((1, n_features), np.float32), options={"zipmap": False}, target_opset=OPSET)
    x_name, prob_name = skl.graph.input[0].name, "probabilities"
    nodes, inits = _feature_nodes(band_count, mean, std, roles, "input", "lc_features")
    # The forest knows only the classes it saw: a 0/1 matrix puts its columns at their class index.
    onehot = np.zeros((len(forest.classes_), n_classes), np.float32)
    onehot[np.arange(len(forest.classes_)), forest.classes_.astype(int)] = 1.0
    inits += [numpy_helper.from_array(np.array([-1, n_features], np.int64), "lc_flat_shape"),
              numpy_helper.from_array(onehot, "lc_onehot"),
              numpy_helper.from_array(np.array([0, 2, 3], np.int64), "lc_nhw"),
              numpy_helper.from_array(np.array([n_classes], np.int64), "lc_c")]
    nodes += [helper.make_node("Transpose", ["lc_features"], ["lc_nhwf"], perm=[0, 2, 3, 1]),
              helper.make_node("Reshape", ["lc_nhwf", "lc_flat_shape"], [x_name]),
              *skl.graph.node,
              helper.make_node("MatMul", [prob_name, "lc_onehot"], ["lc_class_probs"]),
              helper.make_node("Shape", ["input"], ["lc_in_shape"]),
              helper.make_node("Gather", ["lc_in_shape", "lc_nhw"], ["lc_nhw_dims"]),
              helper.make_node("Concat", ["lc_nhw_dims", "lc_c"], ["lc_nhwc_shape"], axis=0),
              helper.make_node("Reshape", ["lc_class_probs", "lc_nhwc_shape"], ["lc_nhwc"]),
              helper.make_node("Transpose", ["lc_nhwc"], ["output"], perm=[0, 3, 1, 2])]
    tensor = helper.make_tensor_value_info
    model = _model(nodes, inits + list(skl.graph.initializer),
                   [tensor("input", TensorProto.FLOAT, ["batch", band_count, "height", "width"])],
                   [tensor("output", TensorProto.FLOAT, ["batch", n_classes, "height", "width"])])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def predict_onnx(path: Path, x_nhwc: np.ndarray, batch: int = 16) -> np.ndarray:
    """The exported model's probabilities (N, H, W, C) on normalised chips (N, H, W, B) of any size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [session.run(None, {"input": np.ascontiguousarray(x_nhwc[i:i + batch].transpose(0, 3, 1, 2))})[0]
           for i in range(0, len(x_nhwc), batch)]
    return np.concatenate(out).transpose(0, 2, 3, 1)
