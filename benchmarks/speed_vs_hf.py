"""lmkit vs Hugging Face transformers: training-step and inference throughput on the same
architecture, same machine, same run. Runs are interleaved and the median of several repeats
is reported, because this machine is noisy.

    python benchmarks/speed_vs_hf.py [--repeats 7] [--threads 2] [--quick] [--json rows.json]

Ends with the rows for `make bench` (table.py): milliseconds per call, informative (the
issue's targets are on GPT-2-124M: pretrain_step.py and generate.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import lmkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import emit, row  # noqa: E402

# (name, lmkit preset + overrides, HF config class + kwargs, HF model class)
CASES = {
    "bert (6x384, MiniLM size)": (
        lmkit.preset("bert-base", hidden_size=384, num_heads=12, encoder_layers=6,
                     intermediate_size=1536, head="none"),
        transformers.BertConfig(hidden_size=384, num_attention_heads=12, num_hidden_layers=6,
                                intermediate_size=1536, attn_implementation="sdpa"),
        transformers.BertModel),
    "gpt2 (6x512)": (
        lmkit.preset("gpt2", hidden_size=512, num_heads=8, decoder_layers=6,
                     intermediate_size=2048),
        transformers.GPT2Config(n_embd=512, n_head=8, n_layer=6, attn_implementation="sdpa"),
        transformers.GPT2LMHeadModel),
    "llama (6x512, GQA)": (
        lmkit.preset("llama-small", hidden_size=512, num_heads=8, num_kv_heads=2,
                     decoder_layers=6, intermediate_size=1408),
        transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                                 num_hidden_layers=6, intermediate_size=1408, vocab_size=32000,
                                 attn_implementation="sdpa"),
        transformers.LlamaForCausalLM),
}


def timed(fn, warmup: int = 2, reps: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def train_step(model, batch, hf: bool):
    def step():
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None:  # a bare encoder: any scalar of its output exercises the backward pass
            loss = (out.last_hidden_state if hf else out.hidden_states).pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="1 repeat: a smoke check")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    rows = []
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, batch {args.batch} x {args.seq} tokens, fp32")
    print(f"{'model':28} {'work':10} {'lmkit ms':>9} {'HF ms':>9} {'HF/lmkit':>9}")
    for name, (cfg, hf_cfg, hf_cls) in CASES.items():
        ours, theirs = lmkit.Model(cfg), hf_cls(hf_cfg)
        ids = torch.randint(5, 1000, (args.batch, args.seq))
        lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,))
        mask = (torch.arange(args.seq)[None] < lengths[:, None]).long()
        is_lm = cfg.head == "lm"
        batch = {"input_ids": ids, "attention_mask": mask} | ({"labels": ids} if is_lm else {})
        work = {
            "train": (train_step(ours, batch, False), train_step(theirs, batch, True)),
            "infer": (lambda m=ours, b=batch: torch.no_grad()(m)(**b),
                      lambda m=theirs, b=batch: torch.no_grad()(m)(**b)),
        }
        for kind, (f_ours, f_hf) in work.items():
            ours.train(kind == "train")
            theirs.train(kind == "train")
            ours_t, hf_t = [], []
            for _ in range(args.repeats):  # interleave so drift hits both alike
                ours_t.append(timed(f_ours))
                hf_t.append(timed(f_hf))
            a, b = statistics.median(ours_t), statistics.median(hf_t)
            print(f"{name:28} {kind:10} {a * 1e3:9.1f} {b * 1e3:9.1f} {b / a:9.2f}x")
            rows.append(row(f"{name} {kind} step, {args.batch} x {args.seq}, fp32", a * 1e3,
                            b * 1e3, "ms", None, f"random weights, median of {args.repeats} "
                            "interleaved repeats", higher_is_better=False))
    emit(rows, args.json)


if __name__ == "__main__":
    main()
