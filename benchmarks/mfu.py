"""Training throughput and MFU (model FLOPs utilisation) in fp32 and bf16.

MFU = achieved training FLOP/s / peak FLOP/s, where

- achieved = tokens/s x flops_per_token(config, seq_len) (6 x non-embedding parameters + the
  LM head + attention, per token, forward and backward), timed over the steps of the real
  training loop (`lmkit.train.train`: AdamW, clipping, token-normalised loss) after warm-up;
- peak = the best FLOP/s of a large square torch.matmul of the same dtype, measured in the
  same run on the same device (so it is this machine's practical peak, not a data sheet's).

    python benchmarks/mfu.py                       # the example decoder (5M parameters)
    python benchmarks/mfu.py --config examples/pretrain/decoder-shakespeare.yaml --steps 20

The model is the one of the example config (its preset + model overrides) with the
vocabulary the example's tokenizer has (8000); the data are random token ids (throughput does
not depend on them). On a shared machine other processes lower both numbers: the load average
is printed with the results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import lmkit
from lmkit.flops import flops_per_token, num_parameters
from lmkit.objectives import CausalLM
from lmkit.train import TrainConfig, load_config, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import emit, row  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n: int, repeats: int, device: torch.device) -> float:
    """Best FLOP/s of an n x n @ n x n matmul."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def train_throughput(config: lmkit.ModelConfig, precision: str, batch_size: int, seq_len: int,
                     steps: int, warmup: int, device: str) -> float:
    """Median tokens/s of training steps after `warmup` steps."""
    torch.manual_seed(0)
    model = lmkit.Model(config)
    rows = CausalLM()({"input_ids": torch.randint(5, config.vocab_size, (batch_size, seq_len))})
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, record: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    cfg = TrainConfig(steps=warmup + steps, batch_size=batch_size, precision=precision,
                      eval_every=0, save_every=0, progress=False, tensorboard=False, plot=False,
                      device=device)
    with tempfile.TemporaryDirectory() as out:
        train(model, itertools.repeat(rows), cfg, out, on_step=on_step)
    timed = sorted(times[warmup:])
    return batch_size * seq_len / timed[len(timed) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/pretrain/decoder-shakespeare.yaml")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--quick", action="store_true", help="3 steps, 1 warm-up: a smoke check")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.matmul_repeats = 3, 1, 3

    os.environ.setdefault("LMKIT_DATA", "../shared/data")
    ex = load_config(args.config)
    config = lmkit.preset(ex.preset, **{**ex.model, "vocab_size": args.vocab_size})
    batch_size, seq_len = args.batch_size or ex.batch_size, args.seq_len or ex.seq_len
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    fpt = flops_per_token(config, seq_len)
    print(f"model: {ex.preset} + {ex.model}, vocab {args.vocab_size}: "
          f"{num_parameters(config):,} parameters ({num_parameters(config, False):,} "
          f"without embeddings); {fpt / 1e6:.1f} MFLOP per training token at seq_len "
          f"{seq_len}; batch {batch_size} x {seq_len}")
    print(f"device: {device} ({torch.get_num_threads()} threads); load average before: "
          f"{os.getloadavg()[0]:.2f}")
    results = []
    for precision, dtype in DTYPES.items():
        peak = matmul_peak(dtype, args.matmul_size, args.matmul_repeats, device)
        tps = train_throughput(config, precision, batch_size, seq_len, args.steps, args.warmup,
                               str(device))
        achieved = tps * fpt
        results.append({"precision": precision, "tokens_per_s": tps,
                        "achieved_flops_per_s": achieved, "matmul_peak_flops_per_s": peak,
                        "mfu": achieved / peak})
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print("| precision | tokens/s | achieved GFLOP/s | matmul peak GFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['precision']} | {r['tokens_per_s']:,.0f} | "
              f"{r['achieved_flops_per_s'] / 1e9:.1f} | {r['matmul_peak_flops_per_s'] / 1e9:.1f}"
              f" | {100 * r['mfu']:.1f}% |")
    emit([row(f"training MFU, {ex.preset} example decoder, {r['precision']}",
              r["achieved_flops_per_s"] / 1e9, r["matmul_peak_flops_per_s"] / 1e9, "GFLOP/s",
              None, f"reference: this machine's best {args.matmul_size}^2 matmul; ratio = MFU; "
              f"{r['tokens_per_s']:,.0f} tokens/s") for r in results])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "parameters": num_parameters(config),
                       "flops_per_token": fpt, "batch_size": batch_size, "seq_len": seq_len,
                       "device": str(device), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
