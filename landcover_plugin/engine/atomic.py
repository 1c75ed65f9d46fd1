"""Outputs are written whole or not at all, and never over what landcover did not write.

Each stage writes to a temporary name beside the final one and renames it when
complete, so a cancelled or failed run never leaves a half-written output.
An existing output is replaced only when landcover made it: a folder that holds
our marker file, or a file of the same kind (GeoTIFF over GeoTIFF, GeoPackage
over GeoPackage). A user's folder or document given as `--out`, or the stage's
own input, is refused before any work starts.
"""
from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import EngineError

# Written into every output folder; its presence is what allows replacing the folder.
MARKER = ".landcover-output"

# The first bytes of each kind of file a stage writes, by suffix.
_SIGNATURES = {
    ".tif": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    ".tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    ".gpkg": (b"SQLite format 3\x00",),
    ".mbtiles": (b"SQLite format 3\x00",),
    ".osm": (b"<?xml", b"<osm"),
    ".onnx": (b"\x08",),  # protobuf field 1 (ir_version), a varint
}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def partial_prefix(final: Path) -> str:
    """How every temporary name beside `final` starts (files and folders): with the
    pid, so that a later run can tell a killed run's leftovers from a live run's."""
    return f".{final.stem}.partial-{os.getpid()}"


def partial_path(final: Path) -> Path:
    """The temporary name used while `final` is being written (same folder,
    so the rename is atomic; same suffix, so drivers pick the right format)."""
    return final.with_name(f"{partial_prefix(final)}{final.suffix}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(final: Path) -> list[Path]:
    """Remove the temporary files and folders beside `final` of runs that are gone:
    a SIGKILL (or a power cut) skips every cleanup, and reruns never met them.
    Returns what was removed; a live run's (another pid still running) stay."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    # .STEM.partial-PID[suffix or -tmpname] (partial_prefix) and .NAME.old-PID (replace_with)
    pattern = re.compile(rf"\.(?:{re.escape(final.stem)}\.partial|{re.escape(final.name)}\.old)-(\d+)(\D.*)?")
    stale = [p for p in final.parent.iterdir()
             if (m := pattern.fullmatch(p.name)) and not pid_alive(int(m.group(1)))]
    for path in stale:
        _remove(path)
    return stale


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file whole or not at all: a full disk or a kill while
    writing leaves the previous file (or none), never an empty or torn one."""
    tmp = partial_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock_path(final: Path) -> Path:
    """The lock file of an output: hidden, beside it."""
    return final.with_name(f".{final.name}.lock")


@contextmanager
def run_lock(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock` while this run writes `what`; refuse (OUTPUT_BUSY,
    naming the holder's pid) when another run holds it. Two runs on one output or
    workdir would write over each other's temporary files. The kernel drops an flock
    when its process ends, killed included, so a leftover lock file locks nothing."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not guarded there
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EngineError("OUTPUT_BUSY", f"Another landcover run (pid {holder}) is writing {what}.",
                              f"Wait for it to finish (or stop it: kill {holder}), then run again; "
                              "or give this run another --out.") from None
        try:  # the holder before us may have removed the file after we opened it: lock the new one
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: nobody else can hold this file
        os.close(fd)


def _made_by_us(path: Path, directory: bool) -> bool:
    if directory:
        return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()
    if not path.is_file():
        return False
    signatures = _SIGNATURES.get(path.suffix.lower())
    if signatures is None:
        return path.stat().st_size == 0
    with open(path, "rb") as f:
        head = f.read(16)
    return head.startswith(signatures)


def check_out_path(final: Path | str, directory: bool = False, inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse an output path that would destroy something: the stage's own input (or a
    folder holding it), an existing folder or file landcover did not write."""
    final = Path(final)
    target = final.resolve()
    for given in inputs:
        if given is None or "://" in str(given):
            continue
        source = Path(given).resolve()
        if source == target or target in source.parents:
            raise EngineError("OUT_IS_INPUT", f"The output {final} would overwrite the input {given}.",
                              "Give --out a new name, beside the input rather than on it.")
    if (final.exists() or final.is_symlink()) and not _made_by_us(final, directory):
        what = ("a folder landcover did not write" if final.is_dir() else
                "a file of another kind" if final.is_file() else "not a regular file")
        expected = "a folder" if directory else f"a {final.suffix or 'file'}"
        raise EngineError("OUT_EXISTS", f"{final} exists and is {what}; it was left untouched "
                          f"(landcover writes {expected} there and replaces only what it made).",
                          "Give --out a new name, or move that one away yourself.")


def mark_output_dir(folder: Path) -> None:
    """Mark a folder as landcover's, so a later run may replace it."""
    (folder / MARKER).write_text("written by landcover; a rerun may replace this folder\n")


def replace_with(tmp: Path, final: Path, directory: bool) -> None:
    """Put the complete `tmp` at `final`, replacing only an output landcover made."""
    check_out_path(final, directory)
    if directory and final.is_dir():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_output(final: Path | str, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to `final` on success,
    delete it on any exception (including cancellation)."""
    final = Path(final)
    check_out_path(final, directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = partial_path(final)
    _remove(tmp)
    if directory:
        tmp.mkdir()
        mark_output_dir(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    replace_with(tmp, final, directory)
