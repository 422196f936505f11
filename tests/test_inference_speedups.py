"""What makes `lmkit.pipeline("classification")` fast changes no prediction: batches cut at
length changes (unpadded ones run without a mask), inference mode, and the last block
computing only the pooled first position. Checked against transformers' own pipeline on the
same weights, and against lmkit's full forward pass."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import VARIANTS, tiny

import lmkit
from lmkit.tasks.task import inference_batches
from lmkit.tokenizer import Tokenizer

WORDS = ["the", "film", "was", "good", "bad", "long", "short", "fun", "dull", "and", "very",
         "quite", "not", "a", "story", "plot", "actor", "scene", "music", "ending"]


def _texts(n: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(k),), generator=g))
            for k in torch.randint(1, 12, (n,), generator=g)]


def test_inference_batches_cut_at_length_changes() -> None:
    lengths = [5, 3, 5, 5, 3, 7, 5, 3, 9, 5, 3]
    batches = inference_batches(lengths, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 4 for b in batches)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # length-sorted
    # a batch at least half full is cut where the length changes: no padding in those
    assert [[lengths[i] for i in b] for b in batches] == [[3, 3, 3, 3], [5, 5, 5, 5],
                                                          [5, 7], [9]]


def test_classification_pipeline_matches_transformers(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_texts(200)) + "\n")
    tok = Tokenizer.train([corpus], "wordpiece", 120, family="encoder")
    folder = tmp_path / "clf"
    config = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, id2label={0: "neg", 1: "pos"},
                           pad_token_id=tok.pad_id)
    tf.BertForSequenceClassification(config).eval().save_pretrained(folder)
    tok.save(folder)
    texts = _texts(23)  # several per length: unmasked batches and padded ones
    ours = lmkit.pipeline("classification", folder, dtype="fp32")(texts, batch_size=4)
    hf = tf.pipeline("text-classification", model=str(folder), device="cpu")
    theirs = hf(texts, top_k=None)
    for a, b in zip(ours, theirs, strict=True):
        want = {d["label"]: d["score"] for d in b}
        assert a["label"] == max(want, key=want.get)
        for label, score in want.items():
            assert a["scores"][label] == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("key", ["encoder-learned", "encoder-rotary-pre-rms"])
def test_pooled_only_gives_the_same_logits(key: str) -> None:
    preset, overrides = VARIANTS[key]
    model = tiny(preset, **overrides, head="classification",
                 label_names=["a", "b", "c"], pooling="first")
    ids = torch.randint(4, model.config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        first = model(ids, attention_mask=mask, pooled_only=True)
    torch.testing.assert_close(first.logits, full.logits, rtol=0, atol=1e-6)
    # the shortcut is taken where it is exact and only there (rotary keeps every position)
    assert first.hidden_states.shape[1] == (1 if key == "encoder-learned" else 9)
    assert model.first_only_pools == (key == "encoder-learned")
