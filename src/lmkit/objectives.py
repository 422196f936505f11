"""Pretraining objectives: transforms from a batch of token ids to the model's inputs.

An objective is data, not a model: it maps a batch ``{"input_ids", ["attention_mask"],
["segment_ids"]}`` (from ``PackedDataset`` or ``pad_batch``) to the keys the model's
forward takes:

- ``input_ids`` (B, T) int64; ``attention_mask`` (B, T) 1 = real, 0 = padding;
  ``segment_ids`` (B, T) 0 = padding, 1..n = documents packed in the row;
- ``labels`` (B, T) int64, ``-100`` = ignored. Causal LM labels are *not* shifted: the
  model shifts them, as Hugging Face models do;
- encoder-decoder objectives add ``labels`` (B, S) (the targets, not shifted),
  ``decoder_input_ids`` (B, S) (labels shifted right after ``decoder_start_id``) and
  ``decoder_attention_mask`` (B, S).

Random objectives draw from their own seeded ``torch.Generator`` (on the CPU), so the same
seed and batches give the same results; ``state_dict()`` saves it for an exact resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmkit.config import IGNORE_INDEX
from lmkit.data.packing import pad_batch

if TYPE_CHECKING:
    from lmkit.tokenizer import Tokenizer

Batch = dict[str, torch.Tensor]


def real_tokens(batch: Batch) -> torch.Tensor:
    """(B, T) bool: True at real tokens, from ``attention_mask``, else ``segment_ids > 0``."""
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    if "segment_ids" in batch:
        return batch["segment_ids"] > 0
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def _require(objective: str, **ids: int | None) -> None:
    """Raise if a token id an objective needs is missing (None)."""
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"{objective} needs {', '.join(missing)} but got None: use a "
                         "tokenizer that has these tokens, or pass the ids explicitly")


class Objective:
    """Base class: a callable ``batch -> model inputs`` with a seeded generator."""

    def __init__(self, seed: int | torch.Generator = 0):
        if isinstance(seed, torch.Generator):
            self.generator = seed
        else:
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)


class CausalLM(Objective):
    """Next-token prediction for decoder-only models.

    ``labels`` are the input ids, with ``-100`` at padding and at the first token of every
    packed segment but the first, so no document is predicted from the end of another.
    """

    def __call__(self, batch: Batch) -> Batch:
        ids = batch["input_ids"]
        labels = ids.masked_fill(~real_tokens(batch), IGNORE_INDEX)
        if "segment_ids" in batch:
            seg = batch["segment_ids"]
            labels[:, 1:].masked_fill_(seg[:, 1:] != seg[:, :-1], IGNORE_INDEX)
        return {**batch, "labels": labels}


class MaskedLM(Objective):
    """BERT masking: pick ``mask_prob`` of the tokens; of those, ``replace`` become the mask
    token, ``random`` a random non-special token, the rest stay. ``labels`` hold the original
    ids at picked positions and ``-100`` elsewhere. Special tokens and padding are never
    picked.

    With ``whole_word``, words are picked (each with ``mask_prob``) and all their tokens
    with them; ``word_starts[id]`` tells whether a token begins a word (see
    ``Tokenizer.word_starts``). A token after a special token or padding, or at a segment
    change, always begins a word.
    """

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Sequence[int] = (),
                 word_starts: Sequence[bool] | torch.Tensor | None = None,
                 mask_prob: float = 0.15, replace: float = 0.8, random: float = 0.1,
                 whole_word: bool = False, seed: int | torch.Generator = 0):
        super().__init__(seed)
        _require("MaskedLM", mask_id=mask_id)
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1] (got {mask_prob})")
        if replace < 0 or random < 0 or replace + random > 1.0:
            raise ValueError(f"replace={replace} and random={random} must be >= 0 and sum "
                             "to at most 1 (the rest of the picked tokens stay unchanged)")
        if whole_word and word_starts is None:
            raise ValueError("whole_word=True needs word_starts: use "
                             "MaskedLM.from_tokenizer(tok, whole_word=True)")
        if word_starts is not None and len(word_starts) != vocab_size:
            raise ValueError(f"word_starts has {len(word_starts)} entries for a vocabulary of "
                             f"{vocab_size}: give one flag per token id")
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.mask_prob, self.replace, self.random = mask_prob, replace, random
        self.whole_word = whole_word
        self.is_special = torch.zeros(vocab_size, dtype=torch.bool)
        self.is_special[list(special_ids)] = True
        self.normal_ids = torch.nonzero(~self.is_special).flatten()
        self.word_starts = None if word_starts is None else torch.as_tensor(word_starts,
                                                                            dtype=torch.bool)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, **kwargs) -> MaskedLM:
        """Mask id, vocabulary, special tokens and word starts taken from ``tokenizer``."""
        if tokenizer.mask_id is None:
            raise ValueError("the tokenizer has no mask token: train it with "
                             "family='encoder' (or 'encoder-decoder') for masked LM")
        if kwargs.get("whole_word"):
            kwargs.setdefault("word_starts", tokenizer.word_starts())
        return cls(tokenizer.mask_id, tokenizer.vocab_size, tokenizer.special_ids, **kwargs)

    def __call__(self, batch: Batch) -> Batch:
        ids = batch["input_ids"]
        cpu = ids.cpu()
        candidate = real_tokens(batch).cpu() & ~self.is_special[cpu]
        if self.whole_word:
            word = self._word_index(cpu, candidate, batch.get("segment_ids"))
            picked = (self._rand(*ids.shape) < self.mask_prob).gather(1, word)
        else:
            picked = self._rand(*ids.shape) < self.mask_prob
        picked &= candidate
        r = self._rand(*ids.shape)
        to_mask = picked & (r < self.replace)
        to_random = picked & (r >= self.replace) & (r < self.replace + self.random)
        random_ids = self.normal_ids[torch.randint(len(self.normal_ids), ids.shape,
                                                   generator=self.generator)]
        new = torch.where(to_mask, self.mask_id, torch.where(to_random, random_ids, cpu))
        labels = torch.where(picked, cpu, IGNORE_INDEX)
        return {**batch, "input_ids": new.to(ids.device), "labels": labels.to(ids.device)}

    def _word_index(self, ids: torch.Tensor, candidate: torch.Tensor,
                    segment_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, T) index of the word each token belongs to, counted from 0 in each row."""
        starts = self.word_starts[ids].clone()
        starts[:, 1:] |= ~candidate[:, :-1]
        if segment_ids is not None:
            seg = segment_ids.cpu()
            starts[:, 1:] |= seg[:, 1:] != seg[:, :-1]
        starts[:, 0] = True
        return starts.long().cumsum(1) - 1


class _Seq2Seq(Objective):
    """Shared by the denoising objectives: corrupt each row, pad inputs and targets."""

    def __init__(self, pad_id: int, decoder_start_id: int, seed: int | torch.Generator):
        super().__init__(seed)
        _require(type(self).__name__, pad_id=pad_id, decoder_start_id=decoder_start_id)
        self.pad_id, self.decoder_start_id = pad_id, decoder_start_id

    def corrupt(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder input, target) of one row's real tokens."""
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        """Each row's real tokens are one example: segment boundaries are not kept."""
        ids = batch["input_ids"]
        rows = [row[keep] for row, keep in zip(ids.cpu(), real_tokens(batch).cpu(), strict=True)]
        inputs, targets = zip(*map(self.corrupt, rows), strict=True)
        enc, dec = pad_batch(inputs, self.pad_id), pad_batch(targets, self.pad_id)
        start = torch.full((len(rows), 1), self.decoder_start_id, dtype=torch.int64)
        out = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": dec["input_ids"].masked_fill(dec["attention_mask"] == 0, IGNORE_INDEX),
            "decoder_input_ids": torch.cat([start, dec["input_ids"][:, :-1]], 1),
            "decoder_attention_mask": dec["attention_mask"],
        }
        return {k: v.to(ids.device) for k, v in out.items()}


def replace_runs(tokens: torch.Tensor, mask: torch.Tensor,
                 fill: torch.Tensor | int) -> torch.Tensor:
    """Replace each run of ``mask``-ed tokens by one token: ``fill[k]`` for the k-th run
    (or ``fill`` itself for every run when it is an int)."""
    run_start = mask & ~_shift_right(mask)
    if isinstance(fill, int):
        values = torch.full_like(tokens, fill)
    else:
        values = fill[(run_start.long().cumsum(0) - 1).clamp(min=0)]
    return torch.where(run_start, values, tokens)[~mask | run_start]


class SpanCorruption(_Seq2Seq):
    """T5 span corruption.

    In each row ``noise_density`` of the tokens, in spans of mean length
    ``mean_span_length``, are corrupted: the input has span k replaced by sentinel k and
    ends with eos; the target is ``<s_0> span_0 <s_1> span_1 ... eos``. As in T5 (which
    concatenates documents before corrupting), a packed row is one example: spans may cross
    document boundaries, and the output has ``attention_mask`` but no ``segment_ids``. The
    span layout follows T5's ``random_spans_noise_mask``: the row starts with kept tokens,
    kept and noise spans alternate, and each has at least one token.
    """

    def __init__(self, sentinel_ids: Sequence[int], eos_id: int, pad_id: int,
                 decoder_start_id: int, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, seed: int | torch.Generator = 0):
        super().__init__(pad_id, decoder_start_id, seed)
        _require("SpanCorruption", eos_id=eos_id)
        if not sentinel_ids:
            raise ValueError("span corruption needs sentinel ids: use a tokenizer trained "
                             "with family='encoder-decoder' (<extra_id_0>...)")
        if not 0.0 < noise_density < 1.0 or mean_span_length < 1.0:
            raise ValueError(f"need 0 < noise_density < 1 and mean_span_length >= 1 (got "
                             f"{noise_density}, {mean_span_length})")
        self.sentinels = torch.as_tensor(list(sentinel_ids), dtype=torch.int64)
        self.eos = torch.tensor([eos_id])
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, **kwargs) -> SpanCorruption:
        """Sentinels, eos and pad from ``tokenizer``; decoder start = pad, as in T5."""
        kwargs.setdefault("decoder_start_id", tokenizer.pad_id)
        return cls(tokenizer.sentinel_ids, tokenizer.eos_id, tokenizer.pad_id, **kwargs)

    def noise_mask(self, length: int) -> torch.Tensor:
        """(length,) bool, True at corrupted tokens."""
        if length < 2:
            return torch.zeros(length, dtype=torch.bool)
        num_noise = min(max(round(length * self.noise_density), 1), length - 1)
        num_spans = max(round(num_noise / self.mean_span_length), 1)
        num_spans = min(num_spans, num_noise, length - num_noise, len(self.sentinels))
        noise = self._segment(num_noise, num_spans)
        kept = self._segment(length - num_noise, num_spans)
        lengths = torch.stack([kept, noise], 1).flatten()
        return torch.tensor([False, True]).repeat(num_spans).repeat_interleave(lengths)

    def _segment(self, n: int, k: int) -> torch.Tensor:
        """Random lengths >= 1 of ``k`` parts that sum to ``n``."""
        cuts = torch.randperm(n - 1, generator=self.generator)[:k - 1].sort().values + 1
        return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))

    def corrupt(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = self.noise_mask(len(tokens))
        inputs = replace_runs(tokens, noise, self.sentinels)
        targets = replace_runs(tokens, ~noise, self.sentinels)
        return torch.cat([inputs, self.eos]), torch.cat([targets, self.eos])


class TextInfilling(_Seq2Seq):
    """BART text infilling.

    Spans with Poisson(``poisson_lambda``) lengths covering about ``mask_prob`` of each row
    are each replaced by a single mask token; a span of length 0 inserts a mask. Adjacent
    or overlapping spans merge into one mask. The target is the original row. As for
    ``SpanCorruption``, a packed row is one example. (BART's sentence permutation is not
    done.)
    """

    def __init__(self, mask_id: int, pad_id: int, decoder_start_id: int,
                 mask_prob: float = 0.3, poisson_lambda: float = 3.0,
                 seed: int | torch.Generator = 0):
        super().__init__(pad_id, decoder_start_id, seed)
        _require("TextInfilling", mask_id=mask_id)
        if not 0.0 <= mask_prob < 1.0 or poisson_lambda <= 0:
            raise ValueError(f"need 0 <= mask_prob < 1 and poisson_lambda > 0 (got "
                             f"{mask_prob}, {poisson_lambda})")
        self.mask_id, self.mask_prob, self.poisson_lambda = mask_id, mask_prob, poisson_lambda

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, **kwargs) -> TextInfilling:
        """Mask and pad from ``tokenizer``; decoder start = eos, as in BART."""
        kwargs.setdefault("decoder_start_id", tokenizer.eos_id)
        return cls(tokenizer.mask_id, tokenizer.pad_id, **kwargs)

    def spans(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(starts, lengths) of the spans to mask in a row of ``length`` tokens."""
        budget = round(length * self.mask_prob)
        lengths = torch.zeros(0, dtype=torch.int64)
        while int(lengths.sum()) < budget:  # draw Poisson lengths until they cover the budget
            rates = torch.full((budget,), self.poisson_lambda)
            lengths = torch.cat([lengths, torch.poisson(rates, self.generator).long()])
        if budget:  # cut at the first length whose running sum reaches the budget
            last = int(torch.searchsorted(lengths.cumsum(0), torch.tensor(budget)))
            lengths = lengths[:last + 1]
            lengths[-1] -= int(lengths.sum()) - budget
        lengths = lengths[:length]
        starts = torch.randperm(length, generator=self.generator)[:len(lengths)]
        return starts, lengths

    def corrupt(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return infill(tokens, *self.spans(len(tokens)), self.mask_id), tokens


def infill(tokens: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
           mask_id: int) -> torch.Tensor:
    """``tokens`` with each span ``[start, start + length)`` replaced by one ``mask_id``;
    a 0-length span inserts ``mask_id`` before ``start``; touching spans merge."""
    n, cover = len(tokens), lengths > 0
    ones = torch.ones_like(starts[cover])
    edges = torch.zeros(n + 1, dtype=torch.int64)
    edges.index_add_(0, starts[cover], ones)
    edges.index_add_(0, (starts + lengths)[cover].clamp(max=n), -ones)
    masked = edges[:n].cumsum(0) > 0
    after_mask = _shift_right(masked)
    insert = torch.zeros(n, dtype=torch.bool)
    insert[starts[~cover]] = True
    insert &= ~(masked | after_mask)  # a mask is already there
    keep = ~masked | ~after_mask  # a token, or the first token of a masked run
    # Two slots per position, [inserted mask, token or run mask], read in order.
    slots = torch.stack([torch.full_like(tokens, mask_id), tokens.masked_fill(masked, mask_id)], 1)
    return slots[torch.stack([insert, keep], 1)]


def _shift_right(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` moved one step right along its last dim, False coming in."""
    return torch.nn.functional.pad(mask[..., :-1], (1, 0), value=False)
