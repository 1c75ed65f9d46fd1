"""EngineRun and the engine's location, against the real engine process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from landcover_plugin.core.engine_env import (ENV_VAR, check_engine, create_env_commands, find_engine_python,
                                              package_root, requirement_files, venv_python)
from landcover_plugin.contract.pipeline_file import PipelineFile
from landcover_plugin.contract.runner import EngineFailed, EngineRun, OverallProgress, engine_env


def test_bad_input_reports_code_message_and_hint(engine_python, osbs_csv, tmp_path):
    missing = tmp_path / "no-such-imagery.tif"
    pipeline = PipelineFile(task="trees", aoi=(0, 0, 1, 1), aoi_crs="EPSG:32617", imagery=str(missing),
                            labels=osbs_csv, out=tmp_path / "out.gpkg", workdir=tmp_path / "work").write(tmp_path / "p.yaml")
    run = EngineRun(engine_python, ["run", str(pipeline)], cwd=tmp_path)
    seen = []
    with pytest.raises(EngineFailed) as info:
        run.run(seen.append)
    assert info.value.code not in ("INTERNAL", "ENGINE_CRASHED", "CANCELLED"), info.value
    assert str(missing) in info.value.message and info.value.hint
    assert run.proc.returncode == 2
    assert seen and seen[-1]["event"] == "error" and seen[-1]["code"] == info.value.code
    assert not (tmp_path / "out.gpkg").exists()
    assert run.proc.stdout.closed and run.proc.stderr.closed  # no "ResourceWarning: unclosed file" per run


def test_missing_model_error_from_predict(engine_python, osbs_tif, tmp_path):
    run = EngineRun(engine_python, ["predict", "--model", "/nonexistent/model.onnx", "--imagery", str(osbs_tif),
                                    "--out", str(tmp_path / "r.gpkg")], cwd=tmp_path)
    with pytest.raises(EngineFailed) as info:
        run.run()
    assert info.value.code not in ("INTERNAL", "ENGINE_CRASHED"), info.value
    assert "/nonexistent/model.onnx" in info.value.message and info.value.hint
    assert not (tmp_path / "r.gpkg").exists()


def test_missing_engine_python_is_a_clear_error(tmp_path):
    run = EngineRun(tmp_path / "nope" / "bin" / "python", ["run", "x.yaml"])
    with pytest.raises(EngineFailed) as info:
        run.run()
    assert info.value.code == "ENGINE_MISSING"
    assert "engine environment is missing" in info.value.message and "make install" in info.value.message


def test_engine_env_isolates_qgis_variables(tmp_path):
    env = engine_env(tmp_path, {"PYTHONPATH": "/usr/share/qgis/python", "PROJ_LIB": "/x", "HOME": "/h"})
    assert env["PYTHONPATH"] == str(tmp_path) and "PROJ_LIB" not in env and env["HOME"] == "/h"


def test_overall_progress_weighs_stages_by_their_time():
    p = OverallProgress()
    assert p.update({"stage": "fetch", "done": 5, "total": 10}) == 50.0  # a single command
    p = OverallProgress()  # fetch 8, dataset 4, train 76, predict 8 (of 96)
    assert p.update({"stage": "pipeline", "done": 0, "total": 4, "message": "fetch"}) == 0.0
    assert p.update({"stage": "fetch", "done": 1, "total": 2}) == pytest.approx(100 * 4 / 96)
    assert p.update({"stage": "pipeline", "done": 2, "total": 4, "message": "train"}) == pytest.approx(100 * 12 / 96)
    epoch_3_of_300 = p.update({"stage": "train", "done": 3, "total": 300})
    assert epoch_3_of_300 < 15  # not "50 %" at epoch 3 of 300
    assert p.update({"stage": "train", "done": 300, "total": 300}) == pytest.approx(100 * 88 / 96)
    assert p.update({"stage": "pipeline", "done": 4, "total": 4, "message": "done"}) == 100.0
    assert p.update({"stage": "predict", "done": 0, "total": 0}) is None
    p = OverallProgress()  # a pipeline this plugin does not know: equal shares
    assert p.update({"stage": "pipeline", "done": 1, "total": 3, "message": "other"}) == pytest.approx(100 / 3)


def test_find_engine_python_order(tmp_path):
    assert find_engine_python("/s/python", tmp_path, {ENV_VAR: "/e/python"}).python == Path("/e/python")
    assert find_engine_python("/s/python", tmp_path, {}).python == Path("/s/python")
    checkout = venv_python(package_root() / ".venv")
    expected = checkout if checkout.exists() else venv_python(tmp_path / "landcover" / "venv")
    assert find_engine_python(None, tmp_path, {}).python == expected


def test_check_engine_names_the_missing_path_and_the_fix(tmp_path):
    location = find_engine_python(None, None, {ENV_VAR: str(tmp_path / "python")})
    message = check_engine(location)
    assert str(tmp_path / "python") in message and ENV_VAR in message
    assert "make install" in message and "Create environment" in message
    exe = tmp_path / "python"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert check_engine(location) is None


def test_create_env_commands_use_a_venv_of_their_own(tmp_path):
    requirements = requirement_files()
    assert requirements is not None and all(r.exists() for r in requirements)
    commands = create_env_commands(tmp_path / "venv", requirements, python="/usr/bin/python3")
    assert commands[0] == ["/usr/bin/python3", "-m", "venv", str(tmp_path / "venv")]
    assert all(c[0] == str(tmp_path / "venv" / "bin" / "python") for c in commands[1:])
    assert str(requirements[0]) in commands[-1] and os.path.basename(str(requirements[1])) == "accel-cpu.txt"
