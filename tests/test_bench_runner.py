"""`make bench`'s runner (benchmarks/run.py) and its row protocol (benchmarks/table.py), on
fake benchmark scripts run as real processes. No timing is measured or asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


table, runner = _load("table"), _load("run")

FAKE = f"""
import argparse, sys
sys.path.insert(0, {str(BENCH)!r})
from table import emit, row

def rows(quick=False, data=None):
    return [row("fake speed", 300.0, 100.0, "sentences/s", 3.0, f"quick={{quick}} data={{data}}"),
            row("fake memory", 50.0, 40.0, "MiB", 1.0, higher_is_better=False),
            row("fake info", 2.0, None, "s")]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data")
    args = ap.parse_args()
    print("some progress output")
    emit(rows(args.quick, args.data))
"""


@pytest.fixture()
def fakes(tmp_path: Path) -> Path:
    (tmp_path / "fake.py").write_text(FAKE)
    (tmp_path / "broken.py").write_text("raise SystemExit('no model to measure')\n")
    (tmp_path / "silent.py").write_text("print('forgot the rows')\n")
    return tmp_path


def test_runner_collects_rows_and_failures(fakes: Path, tmp_path: Path) -> None:
    log = (tmp_path / "log.txt").open("w")
    rows = runner.run(["fake", "broken", "silent", "absent"], quick=True,
                      options={"data": "/some/data", "nanogpt": "/x", "threads": None},
                      folder=fakes, log=log)
    assert [r["work"] for r in rows] == ["fake speed", "fake memory", "fake info", "broken",
                                         "silent", "absent"]
    speed, memory, info = rows[:3]
    # --quick and the options the fake's parser names were passed; --nanogpt was not
    assert speed["note"] == "quick=True data=/some/data"
    assert speed["ratio"] == 3.0 and speed["target"] == ">= 3.0" and speed["passed"] is True
    assert memory["ratio"] == pytest.approx(0.8) and memory["passed"] is False  # lower is better
    assert info["ratio"] is None and info["passed"] is None and info["target"] is None
    assert "no model to measure" in rows[3]["note"] and rows[3]["note"].startswith("failed")
    assert "BENCH_ROWS" in rows[4]["note"]
    assert "no benchmark" in rows[5]["note"]


def test_table_markdown_and_files(tmp_path: Path) -> None:
    rows = [table.row("speed", 250.0, 80.0, "tokens/s", 1.3, "median of 3"),
            table.row("loss", 1.89, 1.88, "nats", 0.99, higher_is_better=False),
            table.row("skipped", None, None, "tokens/s", 1.3, "skipped: no nanoGPT")]
    m = {"cpu": "Test CPU", "cores": 2, "flags": ["avx2"], "threads": 2, "torch": "2.x",
         "transformers": "5.x", "aten_cpu": "AVX2", "gpu": None, "load_average": 0.5}
    text = table.markdown(rows, m)
    lines = text.splitlines()
    assert lines[0].startswith("Machine: Test CPU (2 cores; flags: avx2; ATen AVX2), no GPU")
    assert "load average 0.5" in lines[0]
    assert lines[2] == "| work | lmkit | reference | unit | ratio | target | pass |"
    assert lines[4] == "| speed | 250 | 80 | tokens/s | 3.12x | >= 1.3x | PASS |"
    assert lines[5] == "| loss | 1.89 | 1.88 | nats | 0.99x | >= 0.99x | PASS |"
    assert lines[6] == "| skipped | - | - | tokens/s | - | >= 1.3x | - |"
    assert "- skipped: skipped: no nanoGPT" in lines
    md, js = table.write(rows, m, str(tmp_path / "out" / "bench"))
    assert Path(md).read_text() == text
    assert json.loads(Path(js).read_text()) == {"machine": m, "rows": rows}


def test_rows_from_other_scripts_and_bad_rows() -> None:
    # bench_rows.py's format (no note, a target with its direction) is read as it is
    theirs = {"work": "w", "lmkit": 1.0, "reference": 2.0, "unit": "MB", "ratio": 0.5,
              "target": "<= 0.5", "passed": True}
    out = "progress\nBENCH_ROWS " + json.dumps([theirs]) + "\n"
    assert table.parse(out) == [{**theirs, "note": ""}]
    with pytest.raises(ValueError, match="lacks ratio, target, passed"):
        table.check_row({"work": "w", "lmkit": 1.0, "reference": 2.0, "unit": "s"})
    with pytest.raises(ValueError, match="no BENCH_ROWS line"):
        table.parse("done\n")


def test_command_passes_only_named_options(tmp_path: Path) -> None:
    script = tmp_path / "b.py"
    script.write_text('ap.add_argument("--data")\nap.add_argument("--threads")\n')
    cmd = runner.command(script, False, {"data": "/d", "nanogpt": "/n", "threads": None})
    assert cmd[1:] == [str(script), "--data", "/d"]
