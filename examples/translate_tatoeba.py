"""English -> French on Tatoeba with a small encoder-decoder trained from scratch.

1. hold out a random dev set (the file is sorted by length, so a tail would be unfair);
2. train one Unigram tokenizer on both languages;
3. build a small pre-norm Transformer (3 + 3 layers, hidden 256, sinusoidal positions, the
   2017 recipe shrunk) and save it as an untrained checkpoint with that tokenizer;
4. train it with the translation task (lmkit.finetune) and score BLEU / chrF with
   sacrebleu on beam-search output.

    python examples/translate_tatoeba.py [--data ../shared/data] [--steps 3000] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import lmkit
from lmkit.finetune import FinetuneConfig, finetune
from lmkit.tokenizer import Tokenizer


def split(fra: Path, out: Path, dev_size: int, seed: int = 0) -> tuple[Path, Path]:
    pairs = [line.split("\t")[:2] for line in fra.read_text(encoding="utf-8").splitlines()
             if line.count("\t") >= 1]
    random.Random(seed).shuffle(pairs)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("dev.tsv", pairs[:dev_size]), ("train.tsv", pairs[dev_size:])):
        (out / name).write_text("".join(f"{en}\t{fr}\n" for en, fr in rows), encoding="utf-8")
    (out / "text.txt").write_text("".join(f"{en}\n{fr}\n" for en, fr in pairs[dev_size:]),
                                  encoding="utf-8")
    return out / "train.tsv", out / "dev.tsv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("LMKIT_DATA", "../shared/data"))
    ap.add_argument("--out", default=f"runs/tatoeba/{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dev-size", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    out = Path(args.out)
    train, dev = split(Path(args.data) / "tatoeba-fra-eng" / "fra.txt", out / "data",
                       args.dev_size)
    tok = Tokenizer.train([out / "data" / "text.txt"], "unigram", args.vocab,
                          family="encoder-decoder")
    config = lmkit.preset("transformer-base", vocab_size=tok.vocab_size, hidden_size=256,
                          num_heads=4, encoder_layers=3, decoder_layers=3,
                          intermediate_size=1024, norm_position="pre", final_norm=True,
                          dropout=0.1, max_positions=256, pad_id=tok.pad_id,
                          bos_id=tok.bos_id, eos_id=tok.eos_id, decoder_start_id=tok.pad_id)
    lmkit.Model(config).save(out / "init", tokenizer=tok)
    result = finetune(out / "init", FinetuneConfig(
        task="translation", train=str(train), dev=str(dev), out=str(out / "model"),
        steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=300,
        schedule="cosine", weight_decay=0.01, beta2=0.98, precision="bf16", num_beams=4,
        max_new_tokens=64))
    print(f"\nTatoeba en->fr, {args.dev_size} held-out pairs: BLEU {result.metrics['bleu']:.1f}, "
          f"chrF {result.metrics['chrf']:.1f}; {result.total:,} parameters, {result.steps} "
          f"steps x {args.batch_size} pairs, {result.wall_time_s / 60:.1f} min, "
          f"{result.compute['flops']:.3g} training FLOPs")
    translate = lmkit.pipeline("translation", result.out_dir)
    for sentence in ["I am hungry.", "Where is the train station?", "She reads a book."]:
        print(f"  {sentence} => {translate(sentence)}")


if __name__ == "__main__":
    main()
