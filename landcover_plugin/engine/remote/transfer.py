"""Files to the host and the model back.

Up: files are named by content (sha256); only those the host's store lacks are sent, as
one tar stream, and the host keeps each whole file as it arrives, so an interrupted
upload resumes where it stopped. Back: the model folder as a tar stream with a manifest
of hashes; every member is checked (a plain file, inside the folder, within the size
limit, its hash as listed) before the model is written.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable

from ..errors import EngineError
from . import ssh

MAX_MODEL_BYTES = 4 << 30  # a model package is tens of MB; more is not a model
Progress = Callable[[int, int], None]


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path, prefix: str) -> dict[str, Path]:
    """prefix/relative path -> file, for the files of a folder (hidden partial files left out)."""
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def upload(target: ssh.SshTarget, files: dict[str, Path], progress: Progress) -> tuple[dict[str, str], int]:
    """Send the files the host lacks; return (name -> sha256 of every file, bytes sent)."""
    hashes = {name: file_hash(path) for name, path in files.items()}
    missing = set(json.loads(ssh.run(target, "missing", stdin=json.dumps(sorted(set(hashes.values()))).encode())))
    to_send = {digest: files[name] for name, digest in hashes.items() if digest in missing}
    total = sum(p.stat().st_size for p in to_send.values())
    if not to_send:
        return hashes, 0
    proc = subprocess.Popen(target.argv("receive"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sent = 0
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|") as archive:
            for digest, path in to_send.items():
                archive.add(path, arcname=digest)
                sent += path.stat().st_size
                progress(sent, total)
    except BrokenPipeError:
        pass  # the host stopped reading: its exit status and message say why
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.stdout.read()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=300)
    ssh.check(target, proc.returncode, stderr)
    return hashes, sent


def _member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise EngineError("REMOTE_BAD_MODEL", f"The host sent an unsafe path ({name!r}); nothing was written.",
                          "Run `landcover remote setup HOST` to reinstall the engine there.")
    return path


def download_model(target: ssh.SshTarget, job: str, dest: Path) -> int:
    """Receive the job's model folder into `dest` (an empty folder); return its bytes."""
    proc = subprocess.Popen(target.argv("send-model", job), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest: dict[str, str] = {}
    received: dict[str, str] = {}
    size = 0
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
            for member in archive:
                path = _member_path(member.name)
                if not member.isfile():
                    raise EngineError("REMOTE_BAD_MODEL", f"The host sent {member.name!r}, not a plain file.",
                                      "Run `landcover remote setup HOST` to reinstall the engine there.")
                size += member.size
                if size > MAX_MODEL_BYTES:
                    raise EngineError("REMOTE_BAD_MODEL", "The host sent more than a model package holds.",
                                      "Run `landcover remote setup HOST` to reinstall the engine there.")
                data = archive.extractfile(member).read()
                if path.parts == ("manifest.json",):
                    manifest = json.loads(data)
                    continue
                if path.parts[0] != "model" or len(path.parts) < 2:
                    raise EngineError("REMOTE_BAD_MODEL", f"The host sent {member.name!r} outside the model.",
                                      "Run `landcover remote setup HOST` to reinstall the engine there.")
                out = dest.joinpath(*path.parts[1:])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)
                received["/".join(path.parts[1:])] = hashlib.sha256(data).hexdigest()
    except tarfile.TarError:
        pass  # a cut stream: the exit status says why, the manifest check catches the rest
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=60)
    ssh.check(target, proc.returncode, stderr)
    if not manifest or received != manifest:
        raise EngineError("REMOTE_BAD_MODEL", "The model came back incomplete or damaged (hashes differ); "
                          "nothing was written.", f"Fetch it again: `landcover remote attach {target.host} {job}`.")
    return size
