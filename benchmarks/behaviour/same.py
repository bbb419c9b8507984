"""Compare the metrics.json files of two record.sh folders, leaving out timings, dates and paths.

    python benchmarks/behaviour/same.py BEFORE AFTER

Exit 0 when every run's metrics are identical (exactly, not within a tolerance), else 1
with the first difference of each run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TIMINGS = {"images_per_s", "seconds"}  # wherever they appear
PATHS = {"out", "log_dir", "pivot"}  # config entries that name this recording's folders


def cleaned(value):
    if isinstance(value, dict):
        return {k: cleaned(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [cleaned(v) for v in value]
    return value


def comparable(metrics: dict) -> dict:
    metrics = cleaned(metrics)
    metrics["config"] = {k: v for k, v in metrics["config"].items() if k not in PATHS}
    return metrics


def first_difference(a, b, where="") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}/{key}: only in {'after' if key not in a else 'before'}"
            found = first_difference(a[key], b[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def main(before: str, after: str) -> int:
    failures = 0
    runs = sorted(p.parent.name for p in Path(before).glob("*/metrics.json"))
    for run in runs:
        a = comparable(json.loads((Path(before) / run / "metrics.json").read_text()))
        path = Path(after) / run / "metrics.json"
        if not path.is_file():
            print(f"{run}: missing in {after}")
            failures += 1
            continue
        difference = first_difference(a, comparable(json.loads(path.read_text())))
        print(f"{run}: {'identical' if difference is None else 'DIFFERS ' + difference}")
        failures += difference is not None
    print(f"{len(runs) - failures} of {len(runs)} runs identical")
    return 1 if failures or not runs else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
