"""The host's side of remote training: `python -m landcover_plugin.engine.remote.host OP ...`.

Run over ssh by client.py (the only commands a remote host runs for us), in the engine
that `landcover remote setup` installed under $LANDCOVER_REMOTE_HOME (~/.landcover):

    engine/        the virtual environment      src/   this engine's code
    store/XX/HASH  files by content (sha256): dataset chips are sent once
    jobs/JOB/      job.json, files/ (links into the store), train.json,
                   events.jsonl (the training's JSON lines), runner.pid, pid (the
                   training's), exit, model/

A job runs detached (its own session), so it outlives the ssh connection that started
it; `follow` replays its events from any line, which is how a client re-attaches.
The standard library and engine/atomic.py only: no TensorFlow in the processes that manage jobs.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

from ..atomic import pid_alive, write_text_atomic

JOB_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
HASH = re.compile(r"^[0-9a-f]{64}$")
MAX_FILES = 200_000


def root() -> Path:
    return Path(os.environ.get("LANDCOVER_REMOTE_HOME") or Path.home() / ".landcover")


def store_path(digest: str) -> Path:
    return root() / "store" / digest[:2] / digest


def job_dir(job: str) -> Path:
    if not JOB_ID.match(job):
        raise SystemExit(f"bad job id {job!r}")
    return root() / "jobs" / job


def _print_json(value) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def gpus() -> list[dict]:
    """Each NVIDIA GPU with its free memory (nvidia-smi); none when it does not answer."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.free,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            found.append({"name": parts[0], "memory_free_mb": int(parts[1]), "memory_total_mb": int(parts[2])})
    return found


def op_info() -> None:
    installed = root() / "engine.json"
    engine = json.loads(installed.read_text()) if installed.is_file() else {}
    _print_json({"python": platform.python_version(), "engine": engine, "gpus": gpus(),
                 "cpus": os.cpu_count(), "root": str(root())})


def op_missing() -> None:
    """stdin: a JSON list of sha256; stdout: those the store lacks."""
    wanted = json.load(sys.stdin)
    _print_json([d for d in wanted if isinstance(d, str) and HASH.match(d) and not store_path(d).is_file()])


def op_receive() -> None:
    """stdin: a tar stream of files named by their sha256. Each is checked against its
    name and stored whole (written aside, then renamed): an interrupted upload keeps the
    files already stored, and the next one sends only the rest."""
    count = 0
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as archive:
        for member in archive:
            count += 1
            if count > MAX_FILES or not member.isfile() or not HASH.match(member.name):
                raise SystemExit(f"unexpected archive member {member.name!r}")
            target = store_path(member.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{member.name}.{os.getpid()}.part")
            digest = hashlib.sha256()
            with archive.extractfile(member) as src, tmp.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != member.name:
                tmp.unlink()
                raise SystemExit(f"file {member.name} arrived damaged")
            tmp.chmod(0o444)  # jobs see store files through hard links: never written in place
            tmp.replace(target)
    _print_json({"stored": count})


def _safe_relative(name: str) -> Path:
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise SystemExit(f"unsafe path {name!r}")
    return path


def op_start() -> None:
    """stdin: {"files": {relpath: sha256}, "config": train options with paths relative
    to the job's files/, "local_out": where the client writes the model}. Starts the job
    detached and prints its id."""
    request = json.load(sys.stdin)
    job = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    folder = job_dir(job)
    files = folder / "files"
    for rel, digest in request["files"].items():
        if not HASH.match(digest) or not store_path(digest).is_file():
            raise SystemExit(f"file {rel} was not uploaded")
        dest = files / _safe_relative(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(store_path(digest), dest)  # the store is read-only to jobs: training never writes inputs
    config = dict(request["config"])
    for key in ("dataset", "base", "encoder_weights"):
        if config.get(key):
            config[key] = str(files / _safe_relative(config[key]))
    config["out"] = str(folder / "model")
    (folder / "train.json").write_text(json.dumps(config))
    (folder / "job.json").write_text(json.dumps({"job": job, "started": time.time(),
                                                 "local_out": request.get("local_out"),
                                                 "epochs": config.get("epochs")}))
    subprocess.Popen([sys.executable, "-m", "landcover_plugin.engine.remote.host", "run-job", job],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True)
    _print_json({"job": job})


def op_run_job(job: str) -> None:
    """The detached runner: `landcover train --json --config train.json`, events to a file."""
    folder = job_dir(job)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    write_text_atomic(folder / "runner.pid", str(os.getpid()))  # alive until `exit` is written
    with (folder / "events.jsonl").open("ab") as events, (folder / "stderr.log").open("ab") as err:
        child = subprocess.Popen([sys.executable, "-m", "landcover_plugin.engine.cli", "--json", "train",
                                  "--config", str(folder / "train.json")],
                                 stdin=subprocess.DEVNULL, stdout=events, stderr=err, env=env, cwd=folder)
        write_text_atomic(folder / "pid", str(child.pid))
        code = child.wait()
    write_text_atomic(folder / "exit", str(code))


def job_state(folder: Path) -> str:
    """running, done, failed, cancelled, or lost (the runner died: the host restarted)."""
    exit_file, cancelled = folder / "exit", (folder / "cancelled").exists()
    if exit_file.is_file():
        return "cancelled" if cancelled else "done" if exit_file.read_text().strip() == "0" else "failed"
    pid_file = folder / "runner.pid"
    if pid_file.is_file() and not pid_alive(int(pid_file.read_text())):
        return "cancelled" if cancelled else "lost"
    return "running"


def op_follow(job: str, start: str) -> None:
    """Print the job's events from line `start` on, as they come, then a job_end event."""
    folder, skip = job_dir(job), int(start)
    if not folder.is_dir():
        _print_json({"event": "job_end", "state": "unknown"})
        return
    events = folder / "events.jsonl"
    while not events.exists() and job_state(folder) == "running":
        time.sleep(0.2)
    with events.open("rb") as f:
        seen = 0

        def emit(line: bytes) -> None:
            nonlocal seen
            if seen >= skip:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            seen += 1

        while True:
            finished = job_state(folder) != "running"  # before reading: no line written after is missed
            while (line := f.readline()).endswith(b"\n"):
                emit(line)
            if finished:
                if line:
                    emit(line + b"\n")
                _print_json({"event": "job_end", "state": job_state(folder)})
                return
            f.seek(-len(line), os.SEEK_CUR)  # a line still being written: read it whole later
            time.sleep(0.2)


def op_jobs() -> None:
    jobs = []
    for folder in sorted((root() / "jobs").glob("*")) if (root() / "jobs").is_dir() else []:
        try:
            meta = json.loads((folder / "job.json").read_text())
        except (OSError, ValueError):
            continue
        progress = ""
        events = folder / "events.jsonl"
        if events.is_file():
            for line in events.read_text(errors="replace").splitlines()[-50:]:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == "progress":
                    progress = event.get("message", "")
        jobs.append({"job": folder.name, "state": job_state(folder), "started": meta.get("started"),
                     "progress": progress, "local_out": meta.get("local_out")})
    _print_json(jobs)


def op_cancel(job: str) -> None:
    """Stop the training (SIGTERM: it leaves no model), wait for it, mark the job cancelled."""
    folder = job_dir(job)
    state = job_state(folder) if folder.is_dir() else "unknown"
    if state == "running":
        (folder / "cancelled").touch()
        deadline = time.monotonic() + 15
        while not (folder / "pid").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.kill(int((folder / "pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        while not (folder / "exit").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        state = "cancelled"
    _print_json({"job": job, "state": state})


def op_send_model(job: str) -> None:
    """stdout: a tar stream of the job's model folder, its manifest (sha256 per file) first."""
    model = job_dir(job) / "model"
    files = sorted(p for p in model.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(model)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    manifest_path = job_dir(job) / "model-manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as archive:
        archive.add(manifest_path, arcname="manifest.json")
        for path in files:
            archive.add(path, arcname=f"model/{path.relative_to(model)}")
    sys.stdout.flush()


def op_remove(job: str) -> None:
    shutil.rmtree(job_dir(job), ignore_errors=True)
    _print_json({"job": job, "state": "removed"})


OPS = {"info": op_info, "missing": op_missing, "receive": op_receive, "start": op_start, "run-job": op_run_job,
       "follow": op_follow, "jobs": op_jobs, "cancel": op_cancel, "send-model": op_send_model,
       "remove": op_remove}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in OPS:
        raise SystemExit(f"usage: host.py {{{'|'.join(OPS)}}} ARGS")
    OPS[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
