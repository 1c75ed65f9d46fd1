"""Where the engine's Python is, and what to tell the user when it is missing.

The engine runs in its own virtual environment, never in QGIS's Python
(docs/DESIGN.md), so the plugin only needs the path of that environment's python.
No Qt or qgis import here: callers read QgsSettings and pass the values in.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ENV_VAR = "LANDCOVER_ENGINE_PYTHON"
SETTINGS_KEY = "landcover/engine_python"


def plugin_dir() -> Path:
    """The landcover_plugin package folder, symlinks followed (a dev install
    links it into the QGIS profile; resolving leads back to the checkout)."""
    return Path(__file__).resolve().parents[1]


def package_root() -> Path:
    """The folder holding the landcover_plugin package: the engine's PYTHONPATH,
    so the engine code always matches the plugin's (also for a zip install)."""
    return plugin_dir().parent


def find_resource(relative: str) -> Path | None:
    """A file shipped with the plugin: inside the plugin folder (zip install)
    or beside it (the git checkout, where resources/ and requirements/ live)."""
    for base in (plugin_dir(), package_root()):
        if (base / relative).exists():
            return base / relative
    return None


def venv_python(venv: Path, platform: str = sys.platform) -> Path:
    return venv / ("Scripts/python.exe" if platform == "win32" else "bin/python")


def user_venv(user_data_dir: Path) -> Path:
    """The environment 'Create environment' makes, in the QGIS profile folder."""
    return Path(user_data_dir) / "landcover" / "venv"


@dataclass(frozen=True)
class EngineLocation:
    python: Path
    origin: str  # where the path came from, for messages: env var, settings, checkout, user data


def find_engine_python(setting: str | None = None, user_data_dir: Path | None = None,
                       environ: Mapping[str, str] = os.environ) -> EngineLocation:
    """The engine's python: env var, else the QGIS setting, else the checkout's
    .venv, else the user-data venv. An explicit choice (env var, setting) is
    returned even when missing, so the message names what the user chose."""
    if environ.get(ENV_VAR):
        return EngineLocation(Path(environ[ENV_VAR]), f"the {ENV_VAR} environment variable")
    if setting:
        return EngineLocation(Path(setting), f"the QGIS setting {SETTINGS_KEY}")
    checkout = venv_python(package_root() / ".venv")
    if checkout.exists() or user_data_dir is None:
        return EngineLocation(checkout, "the plugin's source folder")
    return EngineLocation(venv_python(user_venv(user_data_dir)), "the QGIS profile folder")


def check_engine(location: EngineLocation) -> str | None:
    """None when the engine's python is there; else the message for the user."""
    if location.python.is_file() and os.access(location.python, os.X_OK):
        return None
    return missing_message(location)


def missing_message(location: EngineLocation) -> str:
    return (f"The landcover engine environment is missing: {location.python} (from {location.origin}) "
            "does not exist. Run `make install` in the plugin's source folder, or press "
            "'Create environment' in the Landcover dock (it installs the engine in its own "
            f"environment, never in QGIS's Python), or set {ENV_VAR} to an engine environment's python.")


def requirement_files() -> list[Path] | None:
    """requirements/engine.txt + the accelerated (an NVIDIA GPU answers nvidia-smi)
    or CPU builds, next to the plugin (zip install) or in the checkout; None when
    they cannot be found. The same choice as scripts/install.sh."""
    accel = "accel-gpu.txt" if _nvidia_gpu() else "accel-cpu.txt"
    files = [find_resource(f"requirements/{name}") for name in ("engine.txt", accel)]
    return None if None in files else files


def _nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi], capture_output=True).returncode == 0


ENGINE_MIN_PYTHON = (3, 11)  # numpy 2.4, scipy and onnxruntime of requirements/engine.txt need 3.11
MIN_PYTHON_TEXT = "%d.%d" % ENGINE_MIN_PYTHON
LAST_LINES = 12  # of a failed command's output, in the message


@dataclass(frozen=True)
class Interpreter:
    """The Python QGIS runs on, as the sys module describes it (values, so tests can
    describe a Windows or macOS QGIS on any machine)."""
    executable: str  # on Windows and macOS the QGIS binary itself, not a python
    base_prefix: str  # where that Python is installed (PYTHONHOME of QGIS's launcher)
    platform: str
    version: tuple[int, int]

    @classmethod
    def current(cls) -> "Interpreter":
        return cls(getattr(sys, "_base_executable", sys.executable), sys.base_prefix, sys.platform,
                   sys.version_info[:2])


def base_python_candidates(qgis: Interpreter) -> list[Path]:
    """Where the interpreter beside QGIS's Python is, most likely first. OSGeo4W and the
    Windows installers: PREFIX/apps/Python3XY/python.exe (the base prefix; QGIS runs as
    PREFIX/bin/qgis-bin.exe). QGIS.app: Contents/MacOS/bin/python3 (the base prefix;
    QGIS runs as Contents/MacOS/QGIS). Linux: /usr/bin/python3."""
    major, minor = qgis.version
    exe, prefix = Path(qgis.executable), Path(qgis.base_prefix)
    own = [exe] if exe.name.lower().startswith("python") else []  # never the QGIS binary
    if qgis.platform == "win32":
        return own + [prefix / "python.exe", exe.parent.parent / "apps" / f"Python{major}{minor}" / "python.exe"]
    names = [f"python{major}.{minor}", "python3"]
    return own + [folder / name for folder in (prefix / "bin", exe.parent / "bin") for name in names]


def base_python(qgis: Interpreter | None = None, exists=Path.is_file) -> str | None:
    """The python to create the engine's venv with: the one QGIS's Python was installed
    with (never QGIS's binary, and nothing is installed into it); None if not found."""
    return next((str(p) for p in base_python_candidates(qgis or Interpreter.current()) if exists(p)), None)


def find_uv(home: Path | None = None, which=shutil.which) -> str | None:
    """uv, when the user has it: on the PATH or where its installer puts it."""
    home = Path.home() if home is None else home
    candidates = [home / folder / "bin" / name for folder in (".local", ".cargo") for name in ("uv", "uv.exe")]
    return which("uv") or next((str(p) for p in candidates if p.is_file()), None)


def building_dir(venv: Path) -> Path:
    """Where the environment is built: renamed to `venv` only when whole, so a failed
    or cancelled creation never leaves a venv that check_engine would accept."""
    return venv.with_name(f".{venv.name}.building")


def create_env_commands(venv: Path, requirements: list[Path], python: str | None = None, uv: str | None = None,
                        platform: str = sys.platform) -> list[list[str]]:
    """The commands that create the engine environment at `venv`: with uv when given
    (with `python`, or a Python uv fetches when QGIS's is too old), else `python -m venv`
    and pip. pip prints one line per requirement (the progress); no progress bars."""
    reqs = [arg for req in requirements for arg in ("-r", str(req))]
    if uv:
        spec = python or MIN_PYTHON_TEXT
        # No --compile-bytecode: it cost 20-28 s here, compiling on first import only seconds.
        return [[uv, "venv", "--python", spec, str(venv)],
                [uv, "pip", "install", "--python", str(venv_python(venv, platform))] + reqs]
    pip = [str(venv_python(venv, platform)), "-m", "pip", "install", "--disable-pip-version-check",
           "--progress-bar", "off"]
    return [[python or "python3", "-m", "venv", str(venv)], pip + ["--upgrade", "pip"], pip + reqs]


@dataclass(frozen=True)
class EnvPlan:
    venv: Path  # where the finished environment goes
    commands: list[list[str]]  # they build it in building_dir(venv)
    requirements: list[Path]


def plan_env(venv: Path, requirements: list[Path], qgis: Interpreter | None = None,
             uv: str | None = None) -> EnvPlan:
    """uv when found (faster, and it fetches a suitable Python when QGIS's is older
    than the engine needs), else the Python beside QGIS's own."""
    qgis = qgis or Interpreter.current()
    uv = uv or find_uv()
    python = base_python(qgis)
    if uv and qgis.version < ENGINE_MIN_PYTHON:
        python = None
    return EnvPlan(venv, create_env_commands(building_dir(venv), requirements, python, uv, qgis.platform), requirements)


def requirement_names(requirements: list[Path]) -> list[str]:
    """The distributions the requirement files pin, normalised (PEP 503), in order."""
    names = []
    for path in requirements:
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.append(_normalise(re.split(r"[\[=<>!~; ]", line, maxsplit=1)[0]))
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class InstallProgress:
    """0-100 from the creation's output lines: the venv and pip's upgrade 5 each, the
    install 90, in which each requirement of the files counts once pip (or uv) reaches it."""

    def __init__(self, commands: list[list[str]], requirements: list[Path]) -> None:
        self.names = requirement_names(requirements)
        self.installs = ["-r" in c for c in commands]  # the command that installs the requirements
        weights = [90.0 if install else 5.0 for install in self.installs]
        self.shares = [100.0 * w / sum(weights) for w in weights]
        self.command = 0
        self.within = 0.0  # 0-1 of the current command
        self.seen: set[str] = set()
        self.stage = ""

    def percent(self) -> float:
        done = sum(self.shares[:self.command])
        return done + (self.shares[self.command] * self.within if self.command < len(self.shares) else 0.0)

    def next_command(self) -> float:
        self.command, self.within = self.command + 1, 0.0
        return self.percent()

    def update(self, line: str) -> float | None:
        """The new percentage when `line` moves it, else None."""
        before, text = self.within, line.strip()
        name = _requirement_in(text)
        installing = self.command < len(self.installs) and self.installs[self.command]
        if installing and name in self.names and name not in self.seen:
            self.seen.add(name)
            self.within = max(self.within, 0.8 * len(self.seen) / len(self.names))
            self.stage = f"Installing the engine's packages: {len(self.seen)} of {len(self.names)} ({name})"
        elif text.startswith(("Installing collected packages", "Prepared ")):
            self.within = max(self.within, 0.85)
            if installing:
                self.stage = "Installing the engine's packages: unpacking"
        elif text.startswith(("Successfully installed", "Installed ")):
            self.within = 1.0
        return self.percent() if self.within != before else None


def _requirement_in(text: str) -> str | None:
    """The distribution a pip line is about: "Collecting numpy==2.4.6 (from -r ...)",
    "Processing /wheels/numpy-2.4.6-cp311-....whl (from -r ...)"; uv's "Downloaded numpy"
    (its large downloads) and " + numpy==2.4.6" (once installed)."""
    match = (re.match(r"(?:Collecting|Requirement already satisfied:|Downloaded) ([A-Za-z0-9_.\-]+)", text)
             or re.match(r"Processing \S*?([A-Za-z0-9_.]+)-\d[^-/\\\s]*-\S*\.whl\b", text)
             or re.match(r"\+ ([A-Za-z0-9_.\-]+)==", text))
    return _normalise(match.group(1)) if match else None


def failure_message(command: list[str], returncode: int | None, last_lines: list[str]) -> str:
    """What the user reads when creating the environment failed: the command, its last
    lines, and what to do (returncode None: the command could not be started)."""
    program = Path(command[0]).name
    shown = " ".join(command[:4]) + (" ..." if len(command) > 4 else "")
    if returncode is None:
        return (f"Could not start `{shown}`: {last_lines[-1] if last_lines else 'not found'}. Install uv "
                f"(docs.astral.sh/uv) or Python {MIN_PYTHON_TEXT}+, then press 'Create environment' again; "
                "or choose an existing engine environment ('Browse to engine').")
    text = "\n".join(last_lines).lower()
    if "require a different python" in text or "requires-python" in text:
        todo = (f"QGIS's Python is older than the engine needs ({MIN_PYTHON_TEXT}): install "
                "uv (docs.astral.sh/uv), which fetches a suitable Python, then try again.")
    elif "ensurepip" in text or "no module named venv" in text:
        todo = ("This Python cannot create environments: install its venv module (Debian/Ubuntu: "
                "`sudo apt install python3-venv`) or install uv (docs.astral.sh/uv), then try again.")
    elif "no space left" in text:
        todo = "The disk is full: free about 2 GB, then try again."
    elif any(w in text for w in ("could not find a version", "no matching distribution", "failed to fetch",
                                 "connect", "name resolution", "timed out", "proxy", "ssl", "certificate")):
        todo = ("The packages could not be downloaded: check the internet connection (pip and uv do not use "
                "QGIS's proxy settings: set HTTPS_PROXY), then try again.")
    else:
        todo = "See the Landcover log panel for the whole output; or run `make install` in the plugin's source folder."
    tail = "\n".join(last_lines[-LAST_LINES:])
    return f"Creating the engine environment failed: `{shown}` ({program}) exited with {returncode}.\n{tail}\n{todo}"


# Run by the chosen python: the engine's code imports, and every distribution the
# requirement files pin is installed (argv: "name" or "cpu-name|gpu-name").
_CHECK_SCRIPT = """
import importlib.metadata as md, sys
if sys.version_info[:2] < tuple(map(int, sys.argv[1].split("."))):
    sys.exit("python " + sys.version.split()[0])
import landcover_plugin.engine.cli
def found(name):
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None
missing = [spec.split("|")[0] for spec in sys.argv[2:] if not any(found(n) for n in spec.split("|"))]
sys.exit("missing " + " ".join(missing)) if missing else print("landcover engine ok")
"""


def engine_requirement_specs() -> list[str] | None:
    """What an engine environment must have: engine.txt's distributions, and the CPU or
    the GPU build of each accelerated one ("tensorflow-cpu|tensorflow")."""
    files = [find_resource(f"requirements/{n}") for n in ("engine.txt", "accel-cpu.txt", "accel-gpu.txt")]
    if None in files:
        return None
    engine, cpu, gpu = (requirement_names([f]) for f in files)
    return engine + [f"{c}|{g}" for c, g in zip(cpu, gpu)]


def validate_engine_python(chosen: Path, root: Path | None = None, timeout_s: float = 120) -> tuple[Path, str | None]:
    """'Browse to engine': the chosen environment's python (a venv folder is accepted
    for its python) and None when it runs this engine; else the message saying why not."""
    from ..contract.runner import engine_env  # stdlib only, like this module

    python = venv_python(chosen) if chosen.is_dir() else chosen
    if not python.is_file() or not os.access(python, os.X_OK):
        return python, (f"{chosen} is not a Python interpreter. Choose the `python` file in an engine "
                        "environment's bin folder (Windows: `python.exe` in its Scripts folder), or its folder.")
    specs = engine_requirement_specs() or []
    try:
        done = subprocess.run([str(python), "-c", _CHECK_SCRIPT, MIN_PYTHON_TEXT, *specs], capture_output=True,
                              text=True, timeout=timeout_s, env=engine_env(root or package_root()))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return python, f"{python} could not be run ({exc}); choose another engine environment."
    if done.returncode == 0 and "landcover engine ok" in done.stdout:
        return python, None
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if last.startswith("python "):
        why = f"it is {last.capitalize()}; the engine needs Python {MIN_PYTHON_TEXT} or newer"
    elif last.startswith("missing "):
        why = f"the engine's packages are missing there: {', '.join(last.split()[1:])}"
    else:
        why = f"the engine's code does not run there: {last}"
    return python, (f"{python} is not an engine environment: {why}. Press 'Create environment' to make one, "
                    "or install requirements/engine.txt into that environment.")
