"""A small encoder-decoder trained from scratch on real data: Tatoeba English -> French
(translation, BLEU / chrF) or DialogSum (summarization, ROUGE).

1. the data: Tatoeba gets a random held-out dev set (its file is sorted by length, so a
   tail would be unfair); DialogSum has its own dev file;
2. one Unigram tokenizer trained on both sides of the training pairs;
3. a small pre-norm Transformer (the 2017 recipe shrunk: hidden 256, 3 + 3 layers,
   sinusoidal positions), saved as an untrained checkpoint with that tokenizer;
4. training with the task (lmkit.finetune: length-grouped batches, bf16 where the hardware
   has it natively, else fp32) and scoring on beam-search output with sacrebleu / rouge-score.

    python examples/seq2seq_from_scratch.py tatoeba [--data ../shared/data] [--steps 3000]
    python examples/seq2seq_from_scratch.py dialogsum [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import lmkit
from lmkit.finetune import FinetuneConfig, finetune
from lmkit.tokenizer import Tokenizer

# Per data set: task, training settings, and sentences to show at the end.
RECIPES = {
    "tatoeba": dict(task="translation", steps=3000, batch_size=64, max_length=256,
                    max_new_tokens=64, dev_limit=None,
                    show=["I am hungry.", "Where is the train station?", "She reads a book."]),
    "dialogsum": dict(task="summarization", steps=1500, batch_size=16, max_length=512,
                      max_new_tokens=80, dev_limit=250, show=[]),
}


def tatoeba(data: Path, out: Path, dev_size: int = 1000, seed: int = 0) -> tuple[Path, Path,
                                                                               list[str]]:
    lines = (data / "tatoeba-fra-eng" / "fra.txt").read_text(encoding="utf-8").splitlines()
    pairs = [line.split("\t")[:2] for line in lines if "\t" in line]
    random.Random(seed).shuffle(pairs)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("dev.tsv", pairs[:dev_size]), ("train.tsv", pairs[dev_size:])):
        (out / name).write_text("".join(f"{en}\t{fr}\n" for en, fr in rows), encoding="utf-8")
    return out / "train.tsv", out / "dev.tsv", [t for pair in pairs[dev_size:] for t in pair]


def dialogsum(data: Path, out: Path) -> tuple[Path, Path, list[str]]:
    train = data / "dialogsum" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines() if line]
    return train, data / "dialogsum" / "dev.jsonl", [r[k] for r in rows
                                                     for k in ("dialogue", "summary")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=sorted(RECIPES))
    ap.add_argument("--data", default=os.environ.get("LMKIT_DATA", "../shared/data"))
    ap.add_argument("--out", help="default: runs/<dataset>/<date-time>")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--dev-limit", type=int, help="score only the first N dev examples")
    args = ap.parse_args()
    recipe = RECIPES[args.dataset]
    out = Path(args.out or f"runs/{args.dataset}/{time.strftime('%Y%m%d-%H%M%S')}")
    read = tatoeba if args.dataset == "tatoeba" else dialogsum
    train, dev, texts = read(Path(args.data), out / "data")
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / "text.txt").write_text("\n".join(t.replace("\n", " ") for t in texts),
                                           encoding="utf-8")
    tok = Tokenizer.train([out / "data" / "text.txt"], "unigram", args.vocab,
                          family="encoder-decoder")
    config = lmkit.preset("transformer-base", vocab_size=tok.vocab_size, hidden_size=256,
                          num_heads=4, encoder_layers=3, decoder_layers=3,
                          intermediate_size=1024, norm_position="pre", final_norm=True,
                          dropout=0.1, max_positions=max(256, recipe["max_length"]),
                          pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                          decoder_start_id=tok.pad_id)
    lmkit.Model(config).save(out / "init", tokenizer=tok)
    steps = args.steps or recipe["steps"]
    result = finetune(out / "init", FinetuneConfig(
        task=recipe["task"], train=str(train), dev=str(dev), out=str(out / "model"),
        steps=steps, batch_size=recipe["batch_size"], lr=1e-3, warmup_steps=300,
        schedule="cosine", weight_decay=0.01, beta2=0.98, precision="auto", num_beams=4,
        max_length=recipe["max_length"], max_new_tokens=recipe["max_new_tokens"],
        dev_limit=args.dev_limit or recipe["dev_limit"]))
    scores = ", ".join(f"{k} {v:.1f}" for k, v in result.metrics.items())
    print(f"\n{args.dataset} ({recipe['task']}), dev: {scores}; {result.total:,} parameters, "
          f"{result.steps} steps x {recipe['batch_size']}, {result.wall_time_s / 60:.1f} min, "
          f"{result.compute['flops']:.3g} training FLOPs")
    run = lmkit.pipeline(recipe["task"], result.out_dir)
    for text in recipe["show"]:
        print(f"  {text} => {run(text)}")


if __name__ == "__main__":
    main()
