"""`make bench`: every benchmark in this folder, side by side with its reference, as one table.

    .venv/bin/python benchmarks/run.py [--only NAME ...] [--quick] [--out STEM]
        [--data ../shared/data] [--nanogpt ../ext/nanoGPT] [--threads N] [--device cpu]

Each benchmark (BENCHMARKS, or those named with --only) is a script in this folder, run in a
process of its own (its memory, threads and crashes stay its own), one after the other. It
prints its rows as its last line (`BENCH_ROWS [...]`, see table.py) and takes --quick; the
runner passes it --data / --nanogpt / --threads / --device when its argument parser names
them. The runner prints each benchmark's rows as they come, then the whole table with the
machine line (CPU model and flags, threads, versions, load average at the start), and
writes it to STEM.md and STEM.json (default runs/bench-<UTC time>). A benchmark that fails
becomes a row saying why; the others still run. `--quick` is a smoke check (fewer repeats
and steps): its figures are not the ones to report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # table.py is a sibling
    sys.path.insert(0, str(HERE))

import table  # noqa: E402

# In the order they run; an absent script (generate.py before it lands) is left out.
BENCHMARKS = ("pipeline", "generate", "nanogpt", "pretrain_step", "speed_vs_hf",
              "sst2_vs_hf_trainer", "mfu", "load_memory")
OPTIONS = ("data", "nanogpt", "threads", "device")  # passed to a script whose parser has them


def command(script: Path, quick: bool, options: dict[str, Any]) -> list[str]:
    """The command line of one benchmark: --quick, and the options its parser names."""
    source = script.read_text()
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    for name, value in options.items():
        if value is not None and f'"--{name}"' in source:
            cmd += [f"--{name}", str(value)]
    return cmd


def run_one(script: Path, quick: bool, options: dict[str, Any], log: TextIO) -> list[dict]:
    """The rows of one benchmark script; a failure is one row saying why."""
    name = script.stem
    if not script.is_file():
        return [table.row(name, None, None, "", note=f"failed: no benchmark {script}")]
    proc = subprocess.run(command(script, quick, options), capture_output=True, text=True,
                          cwd=HERE.parent)
    log.write(proc.stderr[-2000:] if proc.returncode else "")
    try:
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
            raise RuntimeError(f"exit status {proc.returncode}: {last}")
        return table.parse(proc.stdout)
    except (RuntimeError, ValueError) as e:
        return [table.row(name, None, None, "", note=f"failed: {e}")]


def run(names: list[str], quick: bool, options: dict[str, Any], folder: Path = HERE,
        log: TextIO = sys.stderr) -> list[dict]:
    """The rows of every benchmark in `names` (scripts in `folder`), run in turn."""
    rows: list[dict] = []
    for name in names:
        start = time.perf_counter()
        print(f"[bench] {name} ...", file=log, flush=True)
        got = run_one(folder / f"{name}.py", quick, options, log)
        for r in got:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            print(f"[bench]   {r['work']}: {ratio} (target {r['target']}) {r['note']}",
                  file=log, flush=True)
        print(f"[bench] {name}: {time.perf_counter() - start:.0f} s", file=log, flush=True)
        rows += got
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", metavar="NAME",
                    help=f"run only this benchmark (repeatable); default: {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and steps: a smoke check")
    ap.add_argument("--out", help="write STEM.md and STEM.json (default runs/bench-<time>)")
    ap.add_argument("--data", default="../shared/data", help="the shared data folder")
    ap.add_argument("--nanogpt", default="../ext/nanoGPT",
                    help="a nanoGPT clone (the reference of the nanogpt benchmark)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: each script's)")
    args = ap.parse_args(argv)
    names = args.only or [n for n in BENCHMARKS if (HERE / f"{n}.py").is_file()]
    options = {"data": os.path.abspath(args.data), "nanogpt": os.path.abspath(args.nanogpt),
               "threads": args.threads, "device": args.device}
    m = table.machine()
    if args.threads:
        m["threads"] = args.threads
    print(f"[bench] {table.machine_line(m)}", file=sys.stderr, flush=True)
    rows = run(names, args.quick, options)
    m["load_average_end"] = round(os.getloadavg()[0], 2)
    stem = args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    md, js = table.write(rows, m, stem)
    print(table.markdown(rows, m))
    print(f"(written to {md} and {js})")


if __name__ == "__main__":
    main()
