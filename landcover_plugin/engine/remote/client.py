"""This machine's side of remote training: `train --remote HOST` and `remote jobs|attach|cancel`.

A training goes: check the host runs this engine -> send the dataset chips it lacks ->
start a detached job -> relay its events -> bring the model back, checked, and write the
local model folder whole. The job outlives this process: a dropped connection is retried,
and `attach` picks any job up again from its first event.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ...contract.protocol import parse_event
from ..atomic import atomic_output, check_out_path
from ..errors import Cancelled, EngineError
from ..events import Reporter, StageResult
from ..learn.dataset_folder import Manifest
from ..stages.train import TrainParams
from . import ssh, transfer
from .setup import HostInfo, require_engine

RECONNECT_DELAYS_S = (2, 5, 10, 20)  # then give up, naming the job to attach to


@dataclass(frozen=True)
class RemoteTrainParams:
    target: ssh.SshTarget
    train: TrainParams


def job_request(tp: TrainParams) -> tuple[dict[str, Path], dict]:
    """The files a job needs (name -> local file) and its train options, the uploaded
    paths relative to the job's files and named in "relative"."""
    files = transfer.folder_files(tp.dataset, "dataset")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(tp).items()}
    config.update(dataset="dataset", resume=False, out=None)
    relative = ["dataset"]
    if tp.base is not None and Path(tp.base).exists():  # else a shipped model's name: the host has it too
        base = Path(tp.base)
        folder = base if base.is_dir() else base.parent
        files |= transfer.folder_files(folder, "base")
        config["base"] = "base" if base.is_dir() else f"base/{base.name}"
        relative.append("base")
    if tp.encoder_weights is not None:
        files[f"weights/{tp.encoder_weights.name}"] = tp.encoder_weights
        config["encoder_weights"] = f"weights/{tp.encoder_weights.name}"
        relative.append("encoder_weights")
    return files, {"config": config, "relative": relative}


def train_remote(params: RemoteTrainParams, reporter: Reporter) -> StageResult:
    tp, target = params.train, params.target
    check_out_path(tp.out, directory=True, inputs=[tp.dataset, tp.base, tp.encoder_weights])
    Manifest.read(tp.dataset)  # a dataset folder: checked here, before anything is sent
    started = time.monotonic()
    info = require_engine(target)
    reporter.log(f"training on {target.host}: {info.device}")
    files, request = job_request(tp)
    hashes, sent = transfer.upload(target, files, lambda done, total: reporter.progress(
        "upload", done, total, f"dataset to {target.host}"))
    request |= {"files": hashes, "local_out": str(Path(tp.out).resolve())}
    job = json.loads(ssh.run(target, "start", stdin=json.dumps(request).encode()))["job"]
    reporter.log(f"job {job} started on {target.host}; it goes on if this connection drops "
                 f"(`landcover remote attach {target.host} {job}`)")
    setup_s = time.monotonic() - started
    result = follow_job(target, job, Path(tp.out), reporter, info)
    result.summary.update(upload_bytes=sent, upload_s=round(setup_s, 2))
    return result


def follow_job(target: ssh.SshTarget, job: str, out: Path, reporter: Reporter, info: HostInfo) -> StageResult:
    """Relay the job's events until it ends, reconnecting when the link drops; then fetch
    its model into `out`. SIGTERM here cancels the job on the host."""
    check_out_path(out, directory=True)
    state = _State()
    try:
        end = _relay_until_end(target, job, reporter, info, state)
    except Cancelled:
        _cancel_quietly(target, job)
        raise
    if end != "done":
        raise _job_error(target, job, end, state.error)
    followed_s = time.monotonic() - state.started
    fetched = time.monotonic()
    with atomic_output(out, directory=True) as tmp:
        size = transfer.download_model(target, job, tmp)
        _check_model(tmp)
    download_s = time.monotonic() - fetched
    ssh.run(target, "remove", job)  # the model is here, whole: the host's copy can go
    summary = dict(state.result.get("summary", {}))
    summary.update(host=target.host, device=info.device, job=job, train_s=round(followed_s, 2),
                   download_s=round(download_s, 2), download_bytes=size)
    return StageResult({"model": str(out)}, summary)


@dataclass
class _State:
    seen: int = 0  # lines of the job's event file relayed so far
    error: dict | None = None
    result: dict = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.monotonic)


def _relay_until_end(target: ssh.SshTarget, job: str, reporter: Reporter, info: HostInfo, state: _State) -> str:
    where = f"on {target.host}, {info.device}"
    for attempt in range(len(RECONNECT_DELAYS_S) + 1):
        proc = subprocess.Popen(target.argv("follow", job, str(state.seen)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            for raw in proc.stdout:
                if not raw.endswith(b"\n"):
                    break  # cut mid-line: that line comes again on reconnecting
                event = parse_event(raw.decode(errors="replace"))
                if event and event["event"] == "job_end":
                    return event.get("state", "unknown")
                state.seen += 1
                if event is None:
                    continue
                if event["event"] == "progress":
                    reporter.progress(event["stage"], event["done"], event["total"],
                                      f"{event.get('message', '')} {where}".strip())
                elif event["event"] == "log":
                    reporter.log(event["message"], event.get("level", "info"))
                elif event["event"] == "error":
                    state.error = event
                elif event["event"] == "result":
                    state.result = event
        finally:
            proc.kill()
            stderr = proc.communicate()[1].decode(errors="replace")
        code = proc.returncode
        if code not in (0, -9, ssh.SSH_FAILED):
            ssh.check(target, code, stderr)  # not a dropped link (no engine, a crash): say what it is
        error = ssh.connection_error(target, ssh.SSH_FAILED, stderr) if code == ssh.SSH_FAILED else None
        if error and error.code in ("HOST_KEY_CHANGED", "HOST_KEY_UNKNOWN", "SSH_AUTH_FAILED"):
            raise error
        reason = error.message if error else "the event stream was cut"
        if attempt == len(RECONNECT_DELAYS_S):
            raise EngineError("REMOTE_DISCONNECTED", f"Lost the connection to {target.host} ({reason}). "
                              f"The training goes on there as job {job}.",
                              f"When the host is reachable: `landcover remote attach {target.host} {job}`.")
        delay = RECONNECT_DELAYS_S[attempt]
        reporter.log(f"connection to {target.host} lost; reconnecting in {delay} s (the job goes on)", "warning")
        time.sleep(delay)
    raise AssertionError("unreachable")


def _job_error(target: ssh.SshTarget, job: str, end: str, error: dict | None) -> EngineError:
    if end == "failed" and error:  # the training's own error (bad dataset, out of memory...)
        return EngineError(error.get("code", "REMOTE_FAILED"), f"On {target.host}: {error.get('message', '')}",
                           error.get("hint", ""))
    messages = {"failed": f"The training on {target.host} stopped with an error (job {job}).",
                "cancelled": f"Job {job} was cancelled on {target.host}.",
                "lost": f"Job {job} on {target.host} stopped without finishing (was the host restarted?).",
                "unknown": f"{target.host} has no job {job}."}
    return EngineError("REMOTE_JOB_" + end.upper(), messages.get(end, f"Job {job} ended as {end}."),
                       f"See `landcover remote jobs {target.host}`; train again to redo it.")


def _check_model(folder: Path) -> None:
    """The model that came back loads: a valid ONNX graph that onnxruntime runs, with our metadata."""
    import onnx
    import onnxruntime

    from ..learn.model_package import ONNX_NAME, read_info

    path = folder / ONNX_NAME
    try:
        onnx.checker.check_model(str(path))
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError("REMOTE_BAD_MODEL", f"The model from the host does not load: {exc}",
                          "Train again; if it repeats, run `landcover remote setup HOST`.") from None
    read_info(folder)


def _cancel_quietly(target: ssh.SshTarget, job: str) -> None:
    """Cancel the host's job on our way out; a host we cannot reach keeps it (listed in `jobs`)."""
    try:
        ssh.run(target, "cancel", job, timeout=20)
        ssh.run(target, "remove", job, timeout=20)
    except EngineError:
        pass


def list_jobs(target: ssh.SshTarget) -> list[dict]:
    return json.loads(ssh.run(target, "jobs"))


def attach(target: ssh.SshTarget, job: str, out: Path | None, reporter: Reporter) -> StageResult:
    """Follow a job again from its first event, and fetch its model (to `out`, or where
    the training was started for)."""
    info = require_engine(target)
    known = {j["job"]: j for j in list_jobs(target)}
    if job not in known:
        raise EngineError("REMOTE_NO_JOB", f"{target.host} has no job {job}.",
                          f"List the jobs there: `landcover remote jobs {target.host}`.")
    out = out or (Path(known[job]["local_out"]) if known[job].get("local_out") else None)
    if out is None:
        raise EngineError("BAD_PARAMS", "Where should the model go?", "Give --out MODEL_DIR.")
    return follow_job(target, job, out, reporter, info)


def cancel(target: ssh.SshTarget, job: str) -> StageResult:
    state = json.loads(ssh.run(target, "cancel", job, timeout=30))["state"]
    if state == "unknown":
        raise EngineError("REMOTE_NO_JOB", f"{target.host} has no job {job}.",
                          f"List the jobs there: `landcover remote jobs {target.host}`.")
    return StageResult({}, {"job": job, "state": state})
