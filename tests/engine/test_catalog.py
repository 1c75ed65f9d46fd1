"""The dataset catalog (catalog.gpkg), SQL snapshots with provenance, the background
ratio and resuming an interrupted build, on a small synthetic scene."""
from __future__ import annotations

import io
import json
import os
import sqlite3
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import box, mapping

from landcover_plugin.contract.names import IGNORE
from landcover_plugin.contract.protocol import parse_event
from landcover_plugin.engine.cli import main
from landcover_plugin.engine.errors import Cancelled
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.learn.dataset_folder import chip_hash
from landcover_plugin.engine.stages.catalog import catalog_info, fraction_field
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset

CRS, X0, Y0, SIZE, CHIP = "EPSG:32617", 500000.0, 4000256.0, 256, 32


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path]:
    """256x256 px at 1 m; water and forest boxes over the left 160 m, nothing mapped east of it."""
    tmp = tmp_path_factory.mktemp("catalog")
    imagery = tmp / "image.tif"
    with rasterio.open(imagery, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8", crs=CRS,
                       transform=from_origin(X0, Y0, 1, 1)) as dst:
        dst.write(np.random.default_rng(1).integers(0, 255, (3, SIZE, SIZE), dtype=np.uint8))
    labels = tmp / "labels.gpkg"
    rng = np.random.default_rng(2)
    with fiona.open(labels, "w", driver="GPKG", crs=CRS,
                    schema={"geometry": "Polygon", "properties": {"class": "str"}}) as dst:
        for i in range(60):
            x, y = rng.uniform(0, 140), rng.uniform(0, 236)
            dst.write({"geometry": mapping(box(X0 + x, Y0 - y - 20, X0 + x + 20, Y0 - y)),
                       "properties": {"class": "water" if i % 3 == 0 else "forested"}})
    return imagery, labels


def params(scene, out: Path, **kw) -> DatasetParams:
    imagery, labels = scene
    return DatasetParams(imagery=imagery, labels=labels, task="landcover", out=out, chip_size=CHIP, **kw)


def build(p: DatasetParams, reporter: Reporter | None = None) -> dict:
    build_dataset(p, reporter or Reporter(json_mode=True, out=io.StringIO()))
    return json.loads((p.out / "dataset.json").read_text())


@pytest.fixture(scope="module")
def dataset(scene, tmp_path_factory) -> tuple[Path, dict]:
    p = params(scene, tmp_path_factory.mktemp("ds") / "ds")
    return p.out, build(p)


def rows(catalog: Path, where: str = "1") -> list[dict]:
    with sqlite3.connect(catalog) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT * FROM chips WHERE {where} ORDER BY id")]


def test_catalog_rows_match_the_chips(dataset, scene):
    out, manifest = dataset
    assert manifest["class_names"] == ["forested", "water"]
    catalog = rows(out / "catalog.gpkg")
    assert [r["id"] for r in catalog] == [c["id"] for c in manifest["chips"]]
    for row, chip in zip(catalog, manifest["chips"]):
        with rasterio.open(out / chip["mask"]) as src:
            mask = src.read(1)
        for i, name in enumerate(manifest["class_names"]):
            assert row[fraction_field(name)] == pytest.approx((mask == i).mean(), abs=1e-6)
        assert row["frac_ignore"] == pytest.approx((mask == IGNORE).mean(), abs=1e-6)
        assert row["split"] == chip["split"] and row["hash"] == chip["hash"]
        assert row["hash"] == chip_hash(out / chip["image"], out / chip["mask"])
        assert row["imagery"] == str(scene[0]) and row["label_source"] == str(scene[1])
        assert row["offset_x"] == 0 and row["offset_y"] == 0
    # East of x = 160 m nothing is mapped: those chips are all ignore, so not kept.
    assert all(c["bounds"][0] < X0 + 160 for c in manifest["chips"])
    info = catalog_info(out / "catalog.gpkg")
    assert info["content_hash"] == manifest["content_hash"] and info["class_names"] == ["forested", "water"]
    weights = dict(zip(manifest["class_names"], manifest["class_weights"]))
    balance = dict(zip(manifest["class_names"], manifest["class_balance"]))
    assert balance["forested"] > balance["water"] and weights["water"] > weights["forested"]  # rarer weighs more
    with sqlite3.connect(out / "catalog.gpkg") as db:
        (qml,), = db.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = 'chips'")
    assert 'attr="split"' in qml and 'value="val"' in qml


def test_snapshot_by_sql_records_its_provenance(dataset, tmp_path, capsys):
    parent, manifest = dataset
    snap = tmp_path / "water"
    where = "frac_water > 0.1 OR split = 'val'"
    code = main(["--json", "dataset", "--from", str(parent), "--where", where, "--out", str(snap)])
    assert code == 0, capsys.readouterr().out
    picked = rows(parent / "catalog.gpkg", where)
    sm = json.loads((snap / "dataset.json").read_text())
    assert [c["id"] for c in sm["chips"]] == [r["id"] for r in picked] and 0 < len(picked) < len(manifest["chips"])
    assert sm["snapshot"]["query"] == where and sm["snapshot"]["parent_hash"] == manifest["content_hash"]
    assert sm["snapshot"]["chips"] == {r["id"]: r["hash"] for r in picked}
    assert sm["content_hash"] != manifest["content_hash"]
    assert [r["id"] for r in rows(snap / "catalog.gpkg")] == [r["id"] for r in picked]
    for chip in sm["chips"]:
        assert chip_hash(snap / chip["image"], snap / chip["mask"]) == chip["hash"]
    assert (os.stat(snap / "dataset.json").st_mode & 0o222) == 0  # read-only: immutable
    # train.py's keys are all there, band statistics from the snapshot's own train chips
    for key in ("task", "class_names", "class_colors", "band_count", "resolution_m", "chip_size",
                "input_scale", "mean", "std", "nodata"):
        assert key in sm
    capsys.readouterr()
    assert main(["--json", "dataset", "--from", str(parent), "--where", where, "--out", str(snap)]) == 2
    assert parse_event(capsys.readouterr().out.splitlines()[-1])["code"] == "SNAPSHOT_EXISTS"
    assert main(["--json", "dataset", "--from", str(parent), "--where", "frac_lava > 0",
                 "--out", str(tmp_path / "x")]) == 2
    error = parse_event(capsys.readouterr().out.splitlines()[-1])
    assert error["code"] == "BAD_WHERE" and "frac_water" in error["hint"]
    assert main(["--json", "dataset", "--from", str(parent), "--where", "frac_water > 2",
                 "--out", str(tmp_path / "y")]) == 2
    assert parse_event(capsys.readouterr().out.splitlines()[-1])["code"] == "EMPTY_SELECTION"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_background_ratio_with_complete(scene, tmp_path):
    none = build(params(scene, tmp_path / "a", complete=True))
    half = build(params(scene, tmp_path / "b", complete=True, background_ratio=0.5))
    assert none["class_names"] == ["background", "forested", "water"]

    def background_only(manifest, out):
        return [r for r in rows(out / "catalog.gpkg") if r["background_only"]]

    assert background_only(none, tmp_path / "a") == []
    bg = background_only(half, tmp_path / "b")
    labelled = len(half["chips"]) - len(bg)
    assert 0 < len(bg) <= 0.5 * labelled
    assert all(r["frac_background"] == 1.0 for r in bg)


class StopAt(Reporter):
    """Cancels (like SIGTERM) when the build reaches chip cell `at`."""

    def __init__(self, at: int) -> None:
        super().__init__(json_mode=True, out=io.StringIO())
        self.at = at

    def progress(self, stage, done, total, message=""):
        super().progress(stage, done, total, message)
        if done == self.at:
            raise Cancelled("SIGTERM")


def test_interrupted_build_resumes_where_it_stopped(scene, dataset, tmp_path):
    p = params(scene, tmp_path / "ds")
    with pytest.raises(Cancelled):
        build_dataset(p, StopAt(30))
    assert not p.out.exists()  # no half-written dataset under the final name
    again = io.StringIO()
    manifest = build(p, Reporter(json_mode=True, out=again))
    events = [parse_event(line) for line in again.getvalue().splitlines()]
    assert any(e["message"].startswith("resuming:") for e in events if e["event"] == "log")
    assert [e for e in events if e["event"] == "progress"][0]["done"] > 20  # earlier chips not redone
    assert manifest["content_hash"] == dataset[1]["content_hash"]  # same as an uninterrupted build
    assert not list(tmp_path.glob(".ds*"))


def test_a_snapshot_evaluates_its_where_once(dataset, tmp_path):
    """A condition that need not give the same rows twice (random()): the snapshot's
    catalog lists exactly the chips it took. It was evaluated twice (8 rows for 6 chips)."""
    import subprocess
    import sys

    parent, manifest = dataset
    snap = tmp_path / "random"
    proc = subprocess.run([sys.executable, "-m", "landcover_plugin.engine", "--json", "dataset", "--from",
                           str(parent), "--where", "id = '0000' OR abs(random()) % 2 = 0", "--out", str(snap)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]
    chips = [c["id"] for c in json.loads((snap / "dataset.json").read_text())["chips"]]
    assert chips[0] == "0000" and set(chips) <= {c["id"] for c in manifest["chips"]}
    assert [r["id"] for r in rows(snap / "catalog.gpkg")] == chips
