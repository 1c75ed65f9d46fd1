"""predict --scheduler: a real Dask cluster on 127.0.0.1 (a scheduler and worker processes
started with the engine venv's `dask` command) gives the features of the local run,
also when a worker is killed mid-run, over TLS, and cancels its tasks with the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import box

from landcover_plugin.engine.cluster import connect
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.imagery.aoi import AOI
from landcover_plugin.engine.stages.predict import PredictParams, predict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dask_cluster import client_tls_env, dask_cluster, make_certificates  # noqa: E402
from test_predict import box_sum_model, json_reporter, landcover_info, write_raster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def features(gpkg: Path) -> dict[str, list]:
    """Every layer's rows in order: geometry (exact coordinates) and fields (the styles
    table aside: it holds the time of writing)."""
    layers = {}
    for name in set(fiona.listlayers(gpkg)) - {"layer_styles"}:
        with fiona.open(gpkg, layer=name) as layer:
            layers[name] = [(json.dumps(f["geometry"].__geo_interface__ if f["geometry"] else None),
                             dict(f["properties"])) for f in layer]
    return layers


def landcover_cli(*args, env: dict | None = None, on_event=None) -> tuple[int, list[dict]]:
    """The real `landcover --json` command; its exit code and events (`on_event(event, proc)` for each)."""
    proc = subprocess.Popen([sys.executable, "-m", "landcover_plugin.engine", "--json", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)} | (env or {}))
    events = []
    for line in proc.stdout:
        if line.startswith("{"):
            events.append(json.loads(line))
            if on_event:
                on_event(events[-1], proc)
    return proc.wait(300), events


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_cluster(2, tmp_path_factory.mktemp("dask")) as c:
        yield c


@pytest.fixture(scope="module")
def orchard_scene(osbs_tif, tmp_path_factory) -> tuple[Path, Path]:
    """OSBS_029 repeated 2 x 2 (800 px, 100 tiles of trees-base) and its local run's result."""
    tmp = tmp_path_factory.mktemp("scene")
    with rasterio.open(osbs_tif) as src:
        data, profile = np.tile(src.read(), (1, 2, 2)), src.profile
    raster = tmp / "scene.tif"
    with rasterio.open(raster, "w", **(profile | {"width": data.shape[2], "height": data.shape[1]})) as dst:
        dst.write(data)
    local = tmp / "local.gpkg"
    code, _ = landcover_cli("predict", "--model", "trees-base", "--imagery", raster, "--out", local,
                            "--block-size", "96")
    assert code == 0
    return raster, local


def test_trees_on_the_cluster_are_those_of_the_local_run(cluster, orchard_scene, tmp_path):
    raster, local = orchard_scene
    out = tmp_path / "cluster.gpkg"
    code, events = landcover_cli("predict", "--model", "trees-base", "--imagery", raster, "--out", out,
                                 "--block-size", "96", "--scheduler", cluster.address)
    assert code == 0, events[-1]
    summary = events[-1]["summary"]
    assert summary["workers"] == 2 and summary["crowns"] > 50
    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "predict"]
    assert progress[-1]["done"] == progress[-1]["total"] == 81  # one event per block (9 x 9)
    assert features(out) == features(local)


def test_landcover_on_the_cluster_is_that_of_the_local_run(cluster, tmp_path):
    """Seams, sieving across blocks and an AOI polygon: the same polygons, to the coordinate."""
    rng = np.random.default_rng(1)
    image = np.repeat(np.repeat(rng.integers(0, 10, (3, 60, 84)), 5, axis=1), 5, axis=2).astype(np.uint8)
    raster = write_raster(tmp_path / "img.tif", image, from_origin(400000, 3300000, 1.0, 1.0))
    model = box_sum_model(tmp_path / "model.onnx", landcover_info())
    aoi = AOI(box(400020, 3299720, 400400, 3299990).difference(box(400100, 3299800, 400150, 3299850)), "EPSG:32617")
    outs = {}
    for name, scheduler in (("local", None), ("cluster", cluster.address)):
        outs[name] = tmp_path / f"{name}.gpkg"
        result = predict(PredictParams(model=model, imagery=raster, out=outs[name], aoi=aoi, block_size=64,
                                       scheduler=scheduler), json_reporter())
    assert result.summary["workers"] == 2 and result.summary["polygons"] > 100
    assert features(outs["cluster"]) == features(outs["local"])


def test_a_pipeline_file_predicts_on_its_scheduler(cluster, osbs_tif, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"task: trees\nimagery: {osbs_tif}\nmodel: trees-base\nout: trees.gpkg\n"
                        f"predict: {{scheduler: '{cluster.address}'}}\n")
    code, events = landcover_cli("run", pipeline)
    assert code == 0, events[-1]
    assert events[-1]["summary"]["predict"]["workers"] == 1  # 400 px: one block of the default 2048
    assert events[-1]["summary"]["predict"]["crowns"] > 20 and (tmp_path / "trees.gpkg").exists()


def test_a_worker_killed_mid_run_still_gives_the_whole_result(orchard_scene, tmp_path):
    raster, local = orchard_scene
    killed = []

    def kill_one(event, proc):
        if not killed and event["event"] == "progress" and event["stage"] == "predict" and event["done"] >= 1:
            killed.append(event["done"] < event["total"])
            c.workers[0].kill()  # no nanny: the worker, its results and its running task are gone

    with dask_cluster(2, tmp_path / "dask") as c:
        out = tmp_path / "cluster.gpkg"
        code, events = landcover_cli("predict", "--model", "trees-base", "--imagery", raster, "--out", out,
                                     "--block-size", "96", "--scheduler", c.address, on_event=kill_one)
        assert c.workers[0].poll() is not None
    assert killed == [True]  # killed while blocks were left
    assert code == 0, events[-1]
    assert features(out) == features(local)


def test_a_tls_cluster_is_used_with_dasks_tls_configuration(osbs_tif, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    with dask_cluster(1, tmp_path / "dask", certs=certs) as c:
        assert c.address.startswith("tls://")
        out = tmp_path / "tls.gpkg"
        code, events = landcover_cli("predict", "--model", "trees-base", "--imagery", osbs_tif, "--out", out,
                                     "--scheduler", c.address)
        assert code == 2 and events[-1]["code"] == "TLS_NOT_CONFIGURED" and not out.exists()
        code, events = landcover_cli("predict", "--model", "trees-base", "--imagery", osbs_tif, "--out", out,
                                     "--scheduler", c.address, env=client_tls_env(certs))
    assert code == 0, events[-1]
    assert events[-1]["summary"]["workers"] == 1 and events[-1]["summary"]["crowns"] > 20
    local = tmp_path / "local.gpkg"
    predict(PredictParams(model="trees-base", imagery=osbs_tif, out=local), json_reporter())
    assert features(out) == features(local)


def test_cancel_takes_the_clusters_tasks_with_it(cluster, orchard_scene, tmp_path):
    raster, _ = orchard_scene
    out = tmp_path / "cancelled.gpkg"

    def cancel(event, proc):
        if event["event"] == "progress" and event["stage"] == "predict" and event["done"] == 1:
            proc.send_signal(signal.SIGTERM)

    code, events = landcover_cli("predict", "--model", "trees-base", "--imagery", raster, "--out", out,
                                 "--block-size", "96", "--scheduler", cluster.address, on_event=cancel)
    assert code == 130 and events[-1]["code"] == "CANCELLED"
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    from distributed import Client

    with Client(cluster.address, timeout=30) as client:  # the scheduler forgets the run's tasks
        deadline = time.monotonic() + 30
        while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0


def test_inputs_a_worker_cannot_read_are_named_before_any_work(cluster, osbs_tif, tmp_path):
    from landcover_plugin.engine.cluster import check_workers

    with connect(cluster.address) as client:
        assert check_workers(client, [osbs_tif]) == 2
        with pytest.raises(EngineError) as err:
            check_workers(client, [osbs_tif, tmp_path / "only-here.onnx"])
    assert err.value.code == "WORKER_CANNOT_READ" and "only-here.onnx" in err.value.message and err.value.hint


@pytest.mark.parametrize("address, code", [("tcp://127.0.0.1:9", "SCHEDULER_UNREACHABLE"),
                                           ("127.0.0.1:8786", "BAD_SCHEDULER"),
                                           ("tls://127.0.0.1:9", "TLS_NOT_CONFIGURED")])
def test_a_scheduler_that_cannot_be_used_is_a_clear_error(address, code, monkeypatch):
    for name in client_tls_env({"ca": "", "cert": "", "key": ""}):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(EngineError) as err:
        with connect(address, timeout=1):
            pass
    assert err.value.code == code and err.value.hint


def areas_file(path: Path, raster: Path, ids: list[str]) -> tuple[Path, list]:
    """Two orchard blocks over the raster (one with a hole) and one off it, field `block`."""
    with rasterio.open(raster) as src:
        x0, y0, x1, y1 = src.bounds
        crs = src.crs.to_string()
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    polygons = [box(x0 + 2, y0 + 2, xm, y1 - 2).difference(box(x0 + 8, ym - 3, x0 + 14, ym + 3)),
                box(xm, y0 + 5, x1 - 5, ym + 6), box(x1 + 100, y1 + 100, x1 + 120, y1 + 120)]
    schema = {"geometry": "Polygon", "properties": {"block": "str"}}
    with fiona.open(path, "w", driver="GPKG", crs=crs, schema=schema) as dst:
        for block_id, geom in zip(ids, polygons):
            dst.write({"geometry": geom.__geo_interface__, "properties": {"block": block_id}})
    return path, polygons


def test_per_feature_gives_each_area_its_own_result_with_its_id(cluster, osbs_tif, tmp_path):
    """Each block's rows are those of a run over that block alone, with its id; the one off
    the imagery is skipped (and said); the cluster gives the same as this machine."""
    areas, polygons = areas_file(tmp_path / "blocks.gpkg", osbs_tif, ["north-7", "east-2", "far"])
    results = {}
    for name, extra in (("local", []), ("cluster", ["--scheduler", cluster.address])):
        results[name] = tmp_path / f"{name}.gpkg"
        code, events = landcover_cli("predict", "--model", "trees-base", "--imagery", osbs_tif, "--out",
                                     results[name], "--aoi", areas, "--per-feature", "--id-field", "block", *extra)
        assert code == 0, events[-1]
        assert events[-1]["summary"]["areas"] == 2 and set(events[-1]["summary"]["by_area"]) == {"north-7", "east-2"}
        assert any(e.get("level") == "warning" and "far" in e["message"] for e in events)
    assert features(results["cluster"]) == features(results["local"])
    per_area = features(results["local"])
    for block_id, polygon in zip(["north-7", "east-2"], polygons):
        alone = tmp_path / f"{block_id}.gpkg"
        aoi = AOI(polygon, "EPSG:32617")
        predict(PredictParams(model="trees-base", imagery=osbs_tif, out=alone, aoi=aoi), json_reporter())
        for layer, rows in features(alone).items():
            mine = [(g, {k: v for k, v in p.items() if k != "area_id"}) for g, p in per_area[layer]
                    if p["area_id"] == block_id]
            assert mine == rows, layer
        assert features(alone)["crowns"]
    assert {p["area_id"] for rows in per_area.values() for _, p in rows} == {"north-7", "east-2"}


@pytest.mark.parametrize("ids, field, message", [(["a", "a", "b"], "block", "share the id a"),
                                                  (["a", "b", "c"], "name", "no field 'name'")])
def test_per_feature_ids_that_cannot_tell_areas_apart_are_refused(osbs_tif, tmp_path, ids, field, message):
    areas, _ = areas_file(tmp_path / "blocks.gpkg", osbs_tif, ids)
    code, events = landcover_cli("predict", "--model", "trees-base", "--imagery", osbs_tif, "--out",
                                 tmp_path / "o.gpkg", "--aoi", areas, "--per-feature", "--id-field", field)
    assert code == 2 and events[-1]["code"] == "BAD_AOI" and message in events[-1]["message"]
