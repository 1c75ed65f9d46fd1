"""Training on a remote host over ssh, against a real OpenSSH server on 127.0.0.1.

The host is this machine through sshd (tests/ssh_server.py): `landcover remote setup`
really installs the engine there (a virtual environment with the pinned requirements),
and the training there runs on the CPU.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from rasterio.windows import Window

from landcover_plugin.contract.protocol import parse_event
from landcover_plugin.engine.errors import EngineError
from landcover_plugin.engine.events import Reporter
from landcover_plugin.engine.learn.model_package import read_info
from landcover_plugin.engine.remote import ssh
from landcover_plugin.engine.remote.transfer import _member_path
from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ssh_server import SHARED_REMOTE_HOME, SshServer, start_ssh_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def landcover(*args: str, timeout: float = 600) -> tuple[int, list[dict]]:
    done = subprocess.run([sys.executable, "-m", "landcover_plugin.engine", "--json", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, [e for e in map(parse_event, done.stdout.splitlines()) if e]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "landcover_plugin.engine", "--json", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def wait_for_epoch(proc: subprocess.Popen) -> tuple[dict, list[dict]]:
    """Read events until the host's training reports its first epoch."""
    seen = []
    for line in proc.stdout:
        event = parse_event(line)
        if event:
            seen.append(event)
        if event and event["event"] == "progress" and event["stage"] == "train":
            return event, seen
    pytest.fail(f"no training progress before exit {proc.wait()}: {seen[-3:]}")


def error_of(events: list[dict]) -> dict:
    return next(e for e in events if e["event"] == "error")


def fingerprint(server: SshServer) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(server.folder / "host_key.pub")], capture_output=True, text=True)
    return out.stdout.split()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_ssh_server(tmp_path_factory.mktemp("gpu-host"), SHARED_REMOTE_HOME)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def host(server) -> list[str]:
    """The options naming the host, once its key is accepted and the engine set up."""
    opts = [server.alias, "--ssh-config", str(server.ssh_config)]
    code, events = landcover("remote", "setup", *opts, "--accept-host-key", fingerprint(server), timeout=1800)
    assert code == 0, events[-3:]
    return opts


@pytest.fixture(scope="module")
def dataset(osbs_tif, osbs_csv, tmp_path_factory, crop) -> Path:
    tmp = tmp_path_factory.mktemp("remote-ds")
    imagery = crop(osbs_tif, Window(0, 0, 192, 192), tmp / "crop.tif")
    build_dataset(DatasetParams(imagery=imagery, labels=osbs_csv, task="trees", out=tmp / "ds", chip_size=64),
                  Reporter(json_mode=True, out=io.StringIO()))
    return tmp / "ds"


def host_jobs(server: SshServer) -> list[str]:
    jobs = server.remote_home / "jobs"
    return sorted(p.name for p in jobs.iterdir()) if jobs.is_dir() else []


def running_job(server: SshServer) -> str:
    return next(j for j in host_jobs(server) if not (server.remote_home / "jobs" / j / "exit").exists())


def start_training(host: list[str], dataset: Path, out: Path, epochs: int) -> subprocess.Popen:
    return start("train", "--remote", *host, "--dataset", str(dataset), "--out", str(out),
                 "--epochs", str(epochs), "--batch-size", "4")


def close_the_laptop(proc: subprocess.Popen) -> None:
    """Once the host trains, kill the local command outright (no cleanup runs)."""
    wait_for_epoch(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- without a server -------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["-oProxyCommand=touch x", "gpu lab", "a;rm -rf ~", "$(id)", ""])
def test_a_destination_that_could_run_a_command_is_refused(host):
    with pytest.raises(EngineError) as err:
        ssh.SshTarget(host)
    assert err.value.code == "BAD_HOST"


def test_remote_arguments_stay_whole_and_host_keys_are_checked():
    argv = ssh.SshTarget("gpu-lab", identity=Path("/keys/my key")).argv("follow", "it's; $(x)", "3")
    assert argv[argv.index("StrictHostKeyChecking=yes") - 1] == "-o" and "BatchMode=yes" in argv
    assert argv[argv.index("-i") + 1] == "/keys/my key"
    remote = shlex.split(argv[-1])  # what the host's shell makes of the command
    assert remote[:2] == ["sh", "-c"] and remote[3:] == ["landcover-host", "follow", "it's; $(x)", "3"]
    assert argv[-3:-1] == ["--", "gpu-lab"]


def test_fingerprint_is_the_one_ssh_keygen_shows(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    shown = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True)
    assert ssh.key_fingerprint((tmp_path / "k.pub").read_text().split()[1]) == shown.stdout.split()[1]


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "model/../../x", ""])
def test_archive_paths_leaving_the_model_are_refused(name):
    with pytest.raises(EngineError) as err:
        _member_path(name)
    assert err.value.code == "REMOTE_BAD_MODEL"


# --- against the server -----------------------------------------------------------------------

def test_a_new_host_is_refused_with_its_fingerprint_until_the_user_accepts_it(server):
    opts = [server.alias, "--ssh-config", str(server.ssh_config)]
    code, events = landcover("remote", "jobs", *opts)
    assert code == 2 and error_of(events)["code"] == "HOST_KEY_UNKNOWN"
    assert fingerprint(server) in error_of(events)["message"]  # shown, for the user to check
    code, events = landcover("remote", "setup", *opts, "--accept-host-key", "SHA256:" + "A" * 43)
    assert code == 2 and error_of(events)["code"] == "HOST_KEY_MISMATCH"
    assert not server.known_hosts.exists() or not server.known_hosts.read_text().strip()


def test_setup_installs_the_engine_and_says_what_the_host_has(server, host):
    assert fingerprint(server) in subprocess.run(["ssh-keygen", "-lf", str(server.known_hosts)],
                                                 capture_output=True, text=True).stdout
    installed = server.remote_home / "engine" / "requirements.installed"
    stamp = installed.stat().st_mtime_ns
    code, events = landcover("remote", "setup", *host)  # again: nothing to install
    assert code == 0 and installed.stat().st_mtime_ns == stamp  # pip did not run again
    summary = events[-1]["summary"]
    assert summary["python"].startswith("3.") and summary["engine"]
    assert summary["found"] == "no GPU: training will use the CPU"
    assert any("already runs" in e["message"] for e in events if e["event"] == "log")
    assert (server.remote_home / "engine" / "bin" / "python").exists()


def test_train_remote_streams_progress_and_brings_back_a_checked_model(host, dataset, tmp_path):
    out = tmp_path / "model"
    code, events = landcover("train", "--remote", *host, "--dataset", str(dataset), "--out", str(out),
                             "--epochs", "2", "--batch-size", "4")
    assert code == 0, events[-3:]
    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "train"]
    assert progress and all("on gpu-test, CPU" in e["message"] for e in progress)
    summary = events[-1]["summary"]
    assert summary["host"] == "gpu-test" and summary["epochs"] == 2 and summary["upload_bytes"] > 0
    info = read_info(out)
    assert info.task == "trees"
    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert (out / "model.keras").is_file() and (out / "MODEL_CARD.md").is_file()

    # The same dataset again: the host has every chip, nothing is sent.
    code, events = landcover("train", "--remote", *host, "--dataset", str(dataset), "--out", str(tmp_path / "m2"),
                             "--epochs", "1", "--batch-size", "4")
    assert code == 0 and events[-1]["summary"]["upload_bytes"] == 0


def test_an_interrupted_upload_resumes_with_the_files_not_yet_stored(server, host, dataset):
    from landcover_plugin.engine.errors import Cancelled
    from landcover_plugin.engine.remote import transfer

    target = ssh.SshTarget(server.alias, server.ssh_config)
    files = transfer.folder_files(dataset, "again")  # a copy under another name: the same contents
    shutil.rmtree(server.remote_home / "store")
    calls = []

    def cancel_after_three(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise Cancelled("SIGTERM")

    with pytest.raises(Cancelled):
        transfer.upload(target, files, cancel_after_three)
    stored = [p for p in (server.remote_home / "store").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert 2 <= len(stored) < len(files)
    hashes, sent = transfer.upload(target, files, lambda done, total: None)
    assert 0 < sent < sum(p.stat().st_size for p in files.values())
    assert all((server.remote_home / "store" / h[:2] / h).is_file() for h in hashes.values())


def test_a_dropped_connection_is_retried_and_a_closed_laptop_attaches_later(server, host, dataset, tmp_path):
    # The ssh transport killed mid-training: the run reconnects and finishes.
    out = tmp_path / "model"
    proc = start_training(host, dataset, out, 4)
    try:
        wait_for_epoch(proc)
        ssh_children = subprocess.run(["pgrep", "-P", str(proc.pid), "ssh"], capture_output=True, text=True)
        assert ssh_children.stdout.split()
        for pid in ssh_children.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        rest, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [e for e in map(parse_event, rest.splitlines()) if e]
    assert proc.returncode == 0, events[-3:]
    assert any("reconnecting" in e["message"] for e in events if e["event"] == "log")
    assert events[-1]["summary"]["epochs"] == 4 and read_info(out).task == "trees"

    # The laptop closed (the local command killed outright): the job goes on; attach fetches it.
    out = tmp_path / "model-attach"
    close_the_laptop(start_training(host, dataset, out, 3))
    assert not out.exists()
    code, events = landcover("remote", "jobs", *host)
    running = [job for job, state in events[-1]["summary"].items() if state.startswith("running")]
    assert len(running) == 1
    code, events = landcover("remote", "attach", *host, running[0])
    assert code == 0, events[-3:]
    assert events[-1]["outputs"]["model"] == str(out.resolve())  # where the training was started for
    epochs = [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("epoch ")]
    assert [m.split(":")[0] for m in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]  # replayed from the start
    assert read_info(out).task == "trees"
    assert running[0] not in host_jobs(server)  # fetched: the host's copy is gone


def test_cancel_stops_the_host_training_within_seconds_and_leaves_no_model(server, host, dataset, tmp_path):
    out = tmp_path / "model"
    proc = start_training(host, dataset, out, 50)
    try:
        wait_for_epoch(proc)
        job = running_job(server)
        train_pid = int((server.remote_home / "jobs" / job / "pid").read_text())
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [e for e in map(parse_event, rest.splitlines()) if e]
    assert proc.returncode == 130 and error_of(events)["code"] == "CANCELLED"
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert job not in host_jobs(server)
    with pytest.raises(ProcessLookupError):  # the host's training process is gone
        os.kill(train_pid, 0)

    # `remote cancel` of a detached job: the same, from another command.
    close_the_laptop(start_training(host, dataset, out, 50))
    job = running_job(server)
    code, events = landcover("remote", "cancel", *host, job)
    assert code == 0 and events[-1]["summary"]["state"] == "cancelled"
    code, events = landcover("remote", "attach", *host, job)
    assert code == 2 and error_of(events)["code"] == "REMOTE_JOB_CANCELLED"
    assert not out.exists()


def test_a_model_with_a_link_out_of_its_folder_is_refused(server, host, tmp_path):
    """A host that sends a symlink (to the user's files) in the model: nothing is written."""
    job = "20260101-000000-abcdef"
    folder = server.remote_home / "jobs" / job
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.onnx").symlink_to("/etc/passwd")
    (folder / "job.json").write_text(json.dumps({"job": job, "local_out": None}))
    (folder / "exit").write_text("0")
    (folder / "events.jsonl").write_text("")
    out = tmp_path / "model"
    code, events = landcover("remote", "attach", *host, job, "--out", str(out))
    assert code == 2 and error_of(events)["code"] == "REMOTE_BAD_MODEL"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_pipeline_trains_on_the_host(host, osbs_tif, osbs_csv, tmp_path, crop):
    imagery = crop(osbs_tif, Window(0, 0, 192, 192), tmp_path / "crop.tif")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({"task": "trees", "imagery": str(imagery), "labels": str(osbs_csv),
                                    "train": {"epochs": 1, "batch_size": 4, "chip_size": 64, "remote": host[0],
                                              "ssh_config": host[2]},
                                    "out": str(tmp_path / "trees.gpkg")}))
    code, events = landcover("run", str(pipeline))
    assert code == 0, events[-3:]
    assert events[-1]["summary"]["train"]["host"] == "gpu-test"
    assert (tmp_path / "trees.gpkg").is_file()


def test_a_host_without_the_engine_says_to_set_it_up(dataset, tmp_path):
    bare = start_ssh_server(tmp_path / "bare")
    try:
        opts = [bare.alias, "--ssh-config", str(bare.ssh_config)]
        ssh.accept_host_key(ssh.SshTarget(bare.alias, bare.ssh_config), fingerprint(bare))
        code, events = landcover("train", "--remote", *opts, "--dataset", str(dataset), "--out",
                                 str(tmp_path / "m"))
        assert code == 2 and error_of(events)["code"] == "REMOTE_NO_ENGINE"
        assert f"landcover remote setup {bare.alias}" in error_of(events)["hint"]
    finally:
        bare.stop()


def test_a_changed_host_key_is_refused(server, host):
    """Last: it replaces the server's key."""
    server.new_host_key()
    code, events = landcover("remote", "jobs", *host)
    assert code == 2 and error_of(events)["code"] == "HOST_KEY_CHANGED"
    code, events = landcover("remote", "setup", *host)
    assert code == 2 and error_of(events)["code"] == "HOST_KEY_CHANGED"
