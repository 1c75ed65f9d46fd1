"""`make bench`: run every bench/bench_*.py, write bench-results.json, print a table.

Each module has `SECTION` (its key in the results) and `run(workdir: Path) -> dict`
returning flat {metric: number}. Speeds are reported as ratios against a
baseline measured in the same run: the machines are shared and noisy.
"""
from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results.json"


def discover(only: list[str]) -> list:
    sys.path.insert(0, str(ROOT / "bench"))
    names = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))
    return [importlib.import_module(n) for n in names if not only or n.removeprefix("bench_") in only]


def table(results: dict) -> str:
    rows = [(f"{section}.{key}", value) for section, metrics in results.items()
            if isinstance(metrics, dict) for key, value in metrics.items()]
    width = max((len(k) for k, _ in rows), default=10)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    for key, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def main(only: list[str]) -> None:
    modules = discover(only)
    if not modules:
        print("no benchmarks yet")
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for module in modules:
        started = time.monotonic()
        print(f"bench {module.SECTION} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results[module.SECTION] = module.run(Path(tmp))
        print(f"  {time.monotonic() - started:.0f} s", flush=True)
    tmp_file = RESULTS.with_suffix(".json.partial")
    tmp_file.write_text(json.dumps(results, indent=2))
    tmp_file.replace(RESULTS)
    print(table(results))
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
