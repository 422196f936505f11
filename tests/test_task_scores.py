"""Task scores: hand-computed values, and the reference libraries where they exist."""

import math

import pytest
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import accuracy_score, f1_score

from lmkit.tasks import accuracy, bleu, chrf, entity_scores, macro_f1, rouge


def test_accuracy_by_hand_and_sklearn():
    preds, golds = [1, 0, 1, 1, 2], [1, 1, 1, 0, 2]
    assert accuracy(preds, golds) == {"accuracy": 60.0}
    assert accuracy(preds, golds)["accuracy"] == pytest.approx(100 * accuracy_score(golds, preds))


def test_macro_f1_by_hand_and_sklearn():
    preds = ["a", "a", "b", "c", "c"]
    golds = ["a", "b", "b", "c", "a"]
    # a: TP 1, 2 predicted, 2 gold -> 2*1/4; b: 1, 1, 2 -> 2/3; c: 1, 2, 1 -> 2/3
    by_hand = (1 / 2 + 2 / 3 + 2 / 3) / 3
    assert macro_f1(preds, golds)["macro_f1"] == pytest.approx(100 * by_hand)
    assert macro_f1(preds, golds)["macro_f1"] == pytest.approx(
        100 * f1_score(golds, preds, average="macro"))
    # a label that occurs nowhere scores 0 and still counts in the mean (as in sklearn)
    labels = ["a", "b", "c", "d"]
    assert macro_f1(preds, golds, labels)["macro_f1"] == pytest.approx(100 * by_hand * 3 / 4)
    assert macro_f1(preds, golds, labels)["macro_f1"] == pytest.approx(
        100 * f1_score(golds, preds, average="macro", labels=labels, zero_division=0))


def test_entity_scores_by_hand_and_seqeval():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    s = entity_scores(pred, gold)
    # gold entities PER, LOC, ORG; predicted PER, ORG (wrong type for LOC), ORG: 2 correct
    assert s["precision"] == pytest.approx(200 / 3)
    assert s["recall"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(100 * seqeval_f1(gold, pred))
    # per type: PER 1/1; LOC 0; ORG P = 1/2, R = 1/1 -> F1 = 2/3
    assert (s["f1/PER"], s["f1/LOC"]) == (100.0, 0.0)
    assert s["f1/ORG"] == pytest.approx(200 / 3)


def test_entity_scores_modes():
    gold, pred = [["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]]
    # conlleval reads an I-PER after O as the start of a PER entity: an exact match ...
    assert entity_scores(pred, gold)["f1"] == 100.0
    # ... strict IOB2 does not: no predicted entity at all
    assert entity_scores(pred, gold, strict=True)["f1"] == 0.0
    assert entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_bleu_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    # clipped n-gram precisions: 1-grams 5/6 (one "the" too many), 2-grams 3/5, 3-grams 2/4,
    # 4-grams 1/3; same length -> brevity penalty 1
    by_hand = 100 * math.exp(sum(map(math.log, [5 / 6, 3 / 5, 2 / 4, 1 / 3])) / 4)
    out = bleu([hyp], [ref])
    assert out["bleu"] == pytest.approx(by_hand, abs=1e-6)
    assert "tok:13a" in out["signature"] and "smooth:exp" in out["signature"]
    assert bleu([hyp, "a b c d"], [ref, "a b c d"])["bleu"] > out["bleu"]
    # several references: the exact one makes every n-gram match
    assert bleu([hyp], [[ref, hyp]])["bleu"] == pytest.approx(100.0)


def test_chrf_by_hand():
    # character n-grams (spaces removed), orders 1..6, beta = 2; orders with no n-gram in
    # the hypothesis do not count. 1: P 3/3 R 3/4; 2: P 2/2 R 2/3; 3: P 1/1 R 1/2
    p, r = 1.0, (3 / 4 + 2 / 3 + 1 / 2) / 3
    by_hand = 100 * 5 * p * r / (4 * p + r)
    out = chrf(["abc"], ["abcd"])
    assert out["chrf"] == pytest.approx(by_hand, abs=1e-6)
    assert out["signature"].startswith("nrefs:1") and "nc:6" in out["signature"]
    assert chrf(["abc d"], ["abc d"], word_order=2)["chrf"] == pytest.approx(100.0)


def test_rouge_by_hand_with_stemming():
    s = rouge(["the cat sat"], ["the cat ran"])
    # unigrams 2 of 3 each way; bigrams "the cat" 1 of 2; LCS "the cat" 2 of 3
    assert s == pytest.approx({"rouge1": 200 / 3, "rouge2": 50.0, "rougeL": 200 / 3})
    # the Porter stemmer makes cats/cat and running/runs the same words
    assert rouge(["cats running"], ["cat runs"]) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    # mean over examples; several references: the best one counts
    two = rouge(["the cat sat", "a dog"], [["the cat ran", "the cat sat"], "a dog"])
    assert two["rouge1"] == pytest.approx(100.0)


@pytest.mark.parametrize("metric", [accuracy, macro_f1, entity_scores, bleu, chrf, rouge])
def test_length_mismatch_is_an_error(metric):
    preds, golds = (["x"], ["x", "y"])
    if metric is entity_scores:
        preds, golds = [["O"]], [["O"], ["O"]]
    with pytest.raises(ValueError, match=r"1 (predictions|hypotheses) but 2"):
        metric(preds, golds)
    with pytest.raises(ValueError, match="at least one"):
        metric([], [])


def test_entity_scores_sentence_length_mismatch():
    with pytest.raises(ValueError, match="sentence 1 has 1 predicted tags but 2 gold"):
        entity_scores([["O"], ["O"]], [["O"], ["O", "B-PER"]])
