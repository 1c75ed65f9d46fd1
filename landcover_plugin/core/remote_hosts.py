"""GPU hosts the user trains on, kept in QGIS settings, and the engine runs that use them.

A host is a name for the dock, an ssh destination and optionally a private key file
(its path: ssh reads the key; nothing secret is stored here). The connection itself is
the engine's (`landcover remote setup`, `train --remote`): the user's ssh config and
known_hosts apply.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..contract.runner import EngineRun
from .engine_env import EngineLocation

HOSTS_SETTING = "landcover/remote_hosts"
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


@dataclass(frozen=True)
class RemoteHost:
    name: str  # shown in the dock, e.g. "gpu-lab"
    destination: str  # ssh destination: a Host of ~/.ssh/config or [user@]host
    identity: str = ""  # private key file, optional

    @property
    def identity_path(self) -> Path | None:
        return Path(self.identity) if self.identity.strip() else None


def load_hosts(settings) -> list[RemoteHost]:
    """The saved hosts (a QgsSettings or anything with value()); malformed entries skipped."""
    try:
        raw = json.loads(settings.value(HOSTS_SETTING, "[]") or "[]")
    except (TypeError, ValueError):
        return []
    fields = set(RemoteHost.__dataclass_fields__)
    return [RemoteHost(**{k: str(v) for k, v in h.items() if k in fields}) for h in raw
            if isinstance(h, dict) and h.get("name") and h.get("destination")]


def save_hosts(settings, hosts: list[RemoteHost]) -> None:
    settings.setValue(HOSTS_SETTING, json.dumps([asdict(h) for h in hosts]))


def with_host(hosts: list[RemoteHost], host: RemoteHost) -> list[RemoteHost]:
    """The list with `host` added, or replacing the host of the same name."""
    return [h for h in hosts if h.name != host.name] + [host]


def setup_run(location: EngineLocation, host: RemoteHost, accept_fingerprint: str | None = None) -> EngineRun:
    """`landcover remote setup` for the host: installs the engine there, reports its GPUs."""
    args = ["remote", "setup", host.destination]
    if host.identity_path:
        args += ["--ssh-identity", str(host.identity_path)]
    if accept_fingerprint:
        args += ["--accept-host-key", accept_fingerprint]
    return EngineRun(location.python, args)


def fingerprint_in(message: str) -> str | None:
    """The host key fingerprint an unknown host's error shows, for the user to accept."""
    found = FINGERPRINT.search(message)
    return found.group(0) if found else None
