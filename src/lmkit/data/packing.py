"""Batches from token streams: packed fixed-length rows, and padding of variable-length ones."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lmkit.data.corpus import TokenCache


class PackedDataset(Dataset):
    """The documents of a ``TokenCache`` packed back to back into rows of ``seq_len`` tokens.

    Row ``r`` of the epoch holds tokens ``[r * seq_len, (r + 1) * seq_len)`` of the stream of
    the cache's documents; the remainder shorter than a row is dropped. Each item is a dict:

    - ``input_ids`` (seq_len,) int64;
    - ``segment_ids`` (seq_len,) int64: the pieces of documents in the row numbered 1, 2, ...
      A document cut by a row boundary continues as segment 1 of the next row. (0 would be
      padding, which packed rows never have.)

    Order: rows are shuffled by ``(seed, epoch)`` when ``shuffle``. With ``world_size > 1``
    the epoch's order is cut to a multiple of ``world_size`` rows and rank ``k`` takes rows
    ``k, k + world_size, ...`` of it, so ranks are disjoint and all have the same length.
    ``start_row`` skips the first rows *of this rank's* sequence, so a run resumed after
    ``n`` rows per rank continues exactly where it stopped. Item ``i`` is the ``i``-th row
    after ``start_row``, so a ``DataLoader(ds, batch_size, shuffle=False)`` keeps this order
    with any number of workers. Tokens are read from the memmap only when a row is asked for.
    """

    def __init__(self, cache: TokenCache, seq_len: int, *, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, start_row: int = 0, rank: int = 0, world_size: int = 1):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (got {seq_len}): a row needs a token "
                             "and the next token to predict")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.cache, self.seq_len = cache, seq_len
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self._starts = cache.doc_starts
        # Position of each document in the packed stream (num_docs + 1 entries).
        self._stream = np.concatenate([[0], np.cumsum(cache.doc_lengths)]).astype(np.int64)
        self.num_rows = int(self._stream[-1]) // seq_len
        if self.num_rows < world_size:
            raise ValueError(f"the corpus has {self._stream[-1]} tokens, too few for one row of "
                             f"seq_len={seq_len} per rank ({world_size} ranks): use a smaller "
                             "seq_len or more data")
        self.rows_per_rank = self.num_rows // world_size
        self.set_epoch(epoch, start_row)

    def set_epoch(self, epoch: int, start_row: int = 0) -> None:
        """Reshuffle for ``epoch`` and start at row ``start_row`` of this rank's sequence."""
        if not 0 <= start_row <= self.rows_per_rank:
            raise ValueError(f"start_row={start_row} is outside this rank's "
                             f"{self.rows_per_rank} rows")
        self.epoch, self.start_row = epoch, start_row
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        used = self.rows_per_rank * self.world_size
        self._rows = order[:used][self.rank::self.world_size][start_row:]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        return self.row(int(self._rows[i]))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def row(self, r: int) -> dict[str, torch.Tensor]:
        """Row ``r`` of the packed stream (before shuffling)."""
        begin, end = r * self.seq_len, (r + 1) * self.seq_len
        first = int(np.searchsorted(self._stream, begin, side="right")) - 1
        last = int(np.searchsorted(self._stream, end, side="left"))  # exclusive
        ids = np.empty(self.seq_len, dtype=np.int64)
        segs = np.empty(self.seq_len, dtype=np.int64)
        for seg, d in enumerate(range(first, last), 1):
            lo, hi = max(begin, self._stream[d]), min(end, self._stream[d + 1])
            at = self._starts[d] - self._stream[d]  # stream position -> memmap position
            ids[lo - begin:hi - begin] = self.cache.tokens[at + lo:at + hi]
            segs[lo - begin:hi - begin] = seg
        return {"input_ids": torch.from_numpy(ids), "segment_ids": torch.from_numpy(segs)}


def pad_batch(seqs: Sequence[Sequence[int] | torch.Tensor], pad_id: int,
              side: str = "right") -> dict[str, torch.Tensor]:
    """Pad variable-length sequences into ``input_ids`` (B, T) int64 and ``attention_mask``
    (B, T) int64 (1 = real token). ``side="left"`` pads at the start (for generation)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left' (got '{side}')")
    if not seqs:
        raise ValueError("pad_batch got no sequences: pass at least one")
    rows = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in seqs]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(length - len(r), length)
        ids[i, span] = r
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}
