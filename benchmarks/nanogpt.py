"""nanoGPT's CPU recipe, lmkit vs nanoGPT's own train.py, back to back on the same machine.

The recipe (nanoGPT README, "I only have a macbook"): character-level tinyshakespeare, 4
layers, 128 wide, 4 heads, block 64, batch 12, 2,000 iterations, dropout 0, lr 1e-3 with 100
warmup iterations and a cosine decay to 1e-4, AdamW betas (0.9, 0.99), weight decay 0.1,
gradient clipping 1.0, fp32, evaluation every 250 iterations. nanoGPT runs from a clone
outside this repository (`--nanogpt PATH`; no nanoGPT code is in lmkit), in a temporary copy
whose data folder is prepared by its own prepare.py from the shared tinyshakespeare (no
download). lmkit runs `lmkit pretrain --tokenizer char` with a model of the same shape (GPT-2
layout without biases, exact GELU, tied embeddings) on the same 90% / 10% split.

    .venv/bin/python benchmarks/nanogpt.py --nanogpt ../ext/nanoGPT [--data ../shared/data]
        [--iters 2000] [--repeats 1]

Each repeat runs nanoGPT (eager: its recipe's --compile=False), lmkit eager and lmkit with
`compile: true` back to back (interleaved; the medians over repeats are reported).
Reported: tokens/s of each (768 tokens per iteration / the median iteration time, so the
evaluations and the compilation do not count), the wall clock of each whole run (process
start to exit: evaluations, lmkit's tokenization and, with compile, the compilation at the
first step, from a cold inductor cache, included) and the validation loss each reached at
the last iteration (nanoGPT: 20 random validation batches, as its recipe says; lmkit: the
first 20 batches of the validation rows).
Differences that remain: lmkit separates blank-line-delimited documents with an EOS token
(nanoGPT predicts the blank line's newline instead) and, as usual, does not decay embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import emit, markdown, row  # noqa: E402

BLOCK, BATCH = 64, 12
TOKENS_PER_ITER = BLOCK * BATCH
RECIPE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
          f"--block_size={BLOCK}", f"--batch_size={BATCH}", "--n_layer=4", "--n_head=4",
          "--n_embd=128", "--dropout=0.0"]  # + --max_iters=N --lr_decay_iters=N
NEEDED = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
          "data/shakespeare_char/prepare.py")
LMKIT_CONFIG = """\
preset: gpt2
model: {{hidden_size: 128, num_heads: 4, decoder_layers: 4, intermediate_size: 512,
        max_positions: {block}, dropout: 0.0, attention_dropout: 0.0, activation: gelu,
        attention_bias: false, mlp_bias: false, norm_bias: false}}
data: [{train}]
valid_data: [{valid}]
tokenizer: char
seq_len: {block}
batch_size: {batch}
steps: {iters}
lr: 1.0e-3
warmup_steps: 100
schedule: cosine
min_lr_ratio: 0.1
weight_decay: 0.1
beta2: 0.99
grad_clip: 1.0
precision: fp32
device: cpu
compile: {compile}
eval_every: {eval_every}
valid_batches: 20
save_every: 0
log_every: 1
progress: false
tensorboard: false
plot: false
report_to: [none]
out: {out}
"""


def eval_every(iters: int) -> int:
    """The recipe's 250, or `iters` for a shorter run, so that the last iteration is
    evaluated (both evaluate at multiples of it, and at the end)."""
    return min(250, iters)


def missing(nanogpt: Path) -> list[str]:
    return [f for f in NEEDED if not (nanogpt / f).is_file()]


def prepare(nanogpt: Path, text: Path, work: Path) -> Path:
    """A copy of nanoGPT in `work` whose shakespeare_char data is prepared from `text`."""
    copy = work / "nanoGPT"
    shutil.copytree(nanogpt, copy, ignore=shutil.ignore_patterns(".git", "assets", "out*"))
    folder = copy / "data" / "shakespeare_char"
    shutil.copy(text, folder / "input.txt")  # prepare.py downloads only when it is missing
    subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, capture_output=True)
    return copy


def run_nanogpt(copy: Path, iters: int) -> dict:
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *RECIPE,
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--out_dir=out-bench",
           f"--eval_interval={eval_every(iters)}"]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=copy, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    times = [float(t) / 1000 for it, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms",
                                                     out) if int(it) > 0]
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out)
    return {"step_s": statistics.median(times), "valid_loss": float(evals[-1][2]),
            "wall_s": wall, "iters": iters}


def run_lmkit(text: Path, work: Path, iters: int, compile: bool = False) -> dict:
    data = text.read_text(encoding="utf-8")
    n = int(len(data) * 0.9)  # nanoGPT's split: the first 90% trains, the rest validates
    train, valid = work / "train.txt", work / "val.txt"
    train.write_text(data[:n], encoding="utf-8")
    valid.write_text(data[n:], encoding="utf-8")
    name = "lmkit-compiled" if compile else "lmkit-eager"
    out, config = work / name, work / f"{name}.yaml"
    shutil.rmtree(out, ignore_errors=True)  # an earlier repeat's run
    config.write_text(LMKIT_CONFIG.format(block=BLOCK, batch=BATCH, iters=iters, train=train,
                                          valid=valid, out=out, eval_every=eval_every(iters),
                                          compile=str(compile).lower()))
    cache = work / f"inductor-{time.monotonic_ns()}"  # cold: compilation timed in full
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmkit.cli", "pretrain", "--config", str(config)],
                   check=True, capture_output=True, text=True,
                   env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_at = [r["elapsed_s"] for r in records if r["split"] == "train"]
    valid_loss = [r["loss"] for r in records if r["split"] == "valid"][-1]
    times = [b - a for a, b in zip(train_at, train_at[1:])]
    return {"step_s": statistics.median(times), "valid_loss": valid_loss, "wall_s": wall,
            "iters": iters, "first_step_s": train_at[0]}


def medians(runs: list[dict]) -> dict:
    """The median of each figure over repeated runs."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def rows(quick: bool = False, data: str = "../shared/data", nanogpt: str | None = None,
         iters: int | None = None, repeats: int = 1) -> list[dict]:
    """tokens/s, whole-run and validation loss rows (2,000 iterations; 200 when quick)."""
    iters = iters or (200 if quick else 2000)
    work = f"nanoGPT CPU recipe (char tinyshakespeare, 4x128, block 64, batch 12, {iters} it)"
    path = Path(nanogpt) if nanogpt else None
    if path is None or missing(path):
        why = (f"nanoGPT not found at {path} (missing {', '.join(missing(path))})" if path
               else "no nanoGPT path given")
        return [row(work, None, None, "tokens/s", 1.3,
                    f"skipped: {why}; clone https://github.com/karpathy/nanoGPT outside the "
                    "repository and pass --nanogpt PATH")]
    text = Path(data) / "tinyshakespeare" / "input.txt"
    if not text.is_file():
        raise FileNotFoundError(f"{text} not found: pass --data (the shared data folder)")
    runs: dict[str, list[dict]] = {"nanoGPT": [], "eager": [], "compiled": []}
    with tempfile.TemporaryDirectory() as tmp:
        copy = prepare(path, text, Path(tmp))
        for _ in range(repeats):  # interleaved: load drift hits all three alike
            runs["nanoGPT"].append(run_nanogpt(copy, iters))
            runs["eager"].append(run_lmkit(text, Path(tmp), iters))
            runs["compiled"].append(run_lmkit(text, Path(tmp), iters, compile=True))
    theirs, eager, compiled = (medians(runs[k]) for k in ("nanoGPT", "eager", "compiled"))
    times = (f"whole runs: lmkit eager {eager['wall_s']:.0f} s, lmkit compile: true "
             f"{compiled['wall_s']:.0f} s (its first step, compiling from a cold cache: "
             f"{compiled['first_step_s']:.0f} s), nanoGPT train.py {theirs['wall_s']:.0f} s; "
             f"median of {repeats} interleaved repeat(s)")
    how = f"median iteration time (evaluations and compilation left out); {times}"
    loss_note = ("validation loss at the last iteration (nanoGPT: 20 random batches; lmkit: "
                 "20 fixed batches of the same last 10%; with compile: true "
                 f"{compiled['valid_loss']:.3f}); target: lmkit reaches nanoGPT's loss within "
                 "1% (the noise of a 20-batch estimate)")
    vs = "vs nanoGPT eager (its recipe's --compile=False)"
    return [row(f"{work}, lmkit eager", TOKENS_PER_ITER / eager["step_s"],
                TOKENS_PER_ITER / theirs["step_s"], "tokens/s", 1.3, how),
            row(f"{work}, lmkit compile: true {vs}", TOKENS_PER_ITER / compiled["step_s"],
                TOKENS_PER_ITER / theirs["step_s"], "tokens/s", 1.3, how),
            row(f"{work}: whole run, lmkit eager", eager["wall_s"], theirs["wall_s"], "s",
                None, times, higher_is_better=False),
            row(f"{work}: whole run incl. compilation, lmkit compile: true {vs}",
                compiled["wall_s"], theirs["wall_s"], "s", None, times, higher_is_better=False),
            row(f"{work}: validation loss", eager["valid_loss"], theirs["valid_loss"],
                "nats/char", 0.99, loss_note, higher_is_better=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", default="../ext/nanoGPT", help="a nanoGPT clone")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--iters", type=int, default=None, help="default 2000 (200 with --quick)")
    ap.add_argument("--quick", action="store_true", help="200 iterations: a smoke check")
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved runs of each (nanoGPT, lmkit eager, lmkit compiled)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    from table import machine

    found = rows(args.quick, args.data, args.nanogpt, args.iters, args.repeats)
    print(markdown(found, machine()))
    emit(found, args.json)


if __name__ == "__main__":
    main()
