"""A real OpenSSH server on 127.0.0.1 standing in for a GPU host (tests and bench).

Debian's sshd, with host and user keys made here, keys only, and the remote engine's
home under the server's folder (LANDCOVER_REMOTE_HOME through sshd's SetEnv). The client
side is an ssh config naming the host `gpu-test`, with its own known_hosts file: the host
starts unknown, as a new host does.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
# The engine a test host runs: set up by the first test run (minutes), updated by later ones (seconds).
SHARED_REMOTE_HOME = Path(__file__).resolve().parent / "artifacts" / "remote-home"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@dataclass
class SshServer:
    folder: Path
    port: int
    proc: subprocess.Popen
    remote_home: Path
    alias: str = "gpu-test"

    @property
    def ssh_config(self) -> Path:
        return self.folder / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def new_host_key(self) -> None:
        """The host reinstalled: a new host key, the server restarted on the same port."""
        self.stop()
        for name in ("host_key", "host_key.pub"):
            (self.folder / name).unlink()
        _keygen(self.folder / "host_key")
        self.proc = _start(self.folder, self.port)


def _start(folder: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "sshd.log", "ab"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("sshd did not start: " + (folder / "sshd.log").read_text())
            time.sleep(0.1)
    raise RuntimeError("sshd did not listen")


def start_ssh_server(folder: Path, remote_home: Path | None = None) -> SshServer:
    """A server in `folder`; its engine home is `remote_home` (kept between test runs so
    that setup installs the requirements once), else a fresh one in the folder."""
    remote_home = remote_home or folder / "remote-home"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    _keygen(folder / "host_key")
    _keygen(folder / "id_ed25519")
    shutil.copy(folder / "id_ed25519.pub", folder / "authorized_keys")
    remote_home.mkdir(parents=True, exist_ok=True)
    for stale in ("jobs", "store"):  # a test run starts with no jobs and no files on the host
        shutil.rmtree(remote_home / stale, ignore_errors=True)
    port = _free_port()
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    (folder / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
SetEnv LANDCOVER_REMOTE_HOME={remote_home}
""")
    (folder / "ssh_config").write_text(f"""Host gpu-test
  HostName 127.0.0.1
  Port {port}
  User {getpass.getuser()}
  IdentityFile {folder}/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile {folder}/known_hosts
  GlobalKnownHostsFile /dev/null
""")
    return SshServer(folder, port, _start(folder, port), remote_home)
