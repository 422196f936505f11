"""The model card (README.md) of a fine-tuned folder: what it was trained for, from what, on
which data, with which scores and compute, and how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def model_card(out: Path, checkpoint: str | Path, cfg: Any, task: str, metrics: dict,
               counts: dict, n_train: int, compute: dict[str, Any], wall: float) -> str:
    """Markdown with a YAML header (library, task, base model) for the run folder `out`;
    `cfg` is the run's FinetuneConfig."""
    scores = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
    return f"""---
library: lmkit
task: {task}
base_model: {checkpoint if not cfg.from_scratch else "none (trained from scratch)"}
---
# {out.name}

Fine-tuned by lmkit for **{task}** from `{checkpoint}` ({cfg.scheme} scheme,
{counts['trainable']:,} of {counts['total']:,} parameters trained).

- training data: `{cfg.train}` ({n_train:,} examples)
- dev data: `{cfg.dev}`: {scores or "not scored"}
- compute: {compute.get('flops', 0):.3g} training FLOPs, {compute.get('tokens', 0):,} tokens,
  {wall:.0f} s wall time on {compute.get('device', '?')} ({compute.get('precision', '?')})

Load it with `lmkit.load("{out}")` or `lmkit.pipeline("{task}", "{out}")`.
"""
