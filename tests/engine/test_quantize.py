"""quantize: int8 models (static with calibration imagery, dynamic without) keep metadata and predictions."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from rasterio.transform import from_origin

from landcover_plugin.engine.cli import main
from landcover_plugin.engine.learn.model_package import read_info

from test_predict import box_sum_model, landcover_info, write_raster


@pytest.fixture()
def case(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (3, 150, 170)).astype(np.uint8)
    raster = write_raster(tmp_path / "img.tif", image, from_origin(400000, 3300000, 1.0, 1.0))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    box_sum_model(model_dir / "model.onnx", landcover_info(input_scale=255.0))  # a model of 8-bit imagery
    return raster, model_dir


def run_cli(args: list[str], capsys) -> dict:
    code = main(["--json", *args])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, lines[-1]
    return lines[-1]


def classes(gpkg) -> dict:
    import fiona

    with fiona.open(gpkg, layer="class_stats") as layer:
        return {f["properties"]["class"]: f["properties"]["hectares"] for f in layer}


@pytest.mark.parametrize("static", [True, False])
def test_int8_model_keeps_metadata_and_predictions(case, tmp_path, capsys, static):
    raster, model_dir = case
    out = tmp_path / "int8"
    args = ["quantize", "--model", str(model_dir), "--out", str(out)] + (["--imagery", str(raster)] if static else [])
    result = run_cli(args, capsys)
    assert result["summary"]["method"] == ("static" if static else "dynamic")
    proto = onnx.load(str(out / "model.onnx"))
    if static:
        assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    info = read_info(out)
    assert info.class_names == ["a", "b", "c"] and info.metrics["quantization"].startswith("int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "int8", "model"]  # nothing partial left
    # same predictions, nearly: the class shares agree within a few percent
    float_gpkg, int8_gpkg = tmp_path / "f.gpkg", tmp_path / "q.gpkg"
    run_cli(["predict", "--model", str(model_dir), "--imagery", str(raster), "--out", str(float_gpkg)], capsys)
    run_cli(["predict", "--model", str(out), "--imagery", str(raster), "--out", str(int8_gpkg),
             "--batch-size", "2", "--threads", "1"], capsys)
    a, b = classes(float_gpkg), classes(int8_gpkg)
    assert a == pytest.approx(b, abs=0.03 * sum(a.values()))


def test_quantize_a_missing_model(tmp_path, capsys):
    assert main(["--json", "quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "q")]) == 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["code"] == "MODEL_NOT_FOUND"
