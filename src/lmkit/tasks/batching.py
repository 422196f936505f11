"""Variable-length batches for fine-tuning: group similar lengths, pad each batch to its own
longest example (never to a fixed maximum).

A feature is a mapping made from one example by tokenizing it::

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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lmkit.config import IGNORE_INDEX
from lmkit.data.packing import pad_batch

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
