"""The ImageNet-pretrained encoder (Keras applications' MobileNetV2) from a local
weights file: nothing is downloaded; tests use a stand-in file of random weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rasterio.windows import Window

from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.learn.model_package import read_info
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset
from landcover_plugin.engine.stages.train import TrainParams, train

from test_tasks import CHIP, onnx_matches_keras, quiet  # tests/engine is on sys.path (pytest rootdir mode)


@pytest.fixture(scope="module")
def classification_dataset(landsat_stack, landsat_polygons, tmp_path_factory, crop) -> Path:
    """Six Landsat bands, one class per 32 px chip."""
    tmp = tmp_path_factory.mktemp("chips")
    imagery = crop(landsat_stack, Window(64, 64, 192, 192), tmp / "crop.tif")
    build_dataset(DatasetParams(imagery=imagery, labels=landsat_polygons, task="classification", out=tmp / "ds",
                                class_field="label", chip_size=CHIP), quiet())
    return tmp / "ds"


WEIGHTS_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.weights.h5"


@pytest.fixture(scope="module")
def encoder_weights(tmp_path_factory) -> Path:
    """A stand-in for Keras's ImageNet file (random weights, the same layout): nothing downloaded."""
    import keras

    path = tmp_path_factory.mktemp("weights") / WEIGHTS_NAME
    net = keras.applications.MobileNetV2(input_shape=(CHIP, CHIP, 3), include_top=False, weights=None, alpha=0.35)
    net.save_weights(path)
    return path


def test_pretrained_encoder_six_bands_frozen(classification_dataset, encoder_weights, tmp_path):
    """--encoder mobilenetv2 --encoder-weights FILE --freeze-encoder on six Landsat bands: the
    first convolution is the RGB kernel's mean given to every band (scaled by 3/6, so a grey
    input gives the same response), and after training the encoder is still exactly the
    file's weights (batch norm statistics included); ONNX matches Keras."""
    import keras

    from landcover_plugin.engine.learn.unet import mobilenet_encoder

    model = tmp_path / "model"
    train(TrainParams(dataset=classification_dataset, out=model, epochs=1, batch_size=8, encoder="mobilenetv2",
                      encoder_weights=encoder_weights, freeze_encoder=True), quiet())
    rgb = keras.applications.MobileNetV2(input_shape=(CHIP, CHIP, 3), include_top=False, weights=None, alpha=0.35)
    rgb.load_weights(encoder_weights)
    trained = keras.saving.load_model(model / "model.keras", compile=False).get_layer("encoder")
    kernel = trained.get_layer("Conv1").get_weights()[0]
    assert kernel.shape[2] == 6 and np.allclose(kernel.sum(axis=2), rgb.get_layer("Conv1").get_weights()[0].sum(axis=2),
                                                atol=1e-5)
    adapted = mobilenet_encoder(CHIP, 6, encoder_weights)
    for want, got in zip(adapted.get_weights(), trained.get_weights()):
        assert np.array_equal(want, got)
    assert "mobilenetv2 encoder from" in (model / "MODEL_CARD.md").read_text()
    x = np.random.default_rng(0).normal(0, 1, (2, 6, CHIP, CHIP)).astype(np.float32)
    assert onnx_matches_keras(model, x).shape == (2, len(read_info(model).class_names))
    # Fine-tuning that model without --freeze-encoder trains its encoder too (it was saved frozen).
    train(TrainParams(dataset=classification_dataset, out=tmp_path / "tuned", epochs=1, batch_size=8, base=model),
          quiet())
    tuned = keras.saving.load_model(tmp_path / "tuned" / "model.keras", compile=False).get_layer("encoder")
    assert not np.array_equal(tuned.get_layer("Conv1").get_weights()[0], kernel)


def test_mobilenet_unet_random_init_exports(tmp_path, encoder_weights):
    """The U-Net over MobileNetV2, randomly initialised (no file needed), exports to ONNX
    matching Keras; wrong chip sizes and missing weight files are clear errors."""
    from landcover_plugin.engine.learn.export import check_onnx, export_onnx
    from landcover_plugin.engine.learn.unet import build_unet, mobilenet_encoder

    model = build_unet(CHIP, 3, "buildings", 2, width=8, encoder="mobilenetv2")
    export_onnx(model, tmp_path / "m.onnx", CHIP, 3)
    x = np.random.default_rng(0).normal(0, 1, (2, CHIP, CHIP, 3)).astype(np.float32)
    assert check_onnx(tmp_path / "m.onnx", model, x) <= 1e-4
    with pytest.raises(EngineError) as err:
        mobilenet_encoder(CHIP, 3, encoder_weights.with_name("missing_no_top.h5"))
    assert err.value.code == "ENCODER_WEIGHTS_NOT_FOUND" and "download" in err.value.hint
    with pytest.raises(EngineError) as err:
        mobilenet_encoder(48, 3, None)
    assert err.value.code == "BAD_CHIP_SIZE"


def test_bad_encoder_options(classification_dataset, tmp_path, capsys):
    def code_of(**kw) -> str:
        with pytest.raises(EngineError) as err:
            train(TrainParams(dataset=classification_dataset, out=tmp_path / "m", epochs=1, **kw), quiet())
        assert not (tmp_path / "m").exists()
        return err.value.code

    assert code_of(freeze_encoder=True) == "BAD_PARAMS"  # nothing pretrained to keep
    assert code_of(encoder="resnet") == "BAD_PARAMS"
    assert code_of(encoder="mobilenetv2", encoder_weights=tmp_path / "nope.h5") == "ENCODER_WEIGHTS_NOT_FOUND"
    from landcover_plugin.engine.cli import main

    code = main(["--json", "train", "--dataset", str(classification_dataset), "--out", str(tmp_path / "m"),
                 "--encoder", "mobilenetv2", "--encoder-weights", str(tmp_path / "nope.h5"), "--freeze-encoder"])
    error = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 2 and error["code"] == "ENCODER_WEIGHTS_NOT_FOUND" and "--encoder-weights" in error["hint"]
