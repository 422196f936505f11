"""Batches for the training loop, pretraining and fine-tuning side by side.

Two endless, resumable streams (`state_dict()` / `load_state_dict()` continue with exactly the
batch that would have come next), and the fixed batches their evaluations use:

- `BatchStream`: fixed-length packed rows (`PackedDataset`) stacked into batches and run
  through a pretraining objective; `fixed_batches` for its validation set;
- `TaskBatches`: variable-length task features in length-grouped batches, each padded to its
  own longest example (`length_grouped_batches` + `collate`), reshuffled every epoch.

A task feature is a mapping made from one example by tokenizing it::

    {"input_ids": [...],              # required
     "token_type_ids": [...],         # sentence pairs (BERT segment ids)
     "labels": 3 | [...]}             # an int per sequence (classification), or a list:
                                      # one id per token (NER, -100 = ignored), the target
                                      # ids (seq2seq), or the input ids with the prompt
                                      # masked to -100 (causal generation)

For seq2seq the model builds its decoder inputs from ``labels`` (shifted right), and a
decoder-only model shifts ``labels`` itself, so ``collate`` only pads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lmkit.config import IGNORE_INDEX
from lmkit.data.packing import PackedDataset, pad_batch

Batch = dict[str, torch.Tensor]


# ---- fixed-length packed rows --------------------------------------------------------------------


def stack_rows(rows: list[Batch]) -> Batch:
    """Stack a list of equally shaped rows into a batch."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class BatchStream:
    """Endless batches of `batch_size` rows of `dataset` (this process's share), epoch after
    epoch (each reshuffled by the dataset's seed and the epoch number; an epoch's last
    incomplete batch is dropped), each turned into model inputs by `objective`.

    The stream is resumable: `state_dict()` holds the epoch, the rows consumed in it and the
    objective's random state; after `load_state_dict(...)` iteration continues with exactly
    the batch that would have come next. Batches are made when asked for (no prefetching),
    so the state always matches what the loop consumed."""

    def __init__(self, dataset: PackedDataset, batch_size: int,
                 objective: Callable[[Batch], Batch] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if dataset.rows_per_rank < batch_size:
            raise ValueError(
                f"the data gives {dataset.rows_per_rank} rows of {dataset.seq_len} tokens per "
                f"process, fewer than one batch of {batch_size}: use more data, a smaller "
                "batch_size or a shorter seq_len")
        self.dataset, self.batch_size, self.objective = dataset, batch_size, objective
        self.epoch, self.row = dataset.epoch, dataset.start_row

    def __iter__(self) -> Iterator[Batch]:
        ds, bs = self.dataset, self.batch_size
        while True:
            ds.set_epoch(self.epoch, 0)
            while self.row + bs <= len(ds):
                batch = stack_rows([ds[self.row + j] for j in range(bs)])
                self.row += bs
                yield self.objective(batch) if self.objective is not None else batch
            self.epoch, self.row = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "row": self.row}
        if hasattr(self.objective, "state_dict"):
            state["objective"] = self.objective.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, row = state["epoch"], state["row"]
        rows = self.dataset.rows_per_rank
        if not all(_is_count(v) for v in (epoch, row)) or row > rows:
            raise ValueError(f"data position epoch={epoch!r}, row={row!r} is outside this "
                             f"data ({rows} rows per epoch)")
        if "objective" in state and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])
        self.epoch, self.row = epoch, row


def fixed_batches(dataset: PackedDataset, batch_size: int,
                  objective: Callable[[Batch], Batch] | None = None,
                  limit: int | None = None) -> list[Batch]:
    """The dataset's rows in order as up to `limit` batches (the last may be smaller), with
    the objective applied once, so every evaluation sees the same inputs and labels."""
    dataset.set_epoch(dataset.epoch, 0)
    n = len(dataset)
    starts = list(range(0, n, batch_size))[:limit]
    out = []
    for s in starts:
        batch = stack_rows([dataset[i] for i in range(s, min(s + batch_size, n))])
        out.append(objective(batch) if objective is not None else batch)
    return out


# ---- variable-length task features ---------------------------------------------------------------
MEGA_BATCH = 50  # batches per sorted bucket: the padding / randomness trade-off


def length_grouped_batches(lengths: Sequence[int], batch_size: int | None = None, *,
                           max_tokens: int | None = None, shuffle: bool = True,
                           seed: int = 0, mega_batch: int = MEGA_BATCH) -> list[list[int]]:
    """Split example indices into batches of similar length.

    Give ``batch_size`` (examples per batch) or ``max_tokens`` (a budget for the padded
    batch, ``len(batch) * longest``; an example longer than the budget gets a batch of its
    own). With ``shuffle``, the indices are shuffled, cut into buckets of about
    ``mega_batch`` batches, sorted by length inside each bucket and batched, and the batches
    are shuffled: little padding, yet a random order that differs per ``seed`` (pass
    ``seed + epoch`` for a new order each epoch). Without ``shuffle`` (evaluation) all
    indices are sorted by length, the least padding possible; map the outputs back to the
    examples through the returned indices.
    """
    if (batch_size is None) == (max_tokens is None):
        raise ValueError("pass exactly one of batch_size and max_tokens")
    if (batch_size or max_tokens) < 1:
        raise ValueError(f"batch_size / max_tokens must be positive (got "
                         f"{batch_size or max_tokens})")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if shuffle:
        bucket = mega_batch * (batch_size or max(1, max_tokens // max(1, int(lengths.mean()))))
    else:
        bucket = max(len(lengths), 1)
    batches: list[list[int]] = []
    for lo in range(0, len(order), bucket):
        chunk = order[lo:lo + bucket]
        # stable sort: equal lengths keep their shuffled order
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(_cut(chunk, lengths, batch_size, max_tokens))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _cut(sorted_idx: np.ndarray, lengths: np.ndarray, batch_size: int | None,
         max_tokens: int | None) -> list[list[int]]:
    """Consecutive batches of length-sorted indices."""
    if batch_size is not None:
        return [sorted_idx[i:i + batch_size].tolist()
                for i in range(0, len(sorted_idx), batch_size)]
    batches, current, longest = [], [], 0
    for i in sorted_idx.tolist():
        longest_if_added = max(longest, int(lengths[i]))
        if current and (len(current) + 1) * longest_if_added > max_tokens:
            batches.append(current)
            current, longest_if_added = [], int(lengths[i])
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """The fraction of a batched epoch's positions that are padding (0 = none)."""
    real = padded = 0
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        real += sum(sizes)
        padded += len(sizes) * max(sizes, default=0)
    return 1.0 - real / padded if padded else 0.0


def collate(features: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad features (see the module docstring) into a batch of int64 tensors.

    Returns ``input_ids`` (B, T) padded with ``pad_id`` and ``attention_mask`` (1 = real),
    plus ``token_type_ids`` padded with 0 and ``labels`` when the features have them:
    integer labels as (B,), label lists as (B, L) padded with -100 (L is the longest label
    list, which may differ from T). Other keys are left out of the batch.
    """
    if not features:
        raise ValueError("collate got no features: pass at least one")
    batch = pad_batch([f["input_ids"] for f in features], pad_id)
    for key, pad in (("token_type_ids", 0), ("labels", IGNORE_INDEX)):
        present = [key in f for f in features]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"{sum(present)} of {len(features)} features have "
                             f"'{key}': give it to all or none")
        values = [f[key] for f in features]
        if key == "labels" and all(np.ndim(v) == 0 for v in values):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = pad_batch(values, pad)["input_ids"]
    return batch


class TaskBatches:
    """Endless, resumable length-grouped batches of features, padded per batch (never to a
    fixed maximum), reshuffled every epoch; under torchrun each process takes every
    world_size-th batch (pass `rank` and `world_size`)."""

    def __init__(self, features: list[dict], pad_id: int, batch_size: int | None,
                 max_tokens: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not features:
            raise ValueError("no training examples")
        self.features, self.pad_id, self.seed = features, pad_id, seed
        self.batch_size, self.max_tokens = (None, max_tokens) if max_tokens else (batch_size,
                                                                                  None)
        self.rank, self.world = rank, world_size
        self.epoch = self.index = 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        lengths = [len(f["input_ids"]) for f in self.features]
        batches = length_grouped_batches(lengths, self.batch_size, max_tokens=self.max_tokens,
                                         seed=self.seed + epoch)
        return batches[self.rank:len(batches) - len(batches) % self.world:self.world]

    def __len__(self) -> int:
        return len(self.epoch_batches(0))

    def __iter__(self):
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.index < len(batches):
                idx = batches[self.index]
                self.index += 1
                yield collate([self.features[i] for i in idx], self.pad_id)
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = state["epoch"], state["index"]
        if not all(_is_count(v) for v in (epoch, index)) or \
                index > len(self.epoch_batches(epoch)):
            raise ValueError(f"data position epoch={epoch!r}, index={index!r} is outside "
                             "this data")
        self.epoch, self.index = epoch, index


def _is_count(value: Any) -> bool:
    """A non-negative int (not a bool, not a string): what a saved data position holds."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
