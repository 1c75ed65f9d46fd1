"""Nothing lost: `--out` never deletes what landcover did not write, nor the stage's own input.

Through the real `landcover` command, on the NEON sample image and the shipped model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from landcover_plugin.engine.atomic import MARKER

ENGINE = [sys.executable, "-m", "landcover_plugin.engine", "--json"]


def landcover(*args: str | Path) -> tuple[int, dict]:
    proc = subprocess.run([*ENGINE, *map(str, args)], capture_output=True, text=True, timeout=600)
    last = json.loads(proc.stdout.splitlines()[-1])
    return proc.returncode, last


def user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("precious")
    return path


def assert_untouched(folder: Path) -> None:
    assert (folder / "thesis.txt").read_text() == "precious"
    assert (folder / "sub").is_dir()


def assert_refused(code: int, event: dict, expected: str) -> None:
    assert code == 2, event
    assert event["event"] == "error" and event["code"] == expected, event
    assert event["hint"]


@pytest.fixture(scope="module")
def dataset(osbs_tif, osbs_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "dataset"
    code, event = landcover("dataset", "--imagery", osbs_tif, "--labels", osbs_csv, "--task", "trees", "--out", out)
    assert code == 0, event
    return out


def test_predict_refuses_a_user_folder_and_keeps_it(osbs_tif, tmp_path):
    folder = user_folder(tmp_path / "userdir")
    code, event = landcover("predict", "--model", "trees-base", "--imagery", osbs_tif, "--out", folder)
    assert_refused(code, event, "OUT_EXISTS")
    assert_untouched(folder)


def test_predict_refuses_a_file_of_another_kind(osbs_tif, tmp_path):
    notes = tmp_path / "notes.gpkg"
    notes.write_text("not a GeoPackage")
    code, event = landcover("predict", "--model", "trees-base", "--imagery", osbs_tif, "--out", notes)
    assert_refused(code, event, "OUT_EXISTS")
    assert notes.read_text() == "not a GeoPackage"


def test_predict_replaces_its_own_geopackage(osbs_tif, tmp_path):
    out = tmp_path / "result.gpkg"
    for _ in range(2):
        code, event = landcover("predict", "--model", "trees-base", "--imagery", osbs_tif, "--out", out)
        assert code == 0, event
    assert out.read_bytes()[:16] == b"SQLite format 3\x00"


def test_predict_and_fetch_refuse_to_overwrite_their_input(osbs_tif, tmp_path):
    image = tmp_path / "img.tif"
    image.write_bytes(osbs_tif.read_bytes())
    code, event = landcover("predict", "--model", "trees-base", "--imagery", image, "--out", image)
    assert_refused(code, event, "OUT_IS_INPUT")
    code, event = landcover("fetch", "--aoi", "-82.0,29.6,-81.9,29.7", "--source", image, "--out", image)
    assert_refused(code, event, "OUT_IS_INPUT")
    assert image.read_bytes() == osbs_tif.read_bytes()


def test_fetch_refuses_a_user_folder(osbs_tif, tmp_path):
    folder = user_folder(tmp_path / "userdir")
    code, event = landcover("fetch", "--aoi", "-82.0,29.6,-81.9,29.7", "--source", osbs_tif, "--out", folder)
    assert_refused(code, event, "OUT_EXISTS")
    assert_untouched(folder)


def test_dataset_refuses_a_user_folder_and_replaces_its_own(osbs_tif, osbs_csv, dataset, tmp_path):
    folder = user_folder(tmp_path / "userdir")
    code, event = landcover("dataset", "--imagery", osbs_tif, "--labels", osbs_csv, "--task", "trees",
                            "--out", folder)
    assert_refused(code, event, "OUT_EXISTS")
    assert_untouched(folder)
    assert (dataset / MARKER).is_file()
    own = tmp_path / "again"
    for _ in range(2):
        code, event = landcover("dataset", "--imagery", osbs_tif, "--labels", osbs_csv, "--task", "trees",
                                "--out", own)
        assert code == 0, event


def test_train_refuses_a_user_folder_and_its_dataset(dataset, tmp_path):
    folder = user_folder(tmp_path / "userdir")
    code, event = landcover("train", "--dataset", dataset, "--out", folder, "--epochs", "1")
    assert_refused(code, event, "OUT_EXISTS")
    assert_untouched(folder)
    code, event = landcover("train", "--dataset", dataset, "--out", dataset, "--epochs", "1")
    assert_refused(code, event, "OUT_IS_INPUT")
    assert (dataset / "dataset.json").is_file()


def test_pipeline_out_outside_its_folder_is_refused(osbs_tif, tmp_path):
    victim = user_folder(tmp_path / "victim")
    job = tmp_path / "job"
    job.mkdir()
    (job / "pipeline.yaml").write_text(f"task: trees\nimagery: {osbs_tif}\nmodel: ../victim-model\n"
                                       "out: ../victim\n")
    (tmp_path / "victim-model").symlink_to(Path(__file__).resolve().parents[2] / "landcover_plugin" / "resources"
                                           / "models" / "trees-base")
    code, event = landcover("run", job / "pipeline.yaml")
    assert_refused(code, event, "OUT_EXISTS")
    assert_untouched(victim)
