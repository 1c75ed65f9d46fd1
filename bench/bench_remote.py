"""Remote training over ssh (loopback): what a 30-epoch training of the demo's kind costs
on top of the training itself -- `remote setup` (the host already set up, as before any
training but the first), the upload of the chips, the download of the model -- as a
share of the whole (goal under 10 %); and the whole remote run against the same
training run locally (same CPU here: the ratio is the remote path's overhead).

The host is this machine through a real sshd (tests/ssh_server.py). Early stopping is
off (patience 100) so both runs train exactly 30 epochs.
"""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

from common import PYTHON, ROOT, last_json, run_child

SECTION = "remote"
EPOCHS = 30


def _dataset(workdir: Path) -> Path:
    from landcover_plugin.engine.events import Reporter
    from landcover_plugin.engine.stages.dataset import DatasetParams, build_dataset

    data = next((ROOT / "data").rglob("OSBS_029.tif"))
    out = workdir / "ds"
    build_dataset(DatasetParams(imagery=data, labels=data.with_suffix(".csv"), task="trees", out=out, chip_size=128),
                  Reporter(json_mode=True, out=io.StringIO()))
    return out


def _config(workdir: Path, dataset: Path, name: str) -> Path:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps({"dataset": str(dataset), "out": str(workdir / name), "epochs": EPOCHS,
                                "batch_size": 4, "patience": 100}))
    return path


def run(workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from ssh_server import SHARED_REMOTE_HOME, start_ssh_server

    from landcover_plugin.engine.remote.ssh import SshTarget, accept_host_key, key_fingerprint

    server = start_ssh_server(workdir / "sshd", SHARED_REMOTE_HOME)
    try:
        host = [server.alias, "--ssh-config", str(server.ssh_config)]
        accept_host_key(SshTarget(server.alias, server.ssh_config),
                        key_fingerprint((server.folder / "host_key.pub").read_text().split()[1]))
        first_install = not (SHARED_REMOTE_HOME / "engine" / "bin" / "python").exists()
        dataset = _dataset(workdir)
        engine = [PYTHON, "-m", "landcover_plugin.engine", "--json"]

        started = time.monotonic()
        run_child(engine + ["remote", "setup", *host], timeout=3600)
        setup_s = time.monotonic() - started

        started = time.monotonic()
        remote = last_json(run_child(engine + ["train", "--remote", *host, "--config",
                                               str(_config(workdir, dataset, "remote"))]))["summary"]
        remote_s = time.monotonic() - started

        started = time.monotonic()
        run_child(engine + ["train", "--config", str(_config(workdir, dataset, "local"))])
        local_s = time.monotonic() - started
    finally:
        server.stop()
    overhead = setup_s + remote["upload_s"] + remote["download_s"]
    return {"epochs": remote["epochs"], "setup_s": round(setup_s, 2), "first_install": int(first_install),
            "upload_s": remote["upload_s"], "upload_mb": round(remote["upload_bytes"] / 1e6, 2),
            "train_s": remote["train_s"], "download_s": remote["download_s"],
            "download_mb": round(remote["download_bytes"] / 1e6, 2),
            "transfer_share": round(overhead / (setup_s + remote_s), 4),
            "local_train_s": round(local_s, 2), "remote_vs_local": round((setup_s + remote_s) / local_s, 3)}
