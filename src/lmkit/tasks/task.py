"""What every fine-tuning task shares: the interface, truncation, and batched inference.

A task turns examples into model features (`features`), scores a model on examples with its
metric (`evaluate`) and answers raw inputs (`predict`). It knows its head and which model
families can do it; the runner (lmkit.finetune) and the pipelines only talk to this
interface."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lmkit.config import HEADS
from lmkit.data.batches import collate
from lmkit.model import Model, eval_mode

Features = dict[str, Any]


@dataclass
class TaskOptions:
    """Options every task takes; a task with more subclasses this (its `Options`). They are
    stored in a fine-tuned folder's task.json, so evaluate / predict reuse them."""

    max_length: int | None = None  # truncate inputs (None: the model's max positions)


class Task:
    """Base class. Subclasses set `name`, `head`, `families`, `Options` and implement the
    methods."""

    name = ""
    head = "lm"
    families: tuple[str, ...] = ()
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    # evaluate() also reports the dev loss (from the same forward passes), so fine-tuning
    # needs no second pass over the dev set for it
    reports_loss = False

    @property
    def labelled(self) -> bool:
        """The head has a fixed label set, read from the training data."""
        return HEADS[self.head].needs_label_names

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Options)]

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> TaskOptions:
        """The task's typed options from a mapping; an unknown name is an error."""
        unknown = sorted(set(values) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of the {cls.name} task; "
                             f"its options are {cls.option_names()}")
        return cls.Options(**values)

    def __init__(self, tokenizer: Any, config: Any, **options: Any):
        if config.family not in self.families:
            raise ValueError(
                f"the {self.name} task needs a {' or '.join(self.families)} model, but this "
                f"checkpoint is {config.family!r}: pick a checkpoint of a suitable family")
        if tokenizer is None:
            raise ValueError(f"the {self.name} task needs the checkpoint's tokenizer "
                             "(tokenizer.json), and this checkpoint has none")
        self.tok, self.config = tokenizer, config
        self.options = self.parse_options(options)
        self.max_length = min(self.options.max_length or config.max_positions,
                              config.max_positions)

    # ---- to be implemented --------------------------------------------------------------
    def read(self, path: str | Path, label_names: Sequence[str] | None = None,
             limit: int | None = None) -> list:
        raise NotImplementedError

    def label_names(self, examples: list) -> list[str]:
        return []

    def features(self, example: Any) -> Features:
        raise NotImplementedError

    def evaluate(self, model: Model, examples: list, batch_size: int = 32) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, model: Model, inputs: Sequence[Any], batch_size: int = 32) -> list:
        raise NotImplementedError

    # ---- shared helpers ---------------------------------------------------------------------
    def truncate(self, ids: list[int], keep_last: bool = True) -> list[int]:
        """Cut to max_length, keeping the closing special token (EOS / [SEP]) if there is one."""
        if len(ids) <= self.max_length:
            return ids
        return ids[:self.max_length - 1] + ids[-1:] if keep_last else ids[:self.max_length]


def inference_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in length-sorted batches of at most `batch_size`, cut where the length
    changes once a batch is half full: most batches hold texts of one length (no padding,
    so no attention mask), and the rest pad little."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        current = batches[-1] if batches else None
        if current is None or len(current) >= batch_size or (
                lengths[i] != lengths[current[-1]] and 2 * len(current) >= batch_size):
            batches.append([i])
        else:
            current.append(i)
    return batches


@torch.inference_mode()
def forward_batches(model: Model, features: Sequence[Features], batch_size: int = 32
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, logits of that example without padding) for every feature, computed in
    length-sorted batches (`inference_batches`) so that inference wastes almost nothing on
    padding; a batch without padding runs without an attention mask."""
    pad = model.config.fill_id()
    device = next(model.parameters()).device
    with eval_mode(model):
        lengths = [len(f["input_ids"]) for f in features]
        for idx in inference_batches(lengths, batch_size):
            batch = collate([{k: v for k, v in features[i].items() if k != "labels"}
                             for i in idx], pad)
            if len({lengths[i] for i in idx}) == 1:
                del batch["attention_mask"]  # all real tokens: SDPA's unmasked kernel
            logits = model(**{k: v.to(device) for k, v in batch.items()},
                           pooled_only=True).logits.float()
            for row, i in enumerate(idx):
                yield i, logits[row, :lengths[i]] if logits.dim() == 3 else logits[row]
