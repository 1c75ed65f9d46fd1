"""Build the installable plugin zip: landcover_plugin/ with metadata.txt,
resources/ and the engine's requirement files (for 'Create environment'),
symbolic links resolved, no caches or tests."""
from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"__pycache__", ".pytest_cache"}


def files_under(folder: Path):
    for top, dirs, names in os.walk(folder, followlinks=True):  # follow the metadata/resources links
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        for name in sorted(names):
            if not name.endswith(".pyc"):
                yield Path(top) / name


def main(out: str) -> None:
    out_path = ROOT / out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".zip.partial")
    try:
        write_zip(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out_path)
    print(f"wrote {out_path.relative_to(ROOT)} ({out_path.stat().st_size // 1024} KiB)")


def write_zip(tmp: Path) -> None:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        plugin = ROOT / "landcover_plugin"
        for path in files_under(plugin):
            archive.write(path, Path("landcover_plugin") / path.relative_to(plugin))
        for path in files_under(ROOT / "requirements"):
            archive.write(path, Path("landcover_plugin") / path.relative_to(ROOT))
        archive.write(ROOT / "README.md", "landcover_plugin/README.md")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dist/landcover_plugin.zip")
