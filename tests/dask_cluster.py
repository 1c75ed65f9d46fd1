"""A real Dask cluster on 127.0.0.1 for tests and the bench: a scheduler and worker
processes started with the engine environment's `dask` command, as a user starts them.

    with dask_cluster(workers=2, tmp=tmp_path) as cluster:   # cluster.address: "tcp://127.0.0.1:PORT"
        ...                                                    # cluster.workers: their Popen, to kill one

Workers run without a nanny (one process each, so killing it loses the worker), one
thread each, and import this checkout's engine (PYTHONPATH).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).parent / "dask"  # the engine venv's


@dataclass
class Cluster:
    address: str
    workers: list[subprocess.Popen] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)  # the scheduler's and the workers'


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it (openssl): ca, cert, key."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key, key, csr, cert = (folder / n for n in ("ca.pem", "ca.key", "node.key", "node.csr", "node.pem"))
    run = lambda *args: subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
        "-subj", "/CN=landcover-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
        "-extfile", folder / "san.ext")
    return {"ca": ca, "cert": cert, "key": key}


def client_tls_env(certs: dict[str, Path]) -> dict[str, str]:
    """Dask's TLS configuration for a client, as environment variables."""
    return {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certs["ca"]),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(certs["cert"]),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(certs["key"])}


@contextmanager
def dask_cluster(workers: int, tmp: Path, certs: dict[str, Path] | None = None,
                 timeout: float = 60) -> Iterator[Cluster]:
    tmp.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "1"}
    tls = ["--tls-ca-file", str(certs["ca"]), "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])] \
        if certs else []
    info = tmp / "scheduler.json"
    info.unlink(missing_ok=True)
    log = open(tmp / "dask.log", "ab")
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--protocol", "tls" if certs else "tcp", "--scheduler-file", str(info), *tls],
                              env=env, stdout=log, stderr=log)]
    try:
        deadline = time.monotonic() + timeout
        while not info.exists() or not info.read_text().strip():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"the Dask scheduler did not start: {(tmp / 'dask.log').read_text()[-2000:]}")
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        cluster = Cluster(address, processes=procs)
        for n in range(workers):
            cluster.workers.append(subprocess.Popen(
                [str(DASK), "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 "--name", f"w{n}", "--host", "127.0.0.1", *tls], env=env, stdout=log, stderr=log))
        procs += cluster.workers
        wait_for_workers(info, workers, deadline, tmp / "dask.log", client_tls_env(certs) if certs else {})
        yield cluster
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def wait_for_workers(info: Path, n: int, deadline: float, log: Path, tls_env: dict[str, str]) -> None:
    """Until the scheduler lists `n` workers (read with Dask's client, the engine venv's)."""
    code = ("import sys; from distributed import Client; "
            f"c = Client(scheduler_file={str(info)!r}, timeout=30); c.wait_for_workers({n}, timeout=60); c.close()")
    env = os.environ | {"PYTHONPATH": str(ROOT)} | tls_env
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=max(1.0, deadline - time.monotonic()) + 60)
    if proc.returncode:
        raise RuntimeError(f"{n} Dask workers did not start: {proc.stderr[-1500:]} {log.read_text()[-1500:]}")
