"""NER on subword models: words <-> subwords <-> character spans.

:func:`encode_words` encodes pre-split words, :func:`align_labels` puts each word's label on
its first subword, :func:`align_predictions` reads word tags back from subword predictions,
:func:`split_words` finds the words of raw text and :func:`tags_to_spans` turns word tags
into entity spans with character offsets.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmkit.config import IGNORE_INDEX
from lmkit.tokenizer import Encoding, Tokenizer


@dataclass
class Span:
    """An entity: its type, character offsets ``[start, end)`` and text."""

    type: str
    start: int
    end: int
    text: str


def encode_words(tokenizer: Tokenizer, words: Sequence[str],
                 add_special_tokens: bool = True) -> Encoding:
    """Encode pre-split words (a CoNLL sentence) so that ``word_ids`` number THESE words.

    The words are joined with single spaces and encoded; each subword is assigned to the
    word its character offsets fall in (a zero-width or whitespace token, such as a lone
    ``Ġ`` or ``▁``, to the word that follows). The tokenizer's own word splitting (which
    may cut "U.S." into four words) is ignored, so labels stay one per given word.
    """
    starts, ends, at = [], [], 0
    for w in words:
        starts.append(at)
        ends.append(at + len(w))
        at += len(w) + 1
    enc = tokenizer.encode_with_offsets(" ".join(words), add_special_tokens=add_special_tokens)
    word_ids: list[int | None] = []
    for (start, _), special in zip(enc.offsets, enc.special_tokens_mask):
        w = bisect_right(ends, start)  # the first word ending after the token starts
        word_ids.append(None if special or w >= len(words) else w)
    return dataclasses.replace(enc, word_ids=word_ids)


def split_words(tokenizer: Tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the words of raw ``text`` as the tokenizer's
    pre-tokenizer splits it (whitespace trimmed, empty words dropped). For NER on raw text:
    ``words = [text[s:e] for s, e in spans]``, then :func:`encode_words`."""
    enc = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    spans: dict[int, tuple[int, int]] = {}
    for w, (s, e) in zip(enc.word_ids, enc.offsets):
        if w is not None:
            lo, hi = spans.get(w, (s, e))
            spans[w] = (min(lo, s), max(hi, e))
    out = []
    for s, e in (spans[w] for w in sorted(spans)):
        word = text[s:e]
        s += len(word) - len(word.lstrip())
        e -= len(word) - len(word.rstrip())
        if e > s:
            out.append((s, e))
    return out


def align_labels(word_tags: Sequence[str], word_ids: Sequence[int | None],
                 label_to_id: Mapping[str, int]) -> list[int]:
    """Per-subword label ids: a word's label on its first subword; -100 (ignored by the
    loss) on its other subwords and on special tokens."""
    out, labelled = [], set()
    for w in word_ids:
        if w is None or w in labelled:
            out.append(IGNORE_INDEX)
        else:
            labelled.add(w)
            if w >= len(word_tags):
                raise ValueError(f"word id {w} but only {len(word_tags)} tags: pass the "
                                 "word_ids of an encoding of these words (encode_words)")
            tag = word_tags[w]
            if tag not in label_to_id:
                raise ValueError(f"tag {tag!r} is not in the label set "
                                 f"({', '.join(label_to_id)})")
            out.append(label_to_id[tag])
    return out


def align_predictions(pred_ids: Sequence[int], word_ids: Sequence[int | None],
                      id_to_label: Sequence[str], num_words: int | None = None) -> list[str]:
    """Word tags from per-subword predicted ids: each word takes its first subword's
    prediction (the position trained by :func:`align_labels`). Words with no subword
    (cut off by truncation) get ``O``; ``num_words`` defaults to the last word id + 1."""
    if len(pred_ids) < len(word_ids):
        raise ValueError(f"{len(pred_ids)} predictions for {len(word_ids)} subwords")
    if num_words is None:
        num_words = max((w for w in word_ids if w is not None), default=-1) + 1
    tags: list[str | None] = [None] * num_words
    for w, p in zip(word_ids, pred_ids):
        if w is not None and w < num_words and tags[w] is None:
            tags[w] = id_to_label[int(p)]
    return [t if t is not None else "O" for t in tags]


def tags_to_spans(words: Sequence[str], tags: Sequence[str],
                  word_char_offsets: Sequence[tuple[int, int]],
                  text: str | None = None) -> list[Span]:
    """Entities of BIO-tagged words, with character offsets: an entity runs from its first
    word's start to its last word's end. Entities are decoded as :func:`~lmkit.tasks.
    scores.entity_scores` decodes them (seqeval, conlleval rules). The span text is
    ``text[start:end]`` when the raw ``text`` is given, else its words joined by spaces."""
    if not len(words) == len(tags) == len(word_char_offsets):
        raise ValueError(f"{len(words)} words, {len(tags)} tags and "
                         f"{len(word_char_offsets)} offsets: pass one of each per word")
    from seqeval.metrics.sequence_labeling import get_entities  # lazy: imports scikit-learn

    spans = []
    for kind, first, last in get_entities(list(tags)):
        start, end = word_char_offsets[first][0], word_char_offsets[last][1]
        surface = text[start:end] if text is not None else " ".join(words[first:last + 1])
        spans.append(Span(kind, start, end, surface))
    return spans
