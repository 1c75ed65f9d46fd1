"""Bad input is never a bug: every subcommand, fed inputs a user can get wrong,
ends with exit 2 and an error event that says how to fix it (issue 13).

Each row ran into an internal error (exit 1, "This is a bug in landcover"), a
crash, or a silently wrong result before. Through the real `landcover` command,
on the NEON sample image, its crowns and the shipped model. A new subcommand
must bring its own rows (test_every_subcommand_is_swept).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

from landcover_plugin.contract.names import MODELS_DIR
from landcover_plugin.engine.cli import build_parser, user_error

ENGINE = [sys.executable, "-m", "landcover_plugin.engine", "--json"]
TREES_BASE = MODELS_DIR / "trees-base"
AOI_WGS84 = "-81.99,29.68,-81.98,29.69"  # any box: these runs stop before it is used
OSBS_AOI = "404215,3285105,404245,3285135"  # inside OSBS_029, EPSG:32617


def landcover(*args: str | Path) -> tuple[int, dict]:
    proc = subprocess.run([*ENGINE, *map(str, args)], capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else {"stderr": proc.stderr[-2000:]}


@dataclass
class Inputs:
    """The bad (and good) files the rows use; `out` is each row's own empty folder."""

    osbs: Path
    csv: Path
    dataset: Path
    folder: Path
    out: Path = Path()

    def __getattr__(self, name: str) -> Path:  # the files made below, by name
        return self.folder / name.replace("_", ".", 1)

    def pipeline(self, **spec) -> Path:
        path = self.out / "pipeline.yaml"
        path.write_text(json.dumps({"task": "trees", "imagery": str(self.osbs), "out": str(self.out / "o.gpkg"),
                                    "workdir": str(self.out / "work"), **spec}))
        return path


@pytest.fixture(scope="module")
def inputs(osbs_tif, osbs_csv, tmp_path_factory) -> Inputs:
    from test_torch_weights import legacy_pth

    folder = tmp_path_factory.mktemp("bad")
    dataset = folder / "dataset"
    code, event = landcover("dataset", "--imagery", osbs_tif, "--labels", osbs_csv, "--task", "trees",
                            "--chip-size", "64", "--out", dataset)
    assert code == 0, event
    tif = osbs_tif.read_bytes()
    (folder / "truncated.tif").write_bytes(tif[:len(tif) // 3])  # a download cut short: opens, then fails
    (folder / "garbage.onnx").write_bytes(b"\x08" + b"not a model" * 20)
    (folder / "notes.txt").write_text("not a vector file")
    model = onnx.load(str(TREES_BASE / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "landcover.input_scale":
            prop.value = "0"
    onnx.save(model, str(folder / "scale0.onnx"))
    for name, change in (("badjson", lambda d: (d / "dataset.json").write_text('{"task": "trees", "chips": [')),
                         ("nokeys", lambda d: (d / "dataset.json").write_text('{"task": "trees"}')),
                         ("badcatalog", lambda d: (d / "catalog.gpkg").write_bytes(b"not a database"))):
        shutil.copytree(dataset, folder / name)
        change(folder / name)
    (folder / "tenepochs.yaml").write_text("epochs: ten\n")
    # Polygons in metres (UTM) but without a CRS: GeoJSON reads them as degrees, far outside UTM 17N
    (folder / "nocrs.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"label": "a"},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}}]}))
    with pytest.MonkeyPatch.context() as mp:  # a tensor whose stride leaves its storage: a segfault before
        (folder / "crafted.pth").write_bytes(legacy_pth(mp, {"features.0.0.weight": (0, (3,), (10**15,))},
                                                        np.zeros(12, np.float32)))
    return Inputs(osbs_tif, osbs_csv, dataset, folder)


Row = tuple[str, str, str, Callable[[Inputs], list]]  # command, what, error code, arguments
ROWS: list[Row] = [
    ("fetch", "a truncated GeoTIFF source", "CORRUPT_IMAGERY",
     lambda f: ["--aoi", OSBS_AOI, "--aoi-crs", "EPSG:32617", "--source", f.truncated_tif, "--out", f.out / "m.tif"]),
    ("fetch", "an unknown --aoi-crs", "BAD_CRS",
     lambda f: ["--aoi", OSBS_AOI, "--aoi-crs", "EPSG:99999", "--source", f.osbs, "--out", f.out / "m.tif"]),
    ("fetch", "an AOI across the antimeridian", "BAD_AOI",
     lambda f: ["--aoi", "179.5,-17,-179.5,-16", "--source", f.osbs, "--out", f.out / "m.tif"]),
    ("fetch", "an AOI of NaNs", "BAD_AOI",
     lambda f: ["--aoi", "nan,nan,nan,nan", "--aoi-crs", "EPSG:32617", "--source", f.osbs, "--out", f.out / "m.tif"]),
    ("fetch", "an AOI file that is not a vector file", "BAD_AOI",
     lambda f: ["--aoi", f.notes_txt, "--source", f.osbs, "--out", f.out / "m.tif"]),
    ("fetch", "--workers 0", "BAD_PARAMS",
     lambda f: ["--aoi", AOI_WGS84, "--source", f.osbs, "--workers", "0", "--out", f.out / "m.tif"]),
    ("fetch", "a --header without a colon", "BAD_HEADERS",
     lambda f: ["--aoi", AOI_WGS84, "--source", f.osbs, "--header", "Referer", "--out", f.out / "m.tif"]),
    ("fetch", "--max-bytes nan", "BAD_ARGUMENTS",
     lambda f: ["--aoi", AOI_WGS84, "--source", f.osbs, "--max-bytes", "nan", "--out", f.out / "m.tif"]),
    ("fetch", "--gsd inf", "BAD_ARGUMENTS",
     lambda f: ["--aoi", AOI_WGS84, "--source", f.osbs, "--gsd", "inf", "--out", f.out / "m.tif"]),
    ("fetch", "an unknown --wms-crs", "BAD_CRS",
     lambda f: ["--aoi", AOI_WGS84, "--source", f.osbs, "--wms-crs", "EPSG:99999", "--out", f.out / "m.tif"]),
    ("fetch", "a garbage .onnx as --model", "BAD_MODEL",
     lambda f: ["--aoi", AOI_WGS84, "--source", f.osbs, "--model", f.garbage_onnx, "--out", f.out / "m.tif"]),
    ("labels", "an unknown --aoi-crs", "BAD_CRS",
     lambda f: ["--preset", "trees", "--overpass", "http://127.0.0.1:9/api/interpreter", "--aoi", OSBS_AOI,
                "--aoi-crs", "EPSG:99999", "--out", f.out / "l.gpkg"]),
    ("labels", "an --overpass that is no URL", "BAD_OVERPASS_URL",
     lambda f: ["--preset", "trees", "--overpass", "not a url", "--aoi", AOI_WGS84, "--out", f.out / "l.gpkg"]),
    ("labels", "--overpass-timeout -1", "BAD_PARAMS",
     lambda f: ["--preset", "trees", "--overpass", "http://127.0.0.1:9/api/interpreter", "--aoi", AOI_WGS84,
                "--overpass-timeout", "-1", "--out", f.out / "l.gpkg"]),
    ("dataset", "truncated GeoTIFF imagery", "CORRUPT_IMAGERY",
     lambda f: ["--imagery", f.truncated_tif, "--labels", f.csv, "--task", "trees", "--out", f.out / "d"]),
    ("dataset", "--chip-size 100000 (tried to allocate 27.9 GiB)", "BAD_CHIP_SIZE",
     lambda f: ["--imagery", f.osbs, "--labels", f.csv, "--task", "trees", "--chip-size", "100000", "--out",
                f.out / "d"]),
    ("dataset", "a chip larger than the imagery", "BAD_CHIP_SIZE",
     lambda f: ["--imagery", f.osbs, "--labels", f.csv, "--task", "trees", "--chip-size", "1024", "--out",
                f.out / "d"]),
    ("dataset", "--offset nan,1", "BAD_OFFSET",
     lambda f: ["--imagery", f.osbs, "--labels", f.csv, "--task", "trees", "--offset", "nan,1", "--out",
                f.out / "d"]),
    ("dataset", "--crown-radius inf", "BAD_ARGUMENTS",
     lambda f: ["--imagery", f.osbs, "--labels", f.csv, "--task", "trees", "--crown-radius", "inf", "--out",
                f.out / "d"]),
    ("dataset", "labels whose coordinates are not in their CRS", "LABELS_OUTSIDE_IMAGERY",
     lambda f: ["--imagery", f.osbs, "--labels", f.nocrs_geojson, "--class-field", "label", "--out", f.out / "d"]),
    ("dataset", "--from a dataset with a corrupt dataset.json", "BAD_DATASET",
     lambda f: ["--from", f.badjson, "--where", "1", "--out", f.out / "d"]),
    ("dataset", "--from a dataset whose catalog is no database", "BAD_DATASET",
     lambda f: ["--from", f.badcatalog, "--where", "1", "--out", f.out / "d"]),
    ("train", "a corrupt dataset.json", "BAD_DATASET",
     lambda f: ["--dataset", f.badjson, "--out", f.out / "m", "--epochs", "1"]),
    ("train", "a dataset.json without its keys", "BAD_DATASET",
     lambda f: ["--dataset", f.nokeys, "--out", f.out / "m", "--epochs", "1"]),
    ("train", "--learning-rate nan (trained on NaNs before)", "BAD_ARGUMENTS",
     lambda f: ["--dataset", f.dataset, "--out", f.out / "m", "--learning-rate", "nan"]),
    ("train", "--batch-size 100000 (a segmentation fault in TensorFlow before)", "BAD_PARAMS",
     lambda f: ["--dataset", f.dataset, "--out", f.out / "m", "--epochs", "1", "--batch-size", "100000"]),
    ("train", "a config with epochs: ten", "BAD_CONFIG",
     lambda f: ["--config", f.tenepochs_yaml, "--dataset", f.dataset, "--out", f.out / "m"]),
    ("train", "a crafted .pth as encoder weights (a segfault before)", "ENCODER_WEIGHTS_BAD",
     lambda f: ["--dataset", f.dataset, "--out", f.out / "m", "--epochs", "1", "--encoder", "mobilenetv2",
                "--encoder-weights", f.crafted_pth]),
    ("eval", "a garbage .onnx", "BAD_MODEL",
     lambda f: ["--model", f.garbage_onnx, "--dataset", f.dataset, "--out", f.out / "r"]),
    ("eval", "a model of 128 px tiles on 64 px chips", "MODEL_DATASET_MISMATCH",
     lambda f: ["--model", TREES_BASE, "--dataset", f.dataset, "--out", f.out / "r"]),
    ("eval", "a corrupt dataset.json", "BAD_DATASET",
     lambda f: ["--model", TREES_BASE, "--dataset", f.badjson, "--out", f.out / "r"]),
    ("predict", "truncated GeoTIFF imagery", "CORRUPT_IMAGERY",
     lambda f: ["--model", TREES_BASE, "--imagery", f.truncated_tif, "--out", f.out / "p.gpkg"]),
    ("predict", "a garbage .onnx", "BAD_MODEL",
     lambda f: ["--model", f.garbage_onnx, "--imagery", f.osbs, "--out", f.out / "p.gpkg"]),
    ("predict", "a model whose input scale is 0", "BAD_MODEL",
     lambda f: ["--model", f.scale0_onnx, "--imagery", f.osbs, "--out", f.out / "p.gpkg"]),
    ("predict", "an AOI file whose coordinates are not in its CRS", "BAD_AOI",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--aoi", f.nocrs_geojson, "--out", f.out / "p.gpkg"]),
    ("predict", "--batch-size 0", "BAD_PARAMS",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--batch-size", "0",
                                             "--out", f.out / "p.gpkg"]),
    ("predict", "--batch-size 1000000 (more memory than any machine)", "BAD_PARAMS",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--batch-size", "1000000", "--out", f.out / "p.gpkg"]),
    ("predict", "--block-size 0", "BAD_PARAMS",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--block-size", "0",
                                             "--out", f.out / "p.gpkg"]),
    ("predict", "--tile-size 20 (inside the model's 16 px overlap on each side)", "BAD_PARAMS",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--tile-size", "20", "--out", f.out / "p.gpkg"]),
    ("predict", "--tile-size 100 (a side the U-Net's pooling does not divide)", "BAD_PARAMS",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--tile-size", "100", "--out", f.out / "p.gpkg"]),
    ("predict", "--precision int8 for a model without an int8 copy", "NO_INT8_MODEL",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--precision", "int8", "--out", f.out / "p.gpkg"]),
    ("predict", "an unknown --aoi-crs", "BAD_CRS",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--aoi", OSBS_AOI,
                                                   "--aoi-crs", "EPSG:99999", "--out", f.out / "p.gpkg"]),
    ("predict", "no --imagery", "BAD_ARGUMENTS",
     lambda f: ["--model", TREES_BASE, "--out", f.out / "p.gpkg"]),
    ("remote", "no action", "BAD_ARGUMENTS", lambda f: []),
    ("remote", "a destination that would run a shell command", "BAD_HOST", lambda f: ["jobs", "gpu;rm -rf ~"]),
    ("remote", "a host nobody answers on", "HOST_UNREACHABLE", lambda f: ["jobs", "ssh://127.0.0.1:1"]),
    ("quantize", "a garbage .onnx", "BAD_MODEL",
     lambda f: ["--model", f.garbage_onnx, "--out", f.out / "q.onnx"]),
    ("quantize", "truncated calibration imagery", "CORRUPT_IMAGERY",
     lambda f: ["--model", TREES_BASE, "--imagery", f.truncated_tif, "--out", f.out / "q.onnx"]),
    ("quantize", "--calibration-tiles 0", "BAD_PARAMS",
     lambda f: ["--model", TREES_BASE, "--imagery", f.osbs, "--calibration-tiles", "0", "--out", f.out / "q.onnx"]),
    ("run", "a pipeline with epochs: abc", "BAD_PIPELINE",
     lambda f: [f.pipeline(labels=str(f.csv), train={"epochs": "abc"})]),
    ("run", "a pipeline whose imagery has no source", "BAD_PIPELINE",
     lambda f: [f.pipeline(imagery={"gsd": 1}, model=str(TREES_BASE))]),
    ("run", "a pipeline with chip_size 100000", "BAD_CHIP_SIZE",
     lambda f: [f.pipeline(labels=str(f.csv), train={"chip_size": 100000})]),
    ("run", "a pipeline with an unknown aoi_crs", "BAD_CRS",
     lambda f: [f.pipeline(aoi=OSBS_AOI, aoi_crs="EPSG:99999", model=str(TREES_BASE))]),
    ("run", "a pipeline whose workdir is a file", "BAD_WORKDIR",
     lambda f: [f.pipeline(model=str(TREES_BASE), workdir=str(f.notes_txt))]),
    ("run", "a pipeline with a garbage .onnx model", "BAD_MODEL",
     lambda f: [f.pipeline(model=str(f.garbage_onnx))]),
    ("run", "a pipeline with truncated imagery", "CORRUPT_IMAGERY",
     lambda f: [f.pipeline(imagery=str(f.truncated_tif), model=str(TREES_BASE))]),
]


@pytest.mark.parametrize("command, what, expected, args", ROWS, ids=[f"{c}: {w}" for c, w, _, _ in ROWS])
def test_bad_input_ends_in_exit_2_with_a_hint(inputs, tmp_path, command, what, expected, args):
    inputs.out = tmp_path
    code, event = landcover(command, *args(inputs))
    assert code == 2, event
    assert event.get("event") == "error" and event["code"] == expected, event
    assert event["message"].strip() and event["hint"].strip(), event
    assert not list(tmp_path.glob(".*partial*")), "a refused run leaves nothing half-written"


def test_every_subcommand_is_swept():
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(subcommands) == {command for command, *_ in ROWS}


@pytest.mark.parametrize("err, code", [(errno.ENOSPC, "DISK_FULL"), (errno.EDQUOT, "DISK_FULL"),
                                       (errno.EACCES, "NOT_PERMITTED"), (errno.EROFS, "READ_ONLY")])
def test_the_machines_state_is_no_bug(err, code):
    """A full disk or an unwritable folder, wherever a stage meets it, is exit 2 with a hint."""
    error = user_error(OSError(err, os.strerror(err), "/data/out.gpkg"))
    assert error.code == code and "/data/out.gpkg" in error.message and error.hint
    assert user_error(OSError(errno.ENOENT, "No such file")) is None  # may be ours: reported as a bug
    assert user_error(KeyError("x")) is None


@pytest.mark.parametrize("aoi, why", [("179.5,-17,-179.5,-16", "antimeridian"),
                                      ("179.5,-17,180.5,-16", "antimeridian"),
                                      ("10,40,5,41", "empty"),  # min and max swapped: not across the world
                                      ("-82,29,-81,nan", "finite")])
def test_aoi_messages_say_why(aoi, why):
    from landcover_plugin.engine.imagery.aoi import parse_aoi
    from landcover_plugin.engine.errors import EngineError

    with pytest.raises(EngineError) as err:
        parse_aoi(aoi)
    assert why in err.value.message and err.value.hint
