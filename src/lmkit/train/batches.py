"""Batches for the training loop: an endless, resumable stream over packed rows, run through
an objective, and a fixed list of evaluation batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from lmkit.data.packing import PackedDataset

Batch = dict[str, torch.Tensor]


def collate(rows: list[Batch]) -> Batch:
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
                batch = collate([ds[self.row + j] for j in range(bs)])
                self.row += bs
                yield self.objective(batch) if self.objective is not None else batch
            self.epoch, self.row = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "row": self.row}
        if hasattr(self.objective, "state_dict"):
            state["objective"] = self.objective.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
        if "objective" in state and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])


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
        batch = collate([dataset[i] for i in range(s, min(s + batch_size, n))])
        out.append(objective(batch) if objective is not None else batch)
    return out
