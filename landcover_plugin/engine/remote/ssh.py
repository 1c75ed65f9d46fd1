"""The connection to a remote host: the system's OpenSSH client, never a library of ours.

So the user's `~/.ssh/config`, agent, ProxyJump and known_hosts all apply. Keys only
(BatchMode: ssh never asks for a password) and host keys always checked
(StrictHostKeyChecking=yes, whatever the config says): a host not yet known is refused
with its fingerprint, for the user to check and accept (`accept_host_key`).

Every remote command is the engine's own host module (host.py), its arguments quoted.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineError

# The remote side: the engine installed by `landcover remote setup`, under
# $LANDCOVER_REMOTE_HOME (default ~/.landcover), run with its own Python.
HOST_SCRIPT = """R="${LANDCOVER_REMOTE_HOME:-$HOME/.landcover}"
if [ ! -x "$R/engine/bin/python" ] || [ ! -d "$R/src/landcover_plugin" ]; then
  echo "landcover-no-engine: no engine in $R" >&2; exit 97
fi
LANDCOVER_REMOTE_HOME="$R" PYTHONPATH="$R/src" exec "$R/engine/bin/python" -m landcover_plugin.engine.remote.host "$@"
"""
EXIT_NO_ENGINE = 97
SSH_FAILED = 255  # ssh's own exit code: the connection, not the remote command, failed


@dataclass(frozen=True)
class SshTarget:
    """Where to train: an ssh destination (a Host of the ssh config, or [user@]host)."""
    host: str
    ssh_config: Path | None = None  # instead of ~/.ssh/config
    identity: Path | None = None  # a private key file (the path only: ssh reads it)

    def __post_init__(self) -> None:
        if not self.host or self.host.startswith("-") or re.search(r"[\s'\"`$;&|<>\\]", self.host):
            raise EngineError("BAD_HOST", f"'{self.host}' is not an ssh destination.",
                              "Give a host name, user@host, or a Host of your ssh config, e.g. gpu-lab.")

    def ssh_options(self) -> list[str]:
        opts = ["-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=20",
                # a dropped link is noticed within 30 s, not at the next TCP timeout
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if self.ssh_config:
            opts += ["-F", str(self.ssh_config)]
        if self.identity:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return opts

    def argv(self, *host_args: str) -> list[str]:
        """ssh argv running `host.py HOST_ARGS` on the host, each argument quoted."""
        remote = " ".join(["sh", "-c", shlex.quote(HOST_SCRIPT), "landcover-host", *map(shlex.quote, host_args)])
        return ["ssh", *self.ssh_options(), "--", self.host, remote]

    def shell_argv(self, script: str, *args: str) -> list[str]:
        """ssh argv running a POSIX sh script of ours (setup only: before the engine exists)."""
        remote = " ".join(["sh", "-c", shlex.quote(script), "landcover-setup", *map(shlex.quote, args)])
        return ["ssh", *self.ssh_options(), "--", self.host, remote]


def run(target: SshTarget, *host_args: str, stdin: bytes | None = None, timeout: float = 120) -> bytes:
    """Run a host command and return its stdout; a failure becomes a clear EngineError."""
    try:
        done = subprocess.run(target.argv(*host_args), input=stdin or b"", capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EngineError("HOST_UNREACHABLE", f"{target.host} did not answer within {timeout:.0f} s.",
                          "Check that the host is up and reachable (ssh HOST), then try again.") from None
    check(target, done.returncode, done.stderr.decode(errors="replace"))
    return done.stdout


def check(target: SshTarget, returncode: int, stderr: str) -> None:
    """Raise the EngineError a failed ssh command means (nothing when it succeeded)."""
    if returncode == 0:
        return
    error = connection_error(target, returncode, stderr)
    if error:
        raise error
    last = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
    raise EngineError("REMOTE_FAILED", f"The command on {target.host} failed (exit {returncode}): "
                      + (" / ".join(last) or "no message"),
                      f"Run `landcover remote setup {target.host}` to repair the engine there, then try again.")


def connection_error(target: SshTarget, returncode: int, stderr: str) -> EngineError | None:
    """The EngineError for ssh's own failures (exit 255) and a host without the engine."""
    host = target.host
    if returncode == EXIT_NO_ENGINE and "landcover-no-engine" in stderr:
        return EngineError("REMOTE_NO_ENGINE", f"{host} has no landcover engine.",
                           f"Install it there first: `landcover remote setup {host}`.")
    if returncode != SSH_FAILED:
        return None
    if "IDENTIFICATION HAS CHANGED" in stderr or "POSSIBLE DNS SPOOFING" in stderr:
        return EngineError("HOST_KEY_CHANGED", f"The host key of {host} has changed since you last connected: "
                           "someone may be intercepting the connection, or the host was reinstalled.",
                           "Ask the host's administrator whether its key changed. Only then remove the old key "
                           f"(`ssh-keygen -R {host}`) and connect again.")
    if "Host key verification failed" in stderr or "host key is known" in stderr:
        keys = scan_host_keys(target)
        shown = "; ".join(f"{fp} ({kind})" for kind, fp, _ in keys) or "could not be read"
        return EngineError("HOST_KEY_UNKNOWN", f"{host} is not a known host yet. Its key fingerprint: {shown}.",
                           "Check the fingerprint with the host's administrator, then accept it: "
                           f"`landcover remote setup {host} --accept-host-key SHA256:...`.")
    if "Permission denied" in stderr or "Too many authentication failures" in stderr:
        return EngineError("SSH_AUTH_FAILED", f"{host} refused the login: no key of yours is accepted there.",
                           "Add your public key to ~/.ssh/authorized_keys on the host (ssh-copy-id), or give "
                           "the key file (--ssh-identity) or an ssh config (--ssh-config).")
    last = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
    return EngineError("HOST_UNREACHABLE", f"Cannot connect to {host}: {last[0] if last else 'no answer'}.",
                       "Check the host name, that the host is up, and that `ssh HOST` works in a terminal.")


def resolved_config(target: SshTarget) -> dict[str, str]:
    """What ssh makes of the destination (`ssh -G`): hostname, port, known hosts files."""
    argv = ["ssh", "-G", *(["-F", str(target.ssh_config)] if target.ssh_config else []), "--", target.host]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    config: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        config.setdefault(key.lower(), value)
    return config


def key_fingerprint(key_base64: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(base64.b64decode(key_base64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def scan_host_keys(target: SshTarget) -> list[tuple[str, str, str]]:
    """(key type, fingerprint, known_hosts line) of each key the host offers."""
    config = resolved_config(target)
    hostname, port = config.get("hostname", target.host), config.get("port", "22")
    try:
        done = subprocess.run(["ssh-keyscan", "-T", "10", "-p", port, hostname],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    keys = []
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            try:
                keys.append((parts[1], key_fingerprint(parts[2]), line))
            except ValueError:
                continue
    return keys


def accept_host_key(target: SshTarget, fingerprint: str) -> Path:
    """Add the host's key to the user's known_hosts, only when it has the fingerprint the
    user checked; return the known_hosts file."""
    matching = [line for _, fp, line in scan_host_keys(target) if fp == fingerprint.strip()]
    if not matching:
        raise EngineError("HOST_KEY_MISMATCH", f"{target.host} offers no key with fingerprint {fingerprint}.",
                          "Copy the fingerprint exactly as shown (SHA256:...), or check that you reach the "
                          "right host.")
    files = resolved_config(target).get("userknownhostsfile", "~/.ssh/known_hosts").split()
    known = Path(os.path.expanduser(files[0]))
    known.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with known.open("a") as f:
        f.write("\n".join(matching) + "\n")
    return known
