"""`landcover remote setup HOST`: this engine's own code, installed on the host.

The host gets a virtual environment (~/.landcover/engine) with the pinned requirements
(the GPU builds when nvidia-smi answers there) and this engine's source (~/.landcover/src),
so that it runs exactly the code this machine runs. A second setup with nothing changed
sends nothing and installs nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ...contract.runner import PACKAGE_ROOT
from ..errors import EngineError
from . import ssh

PACKAGE = PACKAGE_ROOT / "landcover_plugin"
EXIT_NO_PYTHON = 96

# Runs with the source archive on stdin; pip's output goes to stderr, for the log.
SETUP_SCRIPT = r"""set -e
R="${LANDCOVER_REMOTE_HOME:-$HOME/.landcover}"
if ! python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "landcover-setup: no python3 3.10 or newer with venv on this host" >&2; exit 96
fi
mkdir -p "$R"
rm -rf "$R/src.new" && mkdir -p "$R/src.new"
tar -xz -C "$R/src.new" -f -
if nvidia-smi >/dev/null 2>&1; then ACCEL=accel-gpu.txt; else ACCEL=accel-cpu.txt; fi
[ -x "$R/engine/bin/python" ] || python3 -m venv "$R/engine"
REQ="$(cat "$R/src.new/requirements/engine.txt" "$R/src.new/requirements/$ACCEL")"
if [ "$(cat "$R/engine/requirements.installed" 2>/dev/null)" != "$REQ" ]; then
  echo "installing the engine's requirements ($ACCEL) in $R/engine" >&2
  "$R/engine/bin/python" -m pip install -q -r "$R/src.new/requirements/engine.txt" \
      -r "$R/src.new/requirements/$ACCEL" >&2
  printf '%s' "$REQ" > "$R/engine/requirements.installed"
fi
rm -rf "$R/src.old"; if [ -d "$R/src" ]; then mv "$R/src" "$R/src.old"; fi
mv "$R/src.new" "$R/src"; rm -rf "$R/src.old"
printf '{"version": "%s", "accel": "%s"}\n' "$1" "$ACCEL" > "$R/engine.json"
"""


def _source_files() -> dict[str, Path]:
    """Archive name -> file: what the engine runs (engine/, contract/, resources/; not the
    QGIS shell, so a plugin-only change needs no update there) and its requirement files."""
    paths = [PACKAGE / "__init__.py"] + [p for part in ("engine", "contract", "resources")
                                         for p in sorted((PACKAGE / part).rglob("*"))]
    files = {f"landcover_plugin/{p.relative_to(PACKAGE)}": p for p in paths
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    requirements = next(d for d in (PACKAGE_ROOT / "requirements", PACKAGE / "requirements") if d.is_dir())
    files |= {f"requirements/{p.name}": p for p in sorted(requirements.glob("*.txt"))}
    return files


def engine_version() -> str:
    """The hash of this engine's code and requirements: the host must run the same."""
    digest = hashlib.sha256()
    for name, path in _source_files().items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def source_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, path in _source_files().items():
            archive.add(path, arcname=name)
    return buffer.getvalue()


@dataclass(frozen=True)
class HostInfo:
    python: str
    engine_version: str | None  # None: no engine installed
    gpus: list[dict]
    cpus: int

    @property
    def device(self) -> str:
        """What training uses there, in words: "NVIDIA A100" or "CPU (16 cores)"."""
        return self.gpus[0]["name"] if self.gpus else f"CPU ({self.cpus} cores)"

    def describe(self) -> list[str]:
        lines = [f"Python {self.python}", f"engine {self.engine_version or 'not installed'}"]
        lines += [f"GPU {g['name']}: {g['memory_free_mb']} MB free of {g['memory_total_mb']} MB" for g in self.gpus]
        return lines + ([] if self.gpus else ["no GPU: training will use the CPU"])


def host_info(target: ssh.SshTarget) -> HostInfo:
    """What the host has; REMOTE_NO_ENGINE when setup never ran there."""
    data = json.loads(ssh.run(target, "info"))
    return HostInfo(python=data["python"], engine_version=data["engine"].get("version"), gpus=data["gpus"],
                    cpus=data.get("cpus") or 1)


def require_engine(target: ssh.SshTarget) -> HostInfo:
    """The host's info, when it runs this very engine; else a clear error."""
    info = host_info(target)
    if info.engine_version != engine_version():
        raise EngineError("REMOTE_ENGINE_OUTDATED",
                          f"{target.host} runs engine {info.engine_version}, this machine {engine_version()}.",
                          f"Update it: `landcover remote setup {target.host}` (seconds when only the code changed).")
    return info


def setup(target: ssh.SshTarget, log=lambda message: None) -> HostInfo:
    """Install or update the engine on the host; return what the host has."""
    version = engine_version()
    try:
        info = host_info(target)
        if info.engine_version == version:
            log(f"{target.host} already runs engine {version}")
            return info
    except EngineError as exc:
        if exc.code != "REMOTE_NO_ENGINE" and exc.code != "REMOTE_FAILED":
            raise
    log(f"installing engine {version} on {target.host} (the first time takes minutes: TensorFlow)")
    try:
        done = subprocess.run(target.shell_argv(SETUP_SCRIPT, version), input=source_archive(),
                              capture_output=True, timeout=3600)
    except subprocess.TimeoutExpired:
        raise EngineError("REMOTE_SETUP_FAILED", f"Installing on {target.host} took over an hour.",
                          "Check the host's network and disk, then run setup again.") from None
    stderr = done.stderr.decode(errors="replace")
    if done.returncode == EXIT_NO_PYTHON:
        raise EngineError("REMOTE_NO_PYTHON", f"{target.host} has no Python 3.10 or newer with venv.",
                          "Install python3 and python3-venv there (e.g. apt install python3-venv), "
                          "or load a Python module in the shell profile, then run setup again.")
    error = ssh.connection_error(target, done.returncode, stderr)
    if error:
        raise error
    if done.returncode != 0:
        tail = " / ".join(line for line in stderr.strip().splitlines()[-3:])
        raise EngineError("REMOTE_SETUP_FAILED", f"Installing on {target.host} failed: {tail}",
                          "Check the host's disk space and its access to the Python package index.")
    return host_info(target)
