"""Runs that recover from what an earlier run left: a torn stage record, the hidden
temporary files of a killed run, a second run on the same output (issue 13).

Through the real `landcover` command, on the NEON sample image and the shipped model.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from landcover_plugin.contract.names import MODELS_DIR
from landcover_plugin.engine.atomic import lock_path, remove_stale_partials, run_lock
from landcover_plugin.engine.errors import EngineError

ENGINE = [sys.executable, "-m", "landcover_plugin.engine", "--json"]
# Inside OSBS_029 (EPSG:32617, 404211.9..404251.9 E, 3285102.9..3285142.9 N): 30 m x 30 m.
OSBS_AOI = "404215,3285105,404245,3285135"


def landcover(*args: str | Path) -> tuple[int, dict]:
    proc = subprocess.run([*ENGINE, *map(str, args)], capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout.splitlines()[-1])


def predict_pipeline(folder: Path, imagery: Path) -> Path:
    """A pipeline that crops the imagery to an AOI (the fetch stage, recorded) and predicts."""
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps({"task": "trees", "imagery": str(imagery), "aoi": OSBS_AOI, "aoi_crs": "EPSG:32617",
                                "model": str(MODELS_DIR / "trees-base"), "out": str(folder / "trees.gpkg"),
                                "workdir": str(folder / "work")}))
    return path


def test_an_empty_stage_record_reruns_the_stage_instead_of_failing(osbs_tif, tmp_path):
    """A full disk while writing the record left it empty: the next run redoes the stage."""
    pipeline = predict_pipeline(tmp_path, osbs_tif)
    code, event = landcover("run", pipeline)
    assert code == 0, event
    record = tmp_path / "work" / ".fetch.done.json"
    assert json.loads(record.read_text())["outputs"]["mosaic"]
    record.write_bytes(b"")
    code, event = landcover("run", pipeline)
    assert code == 0, event
    assert json.loads(record.read_text())["outputs"]["mosaic"]  # written whole again
    assert not list((tmp_path / "work").glob(".*partial*"))


def test_a_killed_predict_leaves_nothing_after_the_next_run(osbs_tif, tmp_path):
    """SIGKILL skips every cleanup: the prediction raster of the killed run stays beside
    the output as a hidden .NAME.partial-PID... folder; the next run removes it."""
    out = tmp_path / "trees.gpkg"
    command = [*ENGINE, "predict", "--model", "trees-base", "--imagery", str(osbs_tif), "--out", str(out),
               "--batch-size", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # mid-run: a batch of tiles is written into the prediction raster
            event = json.loads(line)
            if event["event"] == "progress" and event["stage"] == "predict" and event["done"] >= 1:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    leftovers = list(tmp_path.glob(f".trees.partial-{proc.pid}*"))
    assert leftovers and not out.exists()
    code, event = landcover("predict", "--model", "trees-base", "--imagery", osbs_tif, "--out", out)
    assert code == 0, event
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trees.gpkg"]


def test_only_the_leftovers_of_runs_that_are_gone_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getpid()
    names = [f".m.partial-{dead}.tif", f".m.partial-{dead}-fetch-x1y2", f".m.tif.old-{dead}",  # a killed run's
             f".m.partial-{alive}.tif", f".m.partial-{alive}-fetch-abc",  # a live run's
             f".m2.partial-{dead}.tif", "m.tif", ".m.partial-notapid.tif"]  # another output's, the output, a user's
    for name in names:
        (tmp_path / name).mkdir() if "fetch" in name or "old" in name else (tmp_path / name).write_text("x")
    removed = remove_stale_partials(tmp_path / "m.tif")
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])


def test_a_second_run_on_one_dataset_out_is_refused_naming_the_first(osbs_tif, osbs_csv, tmp_path):
    """While a run holds the dataset's lock (this test process stands in for it), another
    run on the same --out is refused with the holder's pid; once it is done, runs go on."""
    out = tmp_path / "dataset"
    args = ("dataset", "--imagery", osbs_tif, "--labels", osbs_csv, "--task", "trees", "--chip-size", "64",
            "--out", out)
    with run_lock(lock_path(out), str(out)):
        code, event = landcover(*args)
        assert code == 2 and event["code"] == "OUTPUT_BUSY", event
        assert f"pid {os.getpid()}" in event["message"] and event["hint"]
        assert not out.exists()
    code, event = landcover(*args)
    assert code == 0, event
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]  # the lock file goes with its run


def test_a_second_run_on_one_pipeline_workdir_is_refused_naming_the_first(osbs_tif, tmp_path):
    pipeline = predict_pipeline(tmp_path, osbs_tif)
    with run_lock(tmp_path / "work" / ".run.lock", "the workdir"):
        code, event = landcover("run", pipeline)
        assert code == 2 and event["code"] == "OUTPUT_BUSY", event
        assert f"pid {os.getpid()}" in event["message"]
        assert not (tmp_path / "trees.gpkg").exists()
    code, event = landcover("run", pipeline)
    assert code == 0, event


def test_a_lock_left_by_a_killed_run_locks_nothing(tmp_path):
    lock = tmp_path / ".out.lock"
    lock.write_text("999999")  # the pid of a run that was killed while holding it
    with run_lock(lock, "out"):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


class DiskFullModel:
    """Stands in for a Keras model whose weights no longer fit on the disk."""

    def save_weights(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_before_any_checkpoint_does_not_suggest_resume(tmp_path):
    """The first checkpoint cannot be written: there is nothing for --resume to go on from."""
    from landcover_plugin.engine.learn.checkpoint import RunState, checkpoint_dir, save_checkpoint

    optimizer = type("Optimizer", (), {"variables": []})()
    folder = checkpoint_dir(tmp_path / "model")
    with pytest.raises(EngineError) as err:
        save_checkpoint(folder, DiskFullModel(), optimizer, RunState(epoch=1), best_changed=True)
    assert err.value.code == "DISK_FULL" and "--resume" not in err.value.hint
    assert "no checkpoint" in err.value.message
    assert list(tmp_path.iterdir()) == []  # nothing half-written
