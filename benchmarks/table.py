"""The row protocol every benchmark in this folder speaks, and the one table `make bench` prints.

A benchmark is a script: its last line of output is ``BENCH_ROWS <json list of rows>``
(`emit`), it takes ``--quick`` (a smoke check: fewer repeats and steps) and ``--json PATH``,
and it may expose ``rows(quick=False, ...)`` returning the same rows to Python callers. A row
(`row`):

    work        what was measured ("GPT-2-124M train step, 4 x 256, fp32")
    lmkit       lmkit's figure (None: not measured, see the note)
    reference   the reference's figure (transformers, nanoGPT; None: not measured)
    unit        of both figures ("tokens/s", "sentences/s", "ms", "MiB")
    ratio       lmkit / reference, or reference / lmkit for a lower-is-better figure, so > 1
                always means lmkit is better
    target      ">= 3.0" (None: informative only)
    passed      the ratio meets the target (None when there is no target or no ratio)
    note        how it was measured, and anything a reader must know to trust it

Timings are medians of interleaved repeats (`interleaved`); nothing here asserts a timing.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

FIELDS = ("work", "lmkit", "reference", "unit", "ratio", "target", "passed")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
MARK = "BENCH_ROWS "


def row(work: str, lmkit: float | None, reference: float | None, unit: str,
        target: float | None = None, note: str = "", higher_is_better: bool = True
        ) -> dict[str, Any]:
    """One table row; the ratio is oriented so that > 1 means lmkit is better."""
    ratio = None
    if lmkit is not None and reference is not None and lmkit > 0 and reference > 0:
        ratio = lmkit / reference if higher_is_better else reference / lmkit
    passed = None if ratio is None or target is None else ratio >= target
    return {"work": work, "lmkit": lmkit, "reference": reference, "unit": unit,
            "ratio": ratio, "target": None if target is None else f">= {target}",
            "passed": passed, "note": note}


def check_row(r: Any) -> dict[str, Any]:
    """`r` if it is a row with every field, else a ValueError naming what is wrong."""
    if not isinstance(r, dict):
        raise ValueError(f"a benchmark row must be a dict, got {type(r).__name__}")
    missing = [f for f in FIELDS if f not in r]
    if missing:
        raise ValueError(f"benchmark row {r.get('work', r)!r} lacks {', '.join(missing)}: "
                         "build rows with benchmarks/table.py's row()")
    return {"note": "", **r}


def emit(rows: Sequence[dict[str, Any]], path: str | None = None) -> None:
    """Print the rows as the last line of output (what the runner reads); write them to
    `path` too when given."""
    print(MARK + json.dumps(list(rows)), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(list(rows), f, indent=2)


def parse(output: str) -> list[dict[str, Any]]:
    """The rows of a benchmark's output (its last BENCH_ROWS line), checked."""
    lines = [line for line in output.splitlines() if line.startswith(MARK)]
    if not lines:
        raise ValueError("the benchmark printed no BENCH_ROWS line (see table.emit)")
    return [check_row(r) for r in json.loads(lines[-1][len(MARK):])]


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of `repeats` calls of each fn (each returns its own figure), called in turn
    (a, b, a, b, ...) so that drift in the machine's load hits all of them alike."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: statistics.median(v) for name, v in runs.items()}


def seconds(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags]


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model and the flags that decide fp32/bf16
    speed, threads, library versions, GPU, load average at the start."""
    import torch
    import transformers

    model, flags = cpu_model_and_flags()
    return {"cpu": model, "cores": os.cpu_count(), "flags": flags,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "aten_cpu": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": round(os.getloadavg()[0], 2)}


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    flags = " ".join(m["flags"]) or f"none of {'/'.join(CPU_FLAGS)}"
    return (f"{m['cpu']} ({m['cores']} cores; flags: {flags}; ATen {m['aten_cpu']}){gpu}; "
            f"{m['threads']} threads; torch {m['torch']}, transformers {m['transformers']}; "
            f"load average {m['load_average']} at start")


def _figure(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown(rows: Sequence[dict[str, Any]], m: dict[str, Any]) -> str:
    """The table as Markdown, the machine line above it, notes below."""
    lines = [f"Machine: {machine_line(m)}", "",
             "| work | lmkit | reference | unit | ratio | target | pass |",
             "|---|---:|---:|---|---:|---:|---|"]
    rows = [check_row(r) for r in rows]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        target = "-" if r["target"] is None else f"{r['target']}x"
        verdict = {True: "PASS", False: "FAIL", None: "-"}[r["passed"]]
        lines.append(f"| {r['work']} | {_figure(r['lmkit'])} | {_figure(r['reference'])} | "
                     f"{r['unit']} | {ratio} | {target} | {verdict} |")
    notes = [f"- {r['work']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines + (["", "Notes:", *notes] if notes else [])) + "\n"


def write(rows: Sequence[dict[str, Any]], m: dict[str, Any], stem: str) -> tuple[str, str]:
    """`stem`.md and `stem`.json; returns their paths."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    md, js = f"{stem}.md", f"{stem}.json"
    with open(md, "w") as f:
        f.write(markdown(rows, m))
    with open(js, "w") as f:
        json.dump({"machine": m, "rows": list(rows)}, f, indent=2)
    return md, js
