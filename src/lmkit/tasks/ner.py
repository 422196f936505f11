"""Token classification (named-entity recognition): BIO tags per word, trained on the
first subword of each word, answered as entity spans with character offsets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lmkit.model import Model
from lmkit.tasks.alignment import (
    align_labels,
    align_predictions,
    encode_words,
    split_words,
    tags_to_spans,
)
from lmkit.tasks.formats import TokenClassificationExample, label_names, read_token_classification
from lmkit.tasks.scores import entity_scores
from lmkit.tasks.task import Features, Task, forward_batches


class NERTask(Task):
    name, head = "ner", "token-classification"
    families = ("encoder", "decoder", "encoder-decoder")

    def read(self, path: str | Path, label_names: Sequence[str] | None = None,
             limit: int | None = None) -> list[TokenClassificationExample]:
        return read_token_classification(path, label_names=label_names, limit=limit)

    def label_names(self, examples: list) -> list[str]:
        return label_names(examples)

    def _encode(self, words: Sequence[str]) -> tuple[Features, list[int | None]]:
        enc = encode_words(self.tok, words)
        ids, word_ids = self.truncate(enc.ids), enc.word_ids
        if len(ids) < len(enc.ids):
            word_ids = word_ids[:len(ids) - 1] + word_ids[-1:]
        return {"input_ids": ids}, word_ids

    def features(self, example: TokenClassificationExample) -> Features:
        feats, word_ids = self._encode(example.tokens)
        l2i = {name: i for i, name in enumerate(self.config.label_names)}
        return {**feats, "labels": align_labels(example.tags, word_ids, l2i)}

    def _tag(self, model: Model, sentences: list[Sequence[str]], batch_size: int
             ) -> list[tuple[list[str], list[float]]]:
        """Word tags and the probability of each word's tag, per sentence."""
        encoded = [self._encode(words) for words in sentences]
        out: list = [None] * len(encoded)
        for i, logits in forward_batches(model, [f for f, _ in encoded], batch_size):
            probs, ids = logits.softmax(-1).max(-1)
            word_ids = encoded[i][1]
            tags = align_predictions(ids.tolist(), word_ids, model.config.label_names,
                                     num_words=len(sentences[i]))
            first = {}
            for pos, w in enumerate(word_ids):
                first.setdefault(w, float(probs[pos]))
            out[i] = (tags, [first.get(w, 0.0) for w in range(len(sentences[i]))])
        return out

    def evaluate(self, model: Model, examples: list, batch_size: int = 32) -> dict[str, float]:
        tagged = self._tag(model, [e.tokens for e in examples], batch_size)
        return entity_scores([t for t, _ in tagged], [e.tags for e in examples])

    @torch.no_grad()
    def predict(self, model: Model, inputs: Sequence[str], batch_size: int = 32) -> list:
        """Entities of each raw text: [{"type", "start", "end", "text", "score"}, ...] with
        character offsets into the text and the mean tag probability of their words."""
        spans_per_text = [split_words(self.tok, text) for text in inputs]
        words = [[text[s:e] for s, e in spans] for text, spans in zip(inputs, spans_per_text)]
        results = []
        for text, spans, ws, (tags, probs) in zip(inputs, spans_per_text, words,
                                                  self._tag(model, words, batch_size)):
            entities = []
            for span in tags_to_spans(ws, tags, spans, text):
                covered = [p for (s, e), p in zip(spans, probs) if s >= span.start
                           and e <= span.end]
                entities.append({"type": span.type, "start": span.start, "end": span.end,
                                 "text": span.text, "score": sum(covered) / len(covered)})
            results.append(entities)
        return results
