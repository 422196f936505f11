"""Pretraining step, lmkit vs transformers (issue 8 item 3): GPT-2-124M, batch 4 x 256,
forward + backward + AdamW, tokens/s and peak memory, side by side in one run.

Every measurement runs in a fresh process (so its peak RSS, VmHWM, is its own), lmkit and
transformers interleaved, and the median over the repeats is reported. lmkit trains as its
loop does: the loss without logits (model/loss.py), and once more with activation
checkpointing and `optimizer_in_backward` (each parameter's AdamW step runs in backward as
soon as its gradient is ready, which is then freed: "lmkit+ckpt+inbwd", the memory row);
transformers as its Trainer does by default:
`model(input_ids, labels=...)` then the loss. Both compute the same function: GPT-2's
dropout of 0.1 (embeddings, attention, residual branches; GPT2Config's defaults) and AdamW
with the fused kernel (the Trainer's default optimizer, adamw_torch_fused).

    .venv/bin/python benchmarks/pretrain_step.py [--repeats 3] [--steps 5] [--threads 2]
        [--precision fp32|bf16] [--quick] [--json rows.json]

--quick (1 repeat, 1 timed step) only checks that it runs. Prints the ratios against the
targets (speed >= 1.1x, peak memory <= 0.5) and the rows for `make bench` (table.py).

On GPU (--device cuda) the memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from table import emit, row

CHILD = r"""
import json, sys, time
import torch

which, steps, threads, precision, device, options = sys.argv[1:7]
steps, threads = int(steps), int(threads)
checkpointing, in_backward = "ckpt" in options, "inbwd" in options
torch.set_num_threads(threads)
torch.manual_seed(0)
device = torch.device(device)
if which == "lmkit":
    import lmkit
    model = lmkit.Model(lmkit.preset("gpt2", dropout=0.1, attention_dropout=0.1)).to(device)
    model.activation_checkpointing(checkpointing)
    def loss_of(ids):
        return model(ids, labels=ids, return_logits=False).loss
else:
    import transformers
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        attn_implementation="sdpa")).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    def loss_of(ids):
        return model(input_ids=ids, labels=ids).loss
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
if in_backward:
    from lmkit.train.optim import OptimizerInBackward
    OptimizerInBackward(opt)  # backward steps opt and frees each gradient
ids = torch.randint(0, 50257, (4, 256), device=device)
dtype = torch.bfloat16 if precision == "bf16" else torch.float32

def step():
    with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
        loss = loss_of(ids)
    loss.backward()
    if not in_backward:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

for _ in range(2):
    step()
sync()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
for _ in range(steps):
    loss = step()
sync()
seconds = time.perf_counter() - start
if device.type == "cuda":
    peak = torch.cuda.max_memory_allocated() / 2**20
else:
    peak = next(int(l.split()[1]) for l in open("/proc/self/status")
                if l.startswith("VmHWM:")) / 1024
print(json.dumps({"tokens_per_s": steps * ids.numel() / seconds, "peak_mb": peak,
                  "loss": float(loss)}))
"""


RUNS = {"lmkit": ("lmkit", "-"), "lmkit+ckpt+inbwd": ("lmkit", "ckpt+inbwd"),
        "transformers": ("hf", "-")}


def run(name: str, args: argparse.Namespace) -> dict:
    which, options = RUNS[name]
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(args.steps), str(args.threads),
                          args.precision, args.device, options],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="1 repeat of 1 step: a smoke check")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 1
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for which in results:
            results[which].append(run(which, args))
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_mb")}
           for w, rs in results.items()}
    ours, small, theirs = med["lmkit"], med["lmkit+ckpt+inbwd"], med["transformers"]
    print(f"GPT-2-124M, batch 4 x 256, {args.precision}, {args.device}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'':18}{'tokens/s':>10}{'peak MB':>10}")
    for name, m in med.items():
        print(f"{name:18}{m['tokens_per_s']:10.1f}{m['peak_mb']:10.0f}")
    work = f"GPT-2-124M train step 4x256 {args.precision} {args.device}"
    note = f"median of {args.repeats} interleaved runs, {args.steps} steps each"
    emit([row(f"{work}: speed", ours["tokens_per_s"], theirs["tokens_per_s"], "tokens/s", 1.1,
              note),
          row(f"{work}: peak memory (lmkit with activation_checkpointing and "
              "optimizer_in_backward; at most half)",
              small["peak_mb"], theirs["peak_mb"], "MB", 2.0, note, higher_is_better=False)],
         args.json)


if __name__ == "__main__":
    main()
