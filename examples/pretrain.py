"""Run one of the pretraining examples through the Python API and print its figures.

    python examples/pretrain.py examples/pretrain/decoder-shakespeare.yaml [key=value ...]

The same run from the command line:

    LMKIT_DATA=../shared/data lmkit pretrain --config examples/pretrain/decoder-shakespeare.yaml

Data is read from $LMKIT_DATA (default ../shared/data). A run stopped with Ctrl-C continues
with `lmkit pretrain --resume runs/<name>` (or `lmkit.train.resume("runs/<name>")`).
"""

import json
import math
import os
import sys

from lmkit.train import load_config, parse_set, pretrain, read_metrics


def summary(out) -> str:
    records = read_metrics(out)
    valid = [r for r in records if r["split"] == "valid"]
    compute = json.loads((out / "compute.json").read_text())
    lines = [f"run: {out}",
             f"parameters: {compute['parameters']:,} "
             f"({compute['non_embedding_parameters']:,} without embeddings)"]
    if valid:
        first, last = valid[0], valid[-1]
        lines.append(f"validation loss: {first['loss']:.3f} (step {first['step']}) -> "
                     f"{last['loss']:.3f} (step {last['step']}); perplexity "
                     f"{math.exp(first['loss']):.1f} -> {math.exp(last['loss']):.1f}")
        lines.append("validation curve: " + ", ".join(f"{r['step']}: {r['loss']:.3f}"
                                                      for r in valid))
    lines.append(f"tokens: {compute['tokens']:,}; training FLOPs: {compute['flops']:.3g}; "
                 f"wall time: {compute['wall_time_s']:.0f} s; "
                 f"{compute['tokens_per_s']:,.0f} tokens/s on {compute['device']}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    os.environ.setdefault("LMKIT_DATA", os.path.join("..", "shared", "data"))
    cfg = load_config(sys.argv[1], parse_set(sys.argv[2:]))
    print(summary(pretrain(cfg)))
