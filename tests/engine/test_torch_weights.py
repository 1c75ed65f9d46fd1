"""torchvision's ImageNet MobileNetV2 weights (.pth, torch's legacy format) read
without torch and loaded into the Keras encoder; the real file fetched at setup."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.learn.torch_weights import TorchFileError, mobilenet_v2_keras_weights, read_legacy_pth

from conftest import DATA, ROOT, _need
from test_tasks import CHIP

PTH = "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module")
def pth() -> Path:
    return _need(DATA / "imagenet" / PTH)


@pytest.fixture(scope="module")
def state(pth) -> dict[str, np.ndarray]:
    return read_legacy_pth(pth)


def test_reader_gives_every_tensor_of_the_pinned_file(pth, state):
    wheel = next(w for w in json.loads((ROOT / "resources" / "sample-data.json").read_text())["wheels"]
                 if w["into"] == "imagenet")
    assert hashlib.sha256(pth.read_bytes()).hexdigest() == next(iter(wheel["files"].values()))
    assert len(state) == 314  # 52 convs and BNs (5 tensors each) + the classifier's 2
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3) and state["features.0.0.weight"].dtype == np.float32
    assert state["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)  # depthwise
    assert state["features.18.1.running_var"].shape == (1280,)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert state["features.0.1.num_batches_tracked"].dtype == np.int64
    # Trained weights, not zeros or garbage: BN variances positive, kernels of ImageNet scale.
    assert all((v > 0).all() for k, v in state.items() if k.endswith("running_var"))
    assert 0.01 < np.abs(state["features.0.0.weight"]).mean() < 1


def test_mapping_covers_every_keras_layer(state):
    import keras

    net = keras.applications.MobileNetV2(input_shape=(CHIP, CHIP, 3), include_top=False, weights=None)
    mapped = mobilenet_v2_keras_weights(state)
    assert set(mapped) == {layer.name for layer in net.layers if layer.weights}
    for name, values in mapped.items():
        assert [w.shape for w in values] == [tuple(w.shape) for w in net.get_layer(name).weights], name


def test_train_with_the_imagenet_encoder(pth, state, tmp_path, capsys):
    """`landcover train --encoder mobilenetv2 --encoder-weights ...pth --freeze-encoder`: the
    encoder holds the ImageNet weights (Conv1 is torch's kernel transposed, BN statistics
    and torch's BN epsilon, kept in the saved model) and the decoder trains."""
    import keras
    from rasterio.windows import Window

    from landcover_plugin.engine.cli import main
    from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset

    from conftest import crop_raster
    from test_tasks import quiet

    imagery = crop_raster(_need(DATA / "deepforest" / "OSBS_029.tif"), Window(0, 0, 96, 96), tmp_path / "crop.tif")
    build_dataset(DatasetParams(imagery=imagery, labels=_need(DATA / "deepforest" / "OSBS_029.csv"), task="trees",
                                out=tmp_path / "ds", chip_size=CHIP), quiet())
    code = main(["--json", "train", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "m"), "--epochs", "1",
                 "--encoder", "mobilenetv2", "--encoder-weights", str(pth), "--freeze-encoder"])
    assert code == 0, capsys.readouterr().out[-2000:]
    encoder = keras.saving.load_model(tmp_path / "m" / "model.keras", compile=False).get_layer("encoder")
    assert np.array_equal(encoder.get_layer("Conv1").get_weights()[0], state["features.0.0.weight"].transpose(2, 3, 1, 0))
    assert np.array_equal(encoder.get_layer("block_5_depthwise").get_weights()[0],
                          state["features.6.conv.1.0.weight"].transpose(2, 3, 0, 1))
    bn = encoder.get_layer("block_5_depthwise_BN")
    assert bn.epsilon == 1e-5 and np.array_equal(bn.get_weights()[3], state["features.6.conv.1.1.running_var"])
    assert "mobilenetv2 encoder from " + PTH in (tmp_path / "m" / "MODEL_CARD.md").read_text()


def test_bad_pth_files(pth, tmp_path):
    from landcover_plugin.engine.learn.unet import mobilenet_encoder

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(pth.read_bytes()[:1_000_000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    for bad in (truncated, garbage):
        with pytest.raises(EngineError) as err:
            mobilenet_encoder(CHIP, 3, bad)
        assert err.value.code == "ENCODER_WEIGHTS_BAD" and PTH in err.value.hint

    class Evil:  # a pickle that would run a command when loaded
        def __reduce__(self):
            return (os.system, ("touch never-run",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TorchFileError, match="refused"):
        read_legacy_pth(evil)


def legacy_pth(monkeypatch, tensors: dict[str, tuple], storage: np.ndarray) -> bytes:
    """A legacy `.pth` in the format the reader accepts, as torch.save(...,
    _use_new_zipfile_serialization=False) writes it, without torch: tensors are
    {name: (offset, size, stride)} views of one float32 storage."""
    from landcover_plugin.engine.learn.torch_weights import MAGIC_NUMBER, PROTOCOL_VERSION

    # Stand-ins that pickle as torch's own names (pickle stores functions and classes by name).
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    storage_type = type("FloatStorage", (), {"__module__": "torch"})

    def rebuild(*args):
        raise AssertionError("never called: the pickle only names it")

    rebuild.__module__, rebuild.__name__, rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = storage_type, rebuild
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Storage:
        pass

    class Tensor:
        def __init__(self, offset, size, stride):
            self.args = (the_storage, offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return rebuild, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_type, "0", "cpu", storage.size) if obj is the_storage else None

    the_storage = Storage()
    out = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    state = collections.OrderedDict((name, Tensor(*view)) for name, view in tensors.items())
    Pickler(out, protocol=2).dump(state)
    pickle.dump(["0"], out, protocol=2)
    out.write(np.int64(storage.size).tobytes() + storage.astype("<f4").tobytes())
    return out.getvalue()


@pytest.mark.parametrize("view", [
    (0, (1000, 1000), (1000, 1)),  # a million elements over a storage of 12
    (10**12, (2,), (1,)),  # an offset far beyond the storage
    (0, (3,), (10**15,)),  # a stride that jumps out of it
    (11, (2,), (1,)),  # one element past the end
    (0, (2,), (-1,)),  # backwards, before the start
    (-4, (2,), (1,)),
    (0, (10**9, 10**9), (0, 0)),  # stride 0: a few bytes claiming 10^18 elements
    (0, (2.5,), (1,)),  # not whole numbers
    (0, (2, 2), (1,)),  # sizes and strides do not pair up
])
def test_a_crafted_tensor_view_outside_its_storage_is_refused(monkeypatch, tmp_path, view):
    """Sizes, strides and offsets are checked against the storage before numpy's
    as_strided reads through them: a crafted file crashed training with a segfault."""
    storage = np.arange(12, dtype=np.float32)
    good = tmp_path / "good.pth"
    good.write_bytes(legacy_pth(monkeypatch, {"w": (2, (2, 3), (1, 2))}, storage))
    assert np.array_equal(read_legacy_pth(good)["w"], [[2, 4, 6], [3, 5, 7]])  # the crafting is right
    crafted = tmp_path / "crafted.pth"
    crafted.write_bytes(legacy_pth(monkeypatch, {"w": view}, storage))
    with pytest.raises(TorchFileError):
        read_legacy_pth(crafted)
