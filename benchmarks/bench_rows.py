"""The rows a benchmark reports for `make bench`'s table, one per ratio with a target:

    {"work", "lmkit", "reference", "unit", "ratio", "target", "passed"}

`ratio` is oriented so that the target reads as written (">= 1.5": lmkit at least 1.5x
better; "<= 0.5": lmkit's at most half of the reference's). Every benchmark prints its rows
as one last line, `BENCH_ROWS <json list>`, and writes them to `--json PATH` when given.
"""

from __future__ import annotations

import json
from pathlib import Path


def row(work: str, lmkit: float, reference: float, unit: str, ratio: float, target: float,
        at_most: bool = False) -> dict:
    """One row; the target is `ratio >= target` (or `<=` with `at_most`)."""
    passed = ratio <= target if at_most else ratio >= target
    return {"work": work, "lmkit": round(lmkit, 3), "reference": round(reference, 3),
            "unit": unit, "ratio": round(ratio, 3),
            "target": f"{'<=' if at_most else '>='} {target}", "passed": bool(passed)}


def emit(rows: list[dict], path: str | None = None) -> None:
    """Print the rows (a readable table, then the BENCH_ROWS line) and write them to path."""
    for r in rows:
        print(f"{r['work']}: lmkit {r['lmkit']:g} vs {r['reference']:g} {r['unit']}, ratio "
              f"{r['ratio']:.2f} (target {r['target']}): {'PASS' if r['passed'] else 'FAIL'}")
    print("BENCH_ROWS " + json.dumps(rows), flush=True)
    if path:
        Path(path).write_text(json.dumps(rows, indent=2) + "\n")
