"""'Create environment' and 'Browse to engine': the interpreter found beside QGIS's on
each platform (fake installation layouts), the commands built, the progress read from
pip's lines, the failure messages; the QgsTask against real venv and pip runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from landcover_plugin.core.engine_env import (MIN_PYTHON_TEXT, EnvPlan, InstallProgress, Interpreter, base_python,
                                              building_dir, create_env_commands, failure_message, find_uv, plan_env,
                                              validate_engine_python, venv_python)

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = [ROOT / "requirements" / "engine.txt", ROOT / "requirements" / "accel-cpu.txt"]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


# Each QGIS as its Python's sys module describes it, and where its interpreter is.
LAYOUTS = {
    "windows-osgeo4w": ("win32", "OSGeo4W/bin/qgis-bin.exe", "OSGeo4W/apps/Python312", (3, 12),
                        "OSGeo4W/apps/Python312/python.exe"),
    # the standalone installer, when PYTHONHOME is not where the interpreter is
    "windows-installer": ("win32", "QGIS 3.40/bin/qgis-ltr-bin.exe", "QGIS 3.40/elsewhere", (3, 12),
                          "QGIS 3.40/apps/Python312/python.exe"),
    "macos-qgis-app": ("darwin", "QGIS.app/Contents/MacOS/QGIS", "QGIS.app/Contents/MacOS", (3, 11),
                       "QGIS.app/Contents/MacOS/bin/python3"),
    "macos-framework": ("darwin", "QGIS.app/Contents/MacOS/QGIS",
                        "QGIS.app/Contents/Frameworks/Python.framework/Versions/3.12", (3, 12),
                        "QGIS.app/Contents/Frameworks/Python.framework/Versions/3.12/bin/python3.12"),
    "linux-embedded": ("linux", "usr/bin/qgis", "usr", (3, 11), "usr/bin/python3.11"),
    "linux-python": ("linux", "usr/bin/python3", "usr", (3, 11), "usr/bin/python3"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_python_beside_qgis_is_found_on_each_platform(tmp_path, layout):
    platform, exe, prefix, version, interpreter = LAYOUTS[layout]
    touch(tmp_path / exe)
    expected = touch(tmp_path / interpreter)
    qgis = Interpreter(str(tmp_path / exe), str(tmp_path / prefix), platform, version)
    assert base_python(qgis) == str(expected)


def test_the_qgis_binary_itself_is_never_taken(tmp_path):
    qgis = Interpreter(str(touch(tmp_path / "OSGeo4W/bin/qgis-bin.exe")), str(tmp_path / "OSGeo4W/apps/Python312"),
                       "win32", (3, 12))
    assert base_python(qgis) is None


def test_pip_commands_per_platform(tmp_path):
    venv = tmp_path / "landcover" / "venv"
    for platform, python, venv_exe in (("win32", r"C:\OSGeo4W\apps\Python312\python.exe", "Scripts/python.exe"),
                                       ("darwin", "/Applications/QGIS.app/Contents/MacOS/bin/python3", "bin/python"),
                                       ("linux", "/usr/bin/python3", "bin/python")):
        commands = create_env_commands(venv, REQUIREMENTS, python=python, platform=platform)
        assert commands[0] == [python, "-m", "venv", str(venv)]  # QGIS's base Python only creates the venv
        assert all(c[0] == str(venv / venv_exe) for c in commands[1:])  # pip runs in the new venv
        assert commands[-1][-4:] == ["-r", str(REQUIREMENTS[0]), "-r", str(REQUIREMENTS[1])]
        assert "--progress-bar" in commands[-1]  # pip's lines, not bars, in the log panel


def test_uv_is_preferred_and_fetches_a_python_when_qgis_is_too_old(tmp_path):
    prefix = tmp_path / "OSGeo4W/apps/Python39"
    touch(prefix / "python.exe")
    old_qgis = Interpreter(str(tmp_path / "OSGeo4W/bin/qgis-bin.exe"), str(prefix), "win32", (3, 9))
    venv = tmp_path / "venv"
    plan = plan_env(venv, REQUIREMENTS, old_qgis, uv="uv.exe")
    assert plan.commands[0] == ["uv.exe", "venv", "--python", MIN_PYTHON_TEXT, str(building_dir(venv))]
    assert plan.commands[1][:5] == ["uv.exe", "pip", "install", "--python",
                                    str(building_dir(venv) / "Scripts" / "python.exe")]
    python312 = touch(tmp_path / "OSGeo4W/apps/Python312/python.exe")
    current = Interpreter(str(tmp_path / "OSGeo4W/bin/qgis-bin.exe"), str(python312.parent), "win32", (3, 12))
    plan = plan_env(venv, REQUIREMENTS, current, uv="uv.exe")
    assert plan.commands[0][3] == str(python312)  # uv, with QGIS's own base Python


def test_uv_is_found_where_its_installer_puts_it(tmp_path):
    assert find_uv(tmp_path, which=lambda name: None) is None
    uv = touch(tmp_path / ".local" / "bin" / "uv")
    assert find_uv(tmp_path, which=lambda name: None) == str(uv)
    assert find_uv(tmp_path, which=lambda name: "/opt/uv") == "/opt/uv"


def test_progress_counts_each_requirement_pip_reaches():
    commands = create_env_commands(Path("venv"), REQUIREMENTS, python="python3")
    progress = InstallProgress(commands, REQUIREMENTS)
    assert len(progress.names) == 21 and "tensorflow-cpu" in progress.names and "pyyaml" in progress.names
    values = [progress.percent(), progress.next_command(), progress.next_command()]
    # pip 26's lines (after the upgrade), and the older pip's without "(from ...)"
    lines = ["Collecting affine==3.0.1 (from -r requirements/engine.txt (line 4))",
             "Processing /opt/pypi/files/dask-2026.8.0-py3-none-any.whl (from -r requirements/engine.txt (line 5))",
             "Collecting dask==2026.8.0 (from dask[distributed]==2026.8.0->-r engine.txt (line 5))",  # seen
             "Collecting click>=8.1 (from dask==2026.8.0->-r requirements/engine.txt (line 5))",  # a dependency
             "Processing /opt/pypi/files/PyYAML-6.0.3-cp311-cp311-manylinux_2_17_x86_64.whl",
             "  Downloading tensorflow_cpu-2.21.0-cp311-cp311-manylinux_2_17_x86_64.whl.metadata (4.4 kB)",
             "Collecting tensorflow-cpu==2.21.0 (from -r requirements/accel-cpu.txt (line 1))",
             "Installing collected packages: affine, dask, tensorflow-cpu",
             "Successfully installed affine-3.0.1 dask-2026.8.0 tensorflow-cpu-2.21.0"]
    moved = [progress.update(line) for line in lines]
    assert [m is not None for m in moved] == [True, True, False, False, True, False, True, True, True]
    values += [m for m in moved if m is not None]
    assert values == sorted(values) and values[0] == 0 and values[-1] == pytest.approx(100)
    assert values[3] == pytest.approx(10 + 90 * 0.8 / 21)  # one of 21 requirements
    assert progress.stage == "Installing the engine's packages: unpacking"


def test_failure_messages_name_the_command_its_last_lines_and_the_fix():
    command = ["/usr/bin/python3", "-m", "venv", "/p/.venv.building"]
    message = failure_message(command, 1, ["Error: Command '['/p/.venv.building/bin/python3', '-m', 'ensurepip', "
                                           "'--upgrade']' returned non-zero exit status 1."])
    assert "`/usr/bin/python3 -m venv /p/.venv.building`" in message and "exited with 1" in message
    assert "ensurepip" in message and "python3-venv" in message and "uv" in message
    pip = ["/p/bin/python", "-m", "pip", "install", "-r", "engine.txt"]
    lines = [f"line {i}" for i in range(30)] + ["ERROR: No matching distribution found for numpy==2.4.6"]
    message = failure_message(pip, 1, lines)
    assert "line 0\n" not in message and "No matching distribution" in message and "HTTPS_PROXY" in message
    old = failure_message(pip, 1, ["ERROR: Ignored the following versions that require a different python "
                                   "version: 2.4.6 Requires-Python >=3.11"])
    assert f"older than the engine needs ({MIN_PYTHON_TEXT})" in old
    uv = failure_message(["uv", "pip", "install", "--python", "v/bin/python"], 2,
                         ["error: Failed to fetch: https://pypi.org/simple/matplotlib/",
                          "  cause: invalid peer certificate: UnknownIssuer"])
    assert "`uv pip install --python ...` (uv) exited with 2" in uv and "UnknownIssuer" in uv and "HTTPS_PROXY" in uv
    missing = failure_message(["python3", "-m", "venv", "v"], None, ["No such file or directory"])
    assert "Could not start `python3 -m venv v`: No such file or directory" in missing and "uv" in missing


def test_browse_to_engine_accepts_an_engine_and_says_why_not_otherwise(tmp_path):
    checkout = ROOT / ".venv"
    assert validate_engine_python(checkout) == (venv_python(checkout), None)  # its folder will do
    assert validate_engine_python(venv_python(checkout))[1] is None
    python, problem = validate_engine_python(Path("/usr/bin/python3"))  # QGIS's own: no engine packages
    assert python == Path("/usr/bin/python3") and "not an engine environment" in problem
    assert "rasterio" in problem and "onnxruntime" in problem and "Create environment" in problem
    text = touch(tmp_path / "notes.txt")
    assert "is not a Python interpreter" in validate_engine_python(text)[1]
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    assert "not an engine environment" in validate_engine_python(script)[1]  # runs, but is no engine


def test_browse_to_engine_keeps_only_an_engine_in_the_settings(qgis_app, tmp_path):
    from qgis.core import QgsSettings

    from landcover_plugin.core.engine_env import SETTINGS_KEY
    from landcover_plugin.core.locate import choose_engine_python

    QgsSettings().remove(SETTINGS_KEY)
    assert "not an engine environment" in choose_engine_python(Path("/usr/bin/python3"))
    assert not QgsSettings().value(SETTINGS_KEY, "")
    assert choose_engine_python(ROOT / ".venv") is None
    assert QgsSettings().value(SETTINGS_KEY, "") == str(venv_python(ROOT / ".venv"))
    QgsSettings().remove(SETTINGS_KEY)


def _run_task(plan: EnvPlan, wait_until, cancel_when=None) -> tuple[bool, str, list[float], list[str]]:
    from qgis.core import QgsApplication

    from landcover_plugin.core.setup_task import CreateEnvTask

    done, percents, stages = [], [], []
    task = CreateEnvTask(plan, lambda ok, message: done.append((ok, message)))
    task.progressChanged.connect(percents.append)
    task.stageChanged.connect(stages.append)
    QgsApplication.taskManager().addTask(task)
    if cancel_when is not None:
        assert wait_until(cancel_when, 60)
        task.cancel()
    assert wait_until(lambda: bool(done), 300)
    return done[0][0], done[0][1], percents, stages


def test_a_failed_creation_says_why_and_leaves_no_environment(qgis_app, wait_until, tmp_path):
    requirements = touch(tmp_path / "requirements.txt")
    requirements.write_text("landcover-no-such-package==0.0.1\n")
    venv = tmp_path / "landcover" / "venv"
    create, _upgrade, install = create_env_commands(building_dir(venv), [requirements], python=base_python())
    commands = [create, install[:4] + ["--no-index"] + install[4:]]  # fails at once, offline
    ok, message, percents, stages = _run_task(EnvPlan(venv, commands, [requirements]), wait_until)
    assert not ok
    assert "Creating the engine environment failed" in message and "-m pip install" in message
    assert "landcover-no-such-package" in message and "HTTPS_PROXY" in message  # its last lines, what to do
    assert stages[:2] == ["Creating the Python environment", "Installing the engine's packages"]
    assert percents and percents == sorted(percents) and percents[-1] < 100
    assert not venv.exists() and not building_dir(venv).exists()


def test_uv_creates_the_environment(qgis_app, wait_until, tmp_path):
    uv = Path(sys.executable).with_name("uv")  # requirements/test-engine.txt
    requirements = touch(tmp_path / "requirements.txt")
    requirements.write_text("affine==3.0.1\nscikit-learn==1.9.1\n")
    venv = tmp_path / "venv"
    commands = create_env_commands(building_dir(venv), [requirements], python=base_python(), uv=str(uv))
    ok, message, percents, stages = _run_task(EnvPlan(venv, commands, [requirements]), wait_until)
    assert ok, message
    assert percents == sorted(percents) and percents[-1] == pytest.approx(100)
    assert stages[:2] == ["Creating the Python environment", "Installing the engine's packages"]
    imported = subprocess.run([str(venv_python(venv)), "-c", "import affine, sklearn"], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    assert not building_dir(venv).exists()


def test_a_cancelled_creation_leaves_no_environment(qgis_app, wait_until, tmp_path):
    venv = tmp_path / "venv"
    started = tmp_path / "started"
    # A silent step, like unpacking TensorFlow: cancel must not wait for a line.
    silent = [sys.executable, "-c", "import os, sys, time; os.makedirs(sys.argv[1]); open(sys.argv[2], 'w').close(); "
              "time.sleep(600)", str(building_dir(venv)), str(started)]
    ok, message, _, _ = _run_task(EnvPlan(venv, [silent], []), wait_until, cancel_when=started.exists)
    assert not ok and message.startswith("Cancelled")
    assert not venv.exists() and not building_dir(venv).exists()

