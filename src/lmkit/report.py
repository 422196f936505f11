"""`lmkit report RUN [RUN...]`: runs side by side, as one PNG and the same numbers as a
Markdown table.

    from lmkit.report import write_report
    rep = write_report(["runs/sst2/finetuned", "runs/sst2/scratch"], "runs/sst2/report.png")

The PNG has the loss curves (metrics.jsonl) and the dev-metric curves (eval.json of a
fine-tuning run) against training FLOPs, and bars of FLOPs, wall time, energy and CO2 per run,
its own cost stacked under its ancestors' (from the lineage in its model card). The table
(printed by the CLI and written next to the PNG as .md) holds the same numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkit.errors import require
from lmkit.finetune.run import EVAL_FILE
from lmkit.lineage import COSTS, describe_base, fmt, markdown, read_lineage, totals
from lmkit.train.metrics import COMPUTE, read_metrics

# The bars: (cost field, axis label, scale factor for display).
BARS = (("flops", "training FLOPs", 1.0), ("wall_time_s", "wall time (s)", 1.0),
        ("energy_kwh", "energy (kWh)", 1.0), ("emissions_kg", "CO2 (g CO2eq)", 1000.0))
CURVE_KEYS = ("step", "flops", "elapsed_s")


@dataclass
class Report:
    png: Path
    markdown: Path
    table: str  # the Markdown table, as written to `markdown`


@dataclass
class _Run:
    name: str
    folder: Path
    record: dict[str, Any] | None  # None: no card yet (a run that did not finish)
    compute: dict[str, Any]  # this run's, from the card or compute.json
    costs: dict[str, Any]  # totals(): own / ancestors / total / complete
    loss: list[tuple[float, float, str]]  # (flops, loss, split)
    metric: tuple[str, list[tuple[float, float]]] | None  # dev metric name and curve


def read_run(folder: str | Path) -> _Run:
    """What a report shows of one run folder: its lineage costs and curves."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no run folder at {folder}: give folders written by lmkit "
                                "pretrain / finetune / convert")
    record = read_lineage(folder)
    if record is not None:
        compute, costs = record["compute"], totals(record)
    elif (folder / COMPUTE).is_file():  # a run without a card yet (stopped early)
        compute = json.loads((folder / COMPUTE).read_text())
        own = {k: float(compute.get(k) or 0) for k in COSTS}
        costs = {"own": own, "ancestors": {k: 0.0 for k in COSTS}, "total": own,
                 "complete": False}
    else:
        raise FileNotFoundError(f"{folder} has neither a model card with a lineage nor "
                                f"{COMPUTE}: it is not a run folder written by lmkit")
    records = read_metrics(folder)
    flops_at = {r["step"]: r["flops"] for r in records if "flops" in r}
    loss = [(flops_at.get(r["step"], 0.0), r["loss"], r.get("split", "train"))
            for r in records if "loss" in r]
    metric = None
    if (folder / EVAL_FILE).is_file():
        curve = json.loads((folder / EVAL_FILE).read_text()).get("curve") or []
        names = [k for k in (curve[-1] if curve else {}) if k not in CURVE_KEYS]
        names = [k for k in names if k not in ("loss", "perplexity")] or names  # the task's
        if names:
            metric = (names[0], [(p["flops"], p[names[0]]) for p in curve
                                 if p.get("flops") is not None and names[0] in p])
    return _Run(folder.resolve().name, folder, record, compute, costs, loss, metric)


def table(runs: list[_Run]) -> str:
    """The Markdown table of the runs: this run's cost, its ancestors', and the total."""
    header = ["run", "kind", "base", "final dev metric", "FLOPs own", "FLOPs ancestors",
              "FLOPs total", "time own (s)", "time total (s)", "energy own (kWh)",
              "energy total (kWh)", "CO2 own (kg)", "CO2 total (kg)", "energy method"]
    rows, notes = [], []
    for r in runs:
        rec, c = r.record or {}, r.costs
        metric = f"{r.metric[0]} {r.metric[1][-1][1]:.2f}" if r.metric and r.metric[1] else ""
        if not metric:
            valid = [x for x in r.loss if x[2] == "valid"]
            metric = f"loss {valid[-1][1]:.4f}" if valid else ""
        rows.append([r.name, rec.get("kind", "?"), describe_base(rec.get("base", {})) if rec
                     else "?", metric, fmt(c["own"]["flops"]), fmt(c["ancestors"]["flops"]),
                     fmt(c["total"]["flops"]), fmt(c["own"]["wall_time_s"], ".1f"),
                     fmt(c["total"]["wall_time_s"], ".1f"), fmt(c["own"]["energy_kwh"]),
                     fmt(c["total"]["energy_kwh"]), fmt(c["own"]["emissions_kg"]),
                     fmt(c["total"]["emissions_kg"]),
                     str(r.compute.get("energy_method", "?"))])
        if r.record is None:
            notes.append(f"- {r.name}: no model card yet (the run did not finish): its own cost "
                         "so far, from compute.json; its lineage is unknown")
        elif not c["complete"]:
            notes.append(f"- {r.name}: the chain ends at a checkpoint without a lineage record "
                         "(its training cost is not counted)")
    return "\n".join([*markdown(header, rows), *([""] + notes if notes else [])]) + "\n"


def write_report(runs: list[str | Path], out: str | Path = "report.png") -> Report:
    """Write the PNG `out` and the Markdown table next to it (`out` with .md) for the run
    folders `runs`; returns both paths and the table."""
    if not runs:
        raise ValueError("give at least one run folder to report on")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the report is a PNG image; give a path ending in .png")
    read = [read_run(r) for r in runs]
    names = [r.name for r in read]
    for r in read:  # two folders of one name: say which parent each is in
        if names.count(r.name) > 1:
            r.name = f"{r.folder.resolve().parent.name}/{r.name}"
    text = table(read)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    _atomic_write(md, lambda tmp: tmp.write_text(text))
    _atomic_write(out, lambda tmp: _plot(read, tmp))
    return Report(out, md, text)


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def _plot(runs: list[_Run], file: Path) -> None:
    matplotlib = require("matplotlib", "plots", "lmkit report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 8.5))
    grid = fig.add_gridspec(2, len(BARS))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    loss_ax = fig.add_subplot(grid[0, :2])
    metric_ax = fig.add_subplot(grid[0, 2:])
    for i, r in enumerate(runs):
        color = colors[i % len(colors)]
        for split, style in (("train", "-"), ("valid", "--")):
            points = sorted((f, v) for f, v, s in r.loss if s == split and f > 0)
            if points:  # a few points (a short run) get markers, or one would not show
                loss_ax.plot(*zip(*points), style, color=color, linewidth=1, markersize=3,
                             marker="o" if len(points) < 30 or split == "valid" else None,
                             label=f"{r.name} ({split})")
        if r.metric and r.metric[1]:
            metric_ax.plot(*zip(*sorted(r.metric[1])), "o-", color=color, markersize=3,
                           label=f"{r.name}: {r.metric[0]}")
    for ax, title, ylabel in ((loss_ax, "loss", "loss (nats / token)"),
                              (metric_ax, "dev metric", "dev metric")):
        ax.set_title(f"{title} against training FLOPs (this run's)")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no curve recorded", ha="center", transform=ax.transAxes)
    names = [r.name for r in runs]
    for j, (key, label, scale) in enumerate(BARS):
        ax = fig.add_subplot(grid[1, j])
        own = [r.costs["own"][key] * scale for r in runs]
        before = [r.costs["ancestors"][key] * scale for r in runs]
        ax.bar(names, own, color=colors[0], label="this run")
        ax.bar(names, before, bottom=own, color=colors[1], alpha=0.6, label="ancestors")
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
        if j == 0:
            ax.legend(fontsize=8)
    fig.suptitle("runs side by side: curves, and the cost of each run with its lineage")
    fig.tight_layout()
    fig.savefig(file, dpi=100, format="png")
    plt.close(fig)
