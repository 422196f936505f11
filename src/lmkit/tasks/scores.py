"""Task scores (the metrics a task is judged by) as pure functions: predictions and
references in, a plain dict out. Not to be confused with `lmkit.train.metrics`, the run
records (loss curves, compute) of training.

Every score is a percentage on a 0-100 scale (accuracy, F1, precision, recall, BLEU, chrF,
ROUGE), the scale papers and leaderboards report. Corpus metrics come from the reference
libraries, never re-implemented: entity scores from ``seqeval``, BLEU and chrF from
``sacrebleu`` (with its signature string, so a score can be reproduced), ROUGE from
``rouge-score``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from lmkit.errors import require

# sacrebleu, seqeval and rouge-score come with the `metrics` extra and are imported where
# used (seqeval and rouge-score add about a second to an import).


def _check_pairs(preds: Sequence, golds: Sequence, what: str = "references") -> None:
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} predictions but {len(golds)} {what}: "
                         "pass exactly one prediction per example")
    if not preds:
        raise ValueError("no predictions to score: pass at least one example")


def accuracy(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> dict[str, float]:
    """``{"accuracy": percent of predictions equal to their gold label}``."""
    _check_pairs(preds, golds, "gold labels")
    correct = sum(p == g for p, g in zip(preds, golds))
    return {"accuracy": 100.0 * correct / len(golds)}


def macro_f1(preds: Sequence[Hashable], golds: Sequence[Hashable],
             label_names: Sequence[Hashable] | None = None) -> dict[str, float]:
    """``{"macro_f1": unweighted mean over labels of each label's F1}`` (percent).

    ``label_names`` defaults to every label seen in ``preds`` or ``golds``. A label with no
    true positive scores F1 = 0, including one listed in ``label_names`` that occurs nowhere (the
    convention of scikit-learn's ``f1_score(average="macro")``).
    """
    _check_pairs(preds, golds, "gold labels")
    if label_names is None:
        label_names = sorted(set(preds) | set(golds), key=str)
    if not label_names:
        raise ValueError("macro_f1 needs at least one label")
    tp = Counter(p for p, g in zip(preds, golds) if p == g)
    predicted, gold = Counter(preds), Counter(golds)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (#predicted + #gold): no 0/0 when TP > 0.
    f1s = [2 * tp[x] / (predicted[x] + gold[x]) if tp[x] else 0.0 for x in label_names]
    return {"macro_f1": 100.0 * sum(f1s) / len(f1s)}


def entity_scores(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]],
                  strict: bool = False) -> dict[str, float]:
    """Entity-level (micro) precision, recall and F1 of BIO-tagged sentences, in percent.

    An entity counts only when its type and its exact span match. By default entities are
    read as the CoNLL ``conlleval`` script reads them (seqeval's default mode: an ``I-X``
    after ``O`` or after another type starts an entity); ``strict=True`` reads them as
    strict IOB2 (such an ``I-X`` is no entity). Also returns ``"f1/TYPE"`` per entity type.
    """
    _check_pairs(pred_tags, gold_tags, "gold sentences")
    for i, (p, g) in enumerate(zip(pred_tags, gold_tags)):
        if len(p) != len(g):
            raise ValueError(f"sentence {i} has {len(p)} predicted tags but {len(g)} gold "
                             "tags: predict one tag per word")
    classification_report = require("seqeval.metrics", "metrics",
                                    "entity F1").classification_report
    IOB2 = require("seqeval.scheme", "metrics", "entity F1").IOB2

    mode = dict(mode="strict", scheme=IOB2) if strict else {}
    with warnings.catch_warnings():
        # seqeval averages over an empty list of types when there are no entities at all
        # (a harmless numpy warning); the micro scores used here are well defined then.
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report([list(g) for g in gold_tags],
                                       [list(p) for p in pred_tags],
                                       output_dict=True, zero_division=0, **mode)
    micro = report["micro avg"]
    scores = {"precision": 100.0 * float(micro["precision"]),
              "recall": 100.0 * float(micro["recall"]),
              "f1": 100.0 * float(micro["f1-score"])}
    for name, row in report.items():
        if not name.endswith(" avg"):
            scores[f"f1/{name}"] = 100.0 * float(row["f1-score"])
    return scores


def _reference_streams(refs: Sequence[str | Sequence[str]], n: int) -> list[list[str]]:
    """One reference (a string) or several (a list) per hypothesis -> sacrebleu's streams."""
    if len(refs) != n:
        raise ValueError(f"got {n} hypotheses but {len(refs)} references: pass one "
                         "reference (or one list of references) per hypothesis")
    rows = [[r] if isinstance(r, str) else list(r) for r in refs]
    counts = {len(r) for r in rows}
    if len(counts) != 1 or 0 in counts:
        raise ValueError("every hypothesis needs the same number (at least one) of "
                         f"references; got counts {sorted(counts)}")
    return [list(stream) for stream in zip(*rows)]


def bleu(hyps: Sequence[str], refs: Sequence[str | Sequence[str]],
         tokenize: str = "13a") -> dict[str, float | str]:
    """Corpus BLEU (sacrebleu's defaults, 0-100): ``{"bleu": score, "signature": ...}``.

    ``refs`` holds one reference string per hypothesis, or one list of references per
    hypothesis (the same number for each). ``tokenize`` is sacrebleu's tokenizer: "13a"
    (default, WMT), "intl", "zh", "ja-mecab", "char", "flores200", "none".
    """
    sacrebleu = require("sacrebleu", "metrics", "BLEU")
    return _corpus_score("bleu", sacrebleu.metrics.BLEU(tokenize=tokenize), hyps, refs)


def chrf(hyps: Sequence[str], refs: Sequence[str | Sequence[str]],
         word_order: int = 0) -> dict[str, float | str]:
    """Corpus chrF (0-100): ``{"chrf": score, "signature": ...}``; ``word_order=2`` is
    chrF++. ``refs`` as in :func:`bleu`."""
    sacrebleu = require("sacrebleu", "metrics", "chrF")
    return _corpus_score("chrf", sacrebleu.metrics.CHRF(word_order=word_order), hyps, refs)


def _corpus_score(name: str, metric: Any, hyps: Sequence[str],
                  refs: Sequence[str | Sequence[str]]) -> dict[str, float | str]:
    """A sacrebleu corpus metric and its signature (what to quote beside the number)."""
    if not hyps:
        raise ValueError("no hypotheses to score: pass at least one")
    score = metric.corpus_score(list(hyps), _reference_streams(refs, len(hyps)))
    return {name: float(score.score), "signature": str(metric.get_signature())}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures over examples (percent), Porter
    stemmer on, as summarization papers report them.

    With several references for an example, its best-matching one counts. Note that
    ``rouge-score``'s tokenizer keeps only ASCII letters and digits: text in other scripts
    scores 0 unless it is transliterated or tokenized first.
    """
    if not hyps:
        raise ValueError("no hypotheses to score: pass at least one")
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} references: pass one "
                         "reference (or one list of references) per hypothesis")
    rouge_scorer = require("rouge_score.rouge_scorer", "metrics", "ROUGE")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hyps, refs):
        # rouge-score takes (target, prediction): the order matters for precision/recall.
        if isinstance(ref, str):
            scores = scorer.score(ref, hyp)
        else:
            scores = scorer.score_multi(list(ref), hyp)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(hyps) for name, total in totals.items()}
