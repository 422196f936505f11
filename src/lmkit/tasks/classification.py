"""Sentence and sentence-pair classification: one label per text (or text pair)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmkit.model import Model
from lmkit.tasks.formats import ClassificationExample, label_names, read_classification
from lmkit.tasks.scores import accuracy, macro_f1
from lmkit.tasks.task import Features, Task, TaskOptions, forward_batches


@dataclass
class ClassificationOptions(TaskOptions):
    text_column: str | None = None  # None: found from the header (see tasks.formats)
    pair_column: str | None = None
    label_column: str | None = None
    label_names: list[str] | None = None  # the classes in id order (None: sorted from data)


class ClassificationTask(Task):
    name, head = "classification", "classification"
    families = ("encoder", "decoder", "encoder-decoder")
    Options = ClassificationOptions
    reports_loss = True

    def read(self, path: str | Path, label_names: Sequence[str] | None = None,
             limit: int | None = None) -> list[ClassificationExample]:
        o = self.options
        return read_classification(path, text_column=o.text_column, pair_column=o.pair_column,
                                   label_column=o.label_column,
                                   label_names=label_names or o.label_names, limit=limit)

    def label_names(self, examples: list) -> list[str]:
        return list(self.options.label_names or label_names(examples))

    def encode(self, text: str, pair: str | None = None) -> Features:
        enc = self.tok.encode_with_offsets(text, pair)
        out: Features = {"input_ids": self.truncate(enc.ids)}
        if self.config.type_vocab_size:
            out["token_type_ids"] = self.truncate(enc.type_ids)
        return out

    def features(self, example: ClassificationExample) -> Features:
        label = self.config.label_names.index(example.label)
        return {**self.encode(example.text, example.text_pair), "labels": label}

    def _log_probs(self, model: Model, feats: list[Features], batch_size: int) -> list:
        out = [None] * len(feats)
        for i, logits in forward_batches(model, feats, batch_size):
            out[i] = logits.log_softmax(-1)
        return out

    def evaluate(self, model: Model, examples: list, batch_size: int = 32) -> dict[str, float]:
        """Accuracy, macro-F1 and the mean cross-entropy loss, from one pass over `examples`."""
        feats = [self.features(e) for e in examples]
        log_probs = torch.stack(self._log_probs(model, feats, batch_size))
        gold_ids = torch.tensor([f["labels"] for f in feats])
        loss = -log_probs.gather(1, gold_ids[:, None]).mean().item()
        names = model.config.label_names
        preds = [names[i] for i in log_probs.argmax(-1).tolist()]
        golds = [e.label for e in examples]
        return {**accuracy(preds, golds), **macro_f1(preds, golds, names), "loss": loss}

    def predict(self, model: Model, inputs: Sequence[Any], batch_size: int = 32) -> list[dict]:
        """Each input is a text or a (text, text_pair) tuple. Returns the best label, its
        probability and the probability of every label."""
        feats = [self.encode(*x) if isinstance(x, tuple) else self.encode(x) for x in inputs]
        names = model.config.label_names
        results = []
        for p in self._log_probs(model, feats, batch_size):
            p = p.exp()
            best = int(p.argmax())
            results.append({"label": names[best], "score": float(p[best]),
                            "scores": {n: float(v) for n, v in zip(names, p)}})
        return results
