"""Outputs are written whole or not at all.

Each stage writes to a temporary name beside the final one and renames it when
complete, so a cancelled or failed run never leaves a half-written output.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def partial_path(final: Path) -> Path:
    """The temporary name used while `final` is being written (same folder,
    so the rename is atomic; same suffix, so drivers pick the right format)."""
    return final.with_name(f".{final.stem}.partial-{os.getpid()}{final.suffix}")


@contextmanager
def atomic_output(final: Path | str, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to `final` on success,
    delete it on any exception (including cancellation)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
