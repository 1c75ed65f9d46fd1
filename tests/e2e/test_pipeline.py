"""End to end: `landcover --json run` as a user's script or the plugin runs it.

Loopback tile server -> fetch -> dataset -> train (child process) -> predict
-> styled GeoPackage, on a crop of the real OSBS_029 orthophoto.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import fiona
import pytest
import rasterio
from rasterio.warp import transform_bounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tile_server import make_tiles, serve  # noqa: E402

ENGINE = [sys.executable, "-m", "landcover_plugin.engine", "--json"]


def run_engine(*args: str, timeout: float = 600) -> tuple[int, list[dict]]:
    proc = subprocess.run([*ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, events


def last(events: list[dict], kind: str) -> dict:
    return [e for e in events if e["event"] == kind][-1]


def aoi_inside(raster: Path, inset_m: float) -> str:
    with rasterio.open(raster) as src:
        b = src.bounds
        box = transform_bounds(src.crs, "EPSG:4326", b.left + inset_m, b.bottom + inset_m,
                               b.right - inset_m, b.top - inset_m)
    return ",".join(f"{v:.7f}" for v in box)


@pytest.fixture(scope="module")
def osbs_tiles(osbs_tif, tmp_path_factory) -> Path:
    return make_tiles(osbs_tif, tmp_path_factory.mktemp("tiles"), "20")


def write_pipeline(folder: Path, **spec) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_trees_pipeline_over_http_gives_styled_crowns(osbs_tif, osbs_csv, osbs_tiles, tmp_path):
    out = tmp_path / "trees.gpkg"
    with serve(osbs_tiles) as url:
        pipeline = write_pipeline(
            tmp_path, task="trees", aoi=aoi_inside(osbs_tif, 12.0), imagery={"source": url, "zoom": 20},
            labels={"path": str(osbs_csv)}, train={"epochs": 2, "chip_size": 64, "batch_size": 4},
            out=str(out))
        code, events = run_engine("run", str(pipeline))
    assert code == 0, [e for e in events if e["event"] in ("error", "log")]
    stages = [e["message"] for e in events if e["event"] == "progress" and e["stage"] == "pipeline"]
    assert stages == ["fetch", "dataset", "train", "predict", "done"]
    result = last(events, "result")
    assert result["outputs"]["gpkg"] == str(out)
    with fiona.open(out, layer="crowns") as crowns:
        assert crowns.crs.to_epsg() == 32617  # projected: areas in m²
        assert set(crowns.schema["properties"]) >= {"area_m2"}
    assert "trees" in fiona.listlayers(out)
    with sqlite3.connect(out) as db:
        styled = {row[0] for row in db.execute("SELECT f_table_name FROM layer_styles WHERE useAsDefault")}
    assert {"crowns", "trees"} <= styled
    assert not list(tmp_path.glob(".*partial*")), "no temporary output may remain"


@pytest.mark.slow
def test_rerun_resumes_from_finished_stages(osbs_tif, osbs_csv, osbs_tiles, tmp_path):
    with serve(osbs_tiles) as url:
        pipeline = write_pipeline(
            tmp_path, task="trees", aoi=aoi_inside(osbs_tif, 12.0), imagery={"source": url, "zoom": 20},
            labels={"path": str(osbs_csv)}, train={"epochs": 1, "chip_size": 64}, out=str(tmp_path / "t.gpkg"))
        assert run_engine("run", str(pipeline))[0] == 0
        code, events = run_engine("run", str(pipeline))
    assert code == 0
    reused = [e["message"] for e in events if e["event"] == "log" and "reusing" in e["message"]]
    assert len(reused) == 3  # fetch, dataset and train; predict always reruns


def test_sigterm_stops_the_run_and_leaves_no_output(osbs_tif, osbs_csv, tmp_path):
    out = tmp_path / "trees.gpkg"
    pipeline = write_pipeline(tmp_path, task="trees", imagery={"source": str(osbs_tif)},
                              labels={"path": str(osbs_csv)}, train={"epochs": 50, "chip_size": 64},
                              workdir=str(tmp_path / "work"), out=str(out))
    proc = subprocess.Popen([*ENGINE, "run", str(pipeline)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if '"stage": "train"' in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    proc.wait(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 130
    assert '"CANCELLED"' in rest
    assert not out.exists()
    assert not (tmp_path / "work" / "model").exists()
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_tile_server_down_is_a_clear_error(osbs_tif, osbs_csv, tmp_path):
    pipeline = write_pipeline(tmp_path, task="trees", aoi=aoi_inside(osbs_tif, 5.0),
                              imagery={"source": "http://127.0.0.1:9/{z}/{x}/{y}.png", "zoom": 20},
                              labels={"path": str(osbs_csv)}, out=str(tmp_path / "t.gpkg"))
    code, events = run_engine("run", str(pipeline))
    assert code == 2
    error = last(events, "error")
    assert "127.0.0.1" in error["message"] and error["hint"]
    assert not (tmp_path / "t.gpkg").exists()


def test_aoi_outside_the_imagery_is_a_clear_error(osbs_tif, osbs_csv, tmp_path):
    pipeline = write_pipeline(tmp_path, task="trees", aoi="10.0,50.0,10.001,50.001",
                              imagery={"source": str(osbs_tif)}, labels={"path": str(osbs_csv)},
                              out=str(tmp_path / "t.gpkg"))
    code, events = run_engine("run", str(pipeline))
    assert code == 2
    assert last(events, "error")["code"] == "AOI_OUTSIDE_IMAGERY"


def test_empty_label_file_is_a_clear_error(osbs_tif, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("image_path,xmin,ymin,xmax,ymax,label\n")
    pipeline = write_pipeline(tmp_path, task="trees", imagery={"source": str(osbs_tif)},
                              labels={"path": str(empty)}, out=str(tmp_path / "t.gpkg"))
    code, events = run_engine("run", str(pipeline))
    assert code == 2
    error = last(events, "error")
    assert "empty" in error["message"].lower() or "no label" in error["message"].lower()
    assert error["hint"]


def test_pipeline_without_labels_or_model_is_refused(osbs_tif, tmp_path):
    pipeline = write_pipeline(tmp_path, task="trees", imagery={"source": str(osbs_tif)}, out="t.gpkg")
    code, events = run_engine("run", str(pipeline))
    assert code == 2
    assert last(events, "error")["code"] == "BAD_PIPELINE"


def test_a_model_of_another_task_is_refused(osbs_tif, tmp_path):
    """Land cover asked of the trees model: a clear refusal, not crowns in a land-cover map."""
    pipeline = write_pipeline(tmp_path, task="landcover", imagery={"source": str(osbs_tif)}, model="trees-base",
                              out="lc.gpkg")
    code, events = run_engine("run", str(pipeline))
    assert code == 2
    error = last(events, "error")
    assert error["code"] == "MODEL_TASK_MISMATCH" and "maps trees, not landcover" in error["message"]
    assert not (tmp_path / "lc.gpkg").exists()


@pytest.mark.slow
def test_landcover_pipeline_with_labels_in_another_crs(landsat_stack, landsat_polygons, tmp_path):
    out = tmp_path / "landcover.gpkg"
    pipeline = write_pipeline(tmp_path, task="landcover", imagery={"source": str(landsat_stack)},
                              labels={"path": str(landsat_polygons), "class_field": "label"},
                              train={"epochs": 1, "chip_size": 64}, out=str(out))
    code, events = run_engine("run", str(pipeline))
    assert code == 0, [e for e in events if e["event"] in ("error", "log")]
    with fiona.open(out, layer="landcover") as layer:
        assert layer.crs.to_epsg() == 32119  # the imagery's CRS; labels were EPSG:3358
        classes = {f["properties"]["class"] for f in layer}
    assert classes <= {"shrubland", "forest", "water", "sediment", "herbaceous", "developed", "agriculture"}
    with fiona.open(out, layer="class_stats") as stats:
        hectares = sum(f["properties"]["hectares"] for f in stats)
    with rasterio.open(landsat_stack) as src:
        valid = (src.read_masks() > 0).all(axis=0)  # a pixel needs all six bands
        valid_ha = valid.sum() * src.res[0] * src.res[1] / 1e4
    assert hectares == pytest.approx(valid_ha, rel=0.02)  # every valid pixel gets a class


@pytest.mark.slow
def test_corrections_in_a_reviewed_area_fine_tune_the_model(osbs_tif, osbs_csv, tmp_path):
    """The user's crowns are complete in the reviewed area (the west half): the model is fine-tuned from
    the one that mapped them, on that area only, and both are scored on the same validation chips."""
    west = "404211.9,3285102.9,404231.9,3285142.9"  # OSBS_029 is 404211.9..404251.9 x 3285102.9..3285142.9
    pipeline = write_pipeline(tmp_path, task="trees", imagery=str(osbs_tif), aoi_crs="EPSG:32617",
                              aoi="404211.9,3285102.9,404251.9,3285142.9",
                              labels={"path": str(osbs_csv), "reviewed_area": west},
                              train={"base": "trees-base", "epochs": 2}, out="v2.gpkg")
    code, events = run_engine("run", str(pipeline))
    assert code == 0, last(events, "error") if code == 2 else events[-3:]
    summary = last(events, "result")["summary"]
    compared = summary["train"]["compared"]
    assert set(compared) == {"base", "new"} and 0 <= compared["base"]["crown_f1"] <= 1
    assert 0 <= compared["new"]["crown_f1"] <= 1
    assert any("fine-tuning" in e.get("message", "") and "trees-base" in e.get("message", "")
               for e in events if e["event"] == "log")
    with rasterio.open(tmp_path / "v2-work" / "reviewed.tif") as src:  # only the reviewed half was trained on
        assert src.bounds.right <= 404232.0 and src.bounds.left >= 404211.8
    with fiona.open(tmp_path / "v2.gpkg", layer="crowns") as crowns:  # the whole area is mapped again
        assert len(crowns) > 0 and crowns.bounds[2] > 404240


def test_a_reviewed_area_without_labels_is_refused(osbs_tif, tmp_path):
    empty = tmp_path / "none.csv"
    empty.write_text("image_path,xmin,ymin,xmax,ymax,label\n")
    pipeline = write_pipeline(tmp_path, task="trees", imagery=str(osbs_tif), aoi_crs="EPSG:32617",
                              labels={"path": str(empty), "reviewed_area": "404211.9,3285102.9,404231.9,3285142.9"},
                              train={"base": "trees-base", "epochs": 1}, out="v2.gpkg")
    code, events = run_engine("run", str(pipeline))
    assert code == 2
    error = last(events, "error")
    assert error["hint"] and "label" in (error["message"] + error["hint"]).lower(), error
    assert not (tmp_path / "v2.gpkg").exists()
