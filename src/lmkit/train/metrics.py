"""Run records: metrics.jsonl (read here, written by `trackers.py`), the loss-curve PNG,
compute accounting (task scores such as accuracy or BLEU are `lmkit.tasks.scores`)."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lmkit.errors import require

log = logging.getLogger("lmkit")
METRICS, COMPUTE, CURVE, TENSORBOARD = "metrics.jsonl", "compute.json", "loss.png", "tensorboard"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a run folder or the file itself). A line that is
    not a JSON record (the last one, cut by a kill) is skipped with a warning: the metrics
    are a log, never a reason to refuse a resume."""
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    if not file.exists():
        return []
    records = []
    for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step", 0), int):
            records.append(record)
        else:
            log.warning("%s:%d is not a metrics record (cut short by a kill?); skipped",
                        file, number)
    return records


def plot_curves(out_dir: str | Path, file: str | Path | None = None,
                metric: str | None = None) -> Path | None:
    """Draw loss.png from metrics.jsonl: train and validation loss (nats per target token)
    against optimizer steps (training tokens on the top axis), and a dev metric (`metric`,
    else the first the validation records hold besides loss and perplexity) on a second y
    axis. Few points are drawn as markers, so a short run does not look like a smooth curve."""
    out_dir = Path(out_dir)
    records = read_metrics(out_dir)
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    valid = [r for r in records if r.get("split") == "valid"]
    if not train and not valid:
        return None
    matplotlib = require("matplotlib", "plots", "the loss plot (loss.png)")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "plots", "the loss plot (loss.png)")
    require("matplotlib.ticker", "plots", "the loss plot (loss.png)")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        few = len(train) <= 30
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], "o-" if few else "-",
                label="train loss", linewidth=1, alpha=0.8, markersize=4)
    if any("loss" in r for r in valid):
        points = [(r["step"], r["loss"]) for r in valid if "loss" in r]
        ax.plot(*zip(*points), "s--", label="validation loss", linewidth=1.2, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("loss (nats / target token)")
    _tokens_axis(ax, train)
    metric = metric if metric not in (None, "loss", "perplexity") else next(
        (k for r in valid for k, v in r.items() if k not in ("split", "step", "loss",
         "perplexity", "tokens", "flops", "elapsed_s") and isinstance(v, (int, float))), None)
    handles, labels = ax.get_legend_handles_labels()
    points = [(r["step"], r[metric]) for r in valid if metric and isinstance(r.get(metric),
                                                                          (int, float))]
    if points:
        right = ax.twinx()
        right.plot(*zip(*points), "^-", color="tab:green", label=f"dev {metric}",
                   linewidth=1.2, markersize=5)
        right.set_ylabel(f"dev {metric}")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.set_title(out_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    path = Path(file) if file is not None else out_dir / CURVE
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _tokens_axis(ax: Any, train: list[dict[str, Any]]) -> None:
    """Training tokens seen on the top axis (the run's mean tokens per step)."""
    last = next((r for r in reversed(train) if r.get("tokens") and r["step"] > 0), None)
    if last is not None:
        rate = last["tokens"] / last["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * rate, lambda t: t / rate))
        top.set_xlabel("training tokens (at the run's mean tokens per step)")


def describe_device(device: torch.device, world_size: int = 1) -> str:
    """A short description of the hardware a run used."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"CPU {platform.processor() or platform.machine()}, " \
               f"{torch.get_num_threads()} threads"
    return f"{world_size} x {what}" if world_size > 1 else what


class ComputeMeter:
    """Tokens, training FLOPs (`Model.flops_per_token(seq_len)` x tokens: from what trains,
    6N for full training, about 2N for a frozen body, 4N for LoRA) and wall time, summed over
    every session of a run (a resumed run starts from the totals saved in its checkpoint).
    `segments` records each session: its steps, hardware, precision and share of the totals,
    and, with an `energy` meter (train/energy.py), its energy and emissions with their method;
    the run's energy_kwh and emissions_kg are the sums over the segments."""

    def __init__(self, model: Any, state: dict[str, Any] | None = None, *, step: int = 0,
                 device: str = "", torch_device: str = "", world_size: int = 1,
                 precision: str = "", energy: Any = None):
        self.model, self.energy = model, energy
        state = state or {}
        self.tokens = int(state.get("tokens", 0))
        self.flops = float(state.get("flops", 0.0))
        self._wall_before = float(state.get("wall_time_s", 0.0))
        self._start = time.perf_counter()
        self.sessions = int(state.get("sessions", 0)) + 1
        self._per_token: dict[int, float] = {}
        self.segments = list(state.get("segments", []))
        if state and not self.segments:  # saved before segments were recorded
            self.segments = [{"start_step": 0, "end_step": step, "device": None,
                              "torch_device": None, "world_size": None, "precision": None,
                              "tokens": self.tokens,
                              "flops": self.flops, "wall_time_s": self._wall_before}]
        self.segment = {"start_step": step, "end_step": step, "device": device,
                        "torch_device": torch_device, "world_size": world_size,
                        "precision": precision, "tokens": 0,
                        "flops": 0.0, "wall_time_s": 0.0}

    @property
    def wall_time_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._start

    def flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._per_token:
            self._per_token[seq_len] = float(self.model.flops_per_token(seq_len))
        return self._per_token[seq_len]

    def add(self, tokens: int, seq_len: int) -> float:
        """Count `tokens` trained on in rows of `seq_len` (one more step); returns their
        FLOPs."""
        flops = tokens * self.flops_per_token(seq_len)
        self.tokens += tokens
        self.flops += flops
        self.segment["tokens"] += tokens
        self.segment["flops"] += flops
        self.segment["end_step"] += 1
        if self.energy is not None:
            self.energy.sample()
        return flops

    def state_dict(self) -> dict[str, Any]:
        segment = {**self.segment, "wall_time_s": time.perf_counter() - self._start}
        if self.energy is not None:
            segment.update(self.energy.reading())
        return {"tokens": self.tokens, "flops": self.flops, "wall_time_s": self.wall_time_s,
                "sessions": self.sessions, "segments": [*self.segments, segment]}

    def summary(self, **extra: Any) -> dict[str, Any]:
        wall, state = self.wall_time_s, self.state_dict()
        return {**state, **energy_totals(state["segments"]),
                "tokens_per_s": self.tokens / wall if wall else 0.0,
                "flops_per_s": self.flops / wall if wall else 0.0,
                "parameters": self.model.num_parameters(),
                "non_embedding_parameters": self.model.num_parameters(include_embeddings=False),
                "trainable_parameters": sum(p.numel() for p in self.model.parameters()
                                            if p.requires_grad),
                **extra}

    def stop(self) -> None:
        """Stop the energy meter (its last reading is kept)."""
        if self.energy is not None:
            self.energy.stop()

    def write(self, out_dir: str | Path, summary: dict[str, Any]) -> Path:
        """Write `summary` (from `summary()`) to out_dir/compute.json atomically."""
        path = Path(out_dir) / COMPUTE
        tmp = path.with_name(f".{COMPUTE}.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)
        return path


def energy_totals(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's energy_kwh and emissions_kg: the sums over its segments, with the method (one,
    or "mixed" when sessions differ; a segment without a figure is named, and not counted)."""
    known = [s for s in segments if s.get("energy_kwh") is not None]
    methods = sorted({s["energy_method"] for s in known})
    intensities = sorted({s["carbon_intensity_g_per_kwh"] for s in known})
    method = methods[0] if len(methods) == 1 else \
        "mixed: " + " | ".join(methods) if methods else "not recorded"
    if len(known) < len(segments):
        method += f" ({len(segments) - len(known)} earlier session(s) recorded no energy)"
    return {"energy_kwh": sum(s["energy_kwh"] for s in known) if known else None,
            "emissions_kg": sum(s["emissions_kg"] for s in known) if known else None,
            "energy_method": method,
            "carbon_intensity_g_per_kwh": intensities[0] if len(intensities) == 1 else None,
            "carbon_source": known[-1]["carbon_source"] if len(intensities) == 1 else "mixed"}
