"""A Dask cluster for the engine: connecting to its scheduler (tcp://, or tls:// with
the certificates of Dask's own security configuration), checking that the workers
can run the engine on the inputs, and one warm onnxruntime session per worker process.

Dask redoes the tasks of a worker lost mid-run (its results are recomputed from
their inputs); closing the client forgets every task not yet run (cancel).
"""
from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from distributed import Client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from .errors import EngineError
from .events import Reporter

CONNECT_TIMEOUT_S = 20.0  # scheduler handshake, and the wait for a first worker
SCHEMES = ("tcp://", "tls://")
START_HINT = ("Start a scheduler (`dask scheduler`) and workers from the engine's environment "
              "(`.venv/bin/dask worker ADDRESS --nthreads 1 --nworkers N`), or check the address.")


def check_address(address: str) -> None:
    if not address.startswith(SCHEMES) or ":" not in address.split("://", 1)[1]:
        raise EngineError("BAD_SCHEDULER", f"{address!r} is not a Dask scheduler address.",
                          "Give tcp://HOST:PORT, or tls://HOST:PORT with TLS certificates in Dask's configuration.")


def client_security(address: str):
    """Dask's Security from its configuration (distributed.comm.tls.*: files, or the
    DASK_DISTRIBUTED__COMM__TLS__* variables); a tls:// address without it is refused here."""
    from distributed.security import Security

    security = Security()
    if address.startswith("tls://") and not (security.tls_ca_file and security.tls_client_cert):
        raise EngineError("TLS_NOT_CONFIGURED", f"{address} needs TLS certificates, and Dask's configuration "
                          "names none.",
                          "Set distributed.comm.tls.ca-file, .client.cert and .client.key in ~/.config/dask/ "
                          "(or DASK_DISTRIBUTED__COMM__TLS__CA_FILE, __CLIENT__CERT, __CLIENT__KEY).")
    return security


@contextmanager
def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Iterator:
    """A Dask client of the scheduler at `address` with at least one worker; closed on
    exit, which drops every task it has not collected (a cancel takes them with it)."""
    check_address(address)
    security = client_security(address)
    try:
        client = Client(address, security=security, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise EngineError("SCHEDULER_UNREACHABLE", f"No Dask scheduler answers at {address}: {exc}",
                          START_HINT) from None
    try:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise EngineError("NO_WORKERS", f"The Dask scheduler at {address} has no worker.", START_HINT) from None
        yield client
    finally:
        client.close(timeout=2)  # the cancel promise: gone within 2 s


def missing_paths(paths: list[str]) -> list[str]:
    """Runs on a worker: those of `paths` it cannot read."""
    return [p for p in paths if not os.access(p, os.R_OK)]


def check_workers(client, paths: list[Path]) -> int:
    """That every worker can import the engine and read `paths` (shared storage);
    returns the number of workers."""
    try:
        missing = client.run(missing_paths, [str(p) for p in paths])
    except Exception as exc:  # unpickling our function fails on a worker without the engine
        raise EngineError("WORKER_ENVIRONMENT", f"The Dask workers cannot run the engine: {exc}",
                          "Start the workers from the engine's environment (.venv/bin/dask worker ADDRESS) "
                          "of the same landcover version.") from None
    for worker, paths_missing in missing.items():
        if paths_missing:
            raise EngineError("WORKER_CANNOT_READ", f"The Dask worker {worker} cannot read {', '.join(paths_missing)}.",
                              "Put the model and the imagery where every worker reads them at the same path "
                              "(a shared or mounted folder).")
    return len(missing)


class WarmSessions(WorkerPlugin):
    """A Dask worker plugin: one onnxruntime session per worker process, kept for every
    block it runs (creating one costs far more than a block's tiles on small models)."""

    name = "landcover-sessions"
    idempotent = True  # registered by every run; a worker keeps the one it has

    def setup(self, worker) -> None:
        self._lock = threading.Lock()  # the worker's threads share the session
        self._sessions: dict[tuple, object] = {}

    def session(self, model_file: Path, threads: int, tile_size: int):
        from .learn.inference import open_session, tiled_model
        from .learn.model_package import read_info

        key = (str(model_file), model_file.stat().st_mtime_ns, threads, tile_size)
        with self._lock:
            if key not in self._sessions:
                self._sessions.clear()  # one model at a time: its memory
                model, _ = tiled_model(model_file, read_info(model_file), threads, tile_size)  # as the client chose
                self._sessions[key] = open_session(model, Reporter(json_mode=True, out=io.StringIO()), threads)[0]
            return self._sessions[key]


def register_sessions(client) -> None:
    client.register_plugin(WarmSessions(), name=WarmSessions.name)


def worker_session(model_file: Path, threads: int, tile_size: int):
    """Runs in a task: this worker process's session of the model, for tiles of `tile_size` px."""
    return get_worker().plugins[WarmSessions.name].session(model_file, threads, tile_size)


def worker_address() -> str:
    return get_worker().address
