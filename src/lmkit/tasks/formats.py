"""Task data formats: sources -> lists of examples.

Readers (all stream their source row by row through :func:`lmkit.sources.records`, so any
source works where records do: TSV / CSV / JSONL, Parquet, Arrow, a datasets folder or cached
name, a glob; they stop after ``limit`` examples, and raise :class:`DataError` naming the file
and line (or row) of any bad input):

- :func:`read_classification`: a table with a header row, or records; a text (and
  optionally a second text) and a label per row;
- :func:`read_token_classification`: CoNLL files (one ``token ... TAG`` per line, blank
  lines between sentences) or records with token and tag lists;
- :func:`read_seq2seq`: TSV ``source<TAB>target`` (translation) or records (summarization);
- :func:`read_generation`: records of prompt / completion pairs.

Labels are strings (integers become their decimal strings; ``datasets`` class labels their
names); :func:`label_names` gives the sorted label list whose positions are the label ids.
Passing a list as ``label_names`` makes any other label an error, and an integer label that
is not in it the name at that position (``--label-names negative,positive`` for 0/1 data).

NER tags are aligned with subwords and character spans in :mod:`lmkit.tasks.alignment`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkit import sources
from lmkit.errors import DataError
from lmkit.sources import Row
from lmkit.textfiles import PathLike, read_lines

TAG = re.compile(r"O|[BI]-\S+")

# Column names tried, in order, when the caller names none (GLUE, SNLI, SST, IMDb, ...).
TEXT_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"),
                ("question1", "question2"), ("question", "sentence"), ("text", "text_pair"),
                ("sentence", None), ("text", None), ("content", None), ("review", None))
LABEL_COLUMNS = ("label", "gold_label", "labels")
TOKEN_FIELDS = ("tokens", "words")
TAG_FIELDS = ("tags", "ner_tags", "labels")
SEQ2SEQ_FIELDS = (("source", "target"), ("src", "tgt"), ("dialogue", "summary"),
                  ("document", "summary"), ("article", "highlights"), ("input", "output"))


@dataclass
class ClassificationExample:
    """A text (or a pair of texts) and its label."""

    text: str
    label: str
    text_pair: str | None = None


@dataclass
class TokenClassificationExample:
    """A sentence as words, one BIO tag per word."""

    tokens: list[str]
    tags: list[str]


@dataclass
class Seq2SeqExample:
    """A source text and its target (a translation, a summary)."""

    source: str
    target: str


@dataclass
class GenerationExample:
    """A prompt and the completion a causal model should learn to write after it."""

    prompt: str
    completion: str


# ---- reading lines and rows ------------------------------------------------------------------


def _field(record: Row, key: str | int, path: PathLike, number: int) -> Any:
    """``record[key]``; in JSON a dotted key walks nested objects ("translation.fr")."""
    if isinstance(record, list):
        if not isinstance(key, int):
            raise DataError(path, number, f"column {key!r} named but the file has no "
                            "header: pass header=True or a column number")
        if key >= len(record):
            raise DataError(path, number, f"no column {key}: the row has {len(record)}")
        return record[key]
    value: Any = record
    for part in str(key).split(".") if key not in record else [key]:
        if not isinstance(value, dict) or part not in value:
            raise DataError(path, number, f"no field {key!r} (fields: "
                            f"{', '.join(map(str, record))})")
        value = value[part]
    return value


def _text(record: Row, key: str | int, path: PathLike, number: int) -> str:
    value = _field(record, key, path, number)
    if not isinstance(value, str):
        raise DataError(path, number, f"field {key!r} is a {type(value).__name__}, "
                        "expected a string")
    return value


def _detect(names: Iterable[str], candidates: Sequence, what: str, path: PathLike,
            number: int, hint: str) -> Any:
    names = list(names)
    for cand in candidates:
        wanted = [c for c in (cand if isinstance(cand, tuple) else (cand,)) if c]
        if all(c in names for c in wanted):
            return cand
    raise DataError(path, number, f"cannot tell which column holds the {what} "
                    f"(columns: {', '.join(names)}): pass {hint}")


def _check_label(label: str, known: Sequence[str] | None, path: PathLike, number: int) -> str:
    """`label` if it is known; an integer label is the name at that position when the known
    labels are names (0/1 data read with label names negative, positive)."""
    if known is None or label in known:
        return label
    if re.fullmatch(r"\d+", label) and int(label) < len(known) and not any(
            re.fullmatch(r"-?\d+", k) for k in known):
        return known[int(label)]
    raise DataError(path, number, f"label {label!r} was not seen in the training data or "
                    f"the label names (known labels: {', '.join(known)}): fix the data, or "
                    "give label names (--label-names) that include it")


def _label(value: Any, path: PathLike, number: int) -> str:
    """A label as a string: strings as they are (stripped), integers in decimal."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(path, number, f"label {value!r} is a {type(value).__name__}: "
                        "labels must be strings or integers (regression is not a "
                        "classification task)")
    label = str(value).strip()
    if not label:
        raise DataError(path, number, "empty label")
    return label


def _limited(items: Iterator, limit: int | None) -> list:
    out = []
    for item in items:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out


# ---- classification ----------------------------------------------------------------------


def read_classification(path: PathLike, *, text_column: str | int | None = None,
                        pair_column: str | int | None = None,
                        label_column: str | int | None = None, format: str | None = None,
                        header: bool = True, label_names: Sequence[str] | None = None,
                        limit: int | None = None) -> list[ClassificationExample]:
    """Read a sentence(-pair) classification file.

    ``format`` ("tsv", "csv", "jsonl") defaults to the file's extension. The first row of
    a TSV / CSV names the columns (``header=False``: columns are numbers). Unnamed columns
    are found among the usual names: sentence1+sentence2, premise+hypothesis,
    question1+question2, question+sentence, text(+text_pair), sentence, text; and label,
    gold_label, labels. ``label_names`` (from :func:`label_names` on the training data) makes
    an unseen label an error.
    """
    rows = sources.records(path, format, header)

    def examples() -> Iterator[ClassificationExample]:
        nonlocal text_column, pair_column, label_column
        for path, number, row in rows:
            if text_column is None and isinstance(row, dict):
                text_column, pair_column = _detect(
                    row, TEXT_COLUMNS, "text", path, number, "text_column= (and "
                    "pair_column= for pairs)")
            if label_column is None and isinstance(row, dict):
                label_column = _detect(row, LABEL_COLUMNS, "label", path, number,
                                       "label_column=")
            if text_column is None or label_column is None:
                raise DataError(path, number, "a file without a header needs "
                                "text_column= and label_column= (column numbers)")
            label = _label(_field(row, label_column, path, number), path, number)
            yield ClassificationExample(
                text=_text(row, text_column, path, number),
                label=_check_label(label, label_names, path, number),
                text_pair=None if pair_column is None else _text(row, pair_column, path,
                                                                 number))

    return _limited(examples(), limit)


def label_names(examples: Iterable[ClassificationExample | TokenClassificationExample]
                ) -> list[str]:
    """The sorted, stable list of labels (the position of a label is its id).

    Classification labels sort as numbers when they all are integers ("2" before "10"),
    else as strings. Tags sort ``O`` first, then by entity type, ``B-`` before ``I-``.
    """
    seen: set[str] = set()
    tagging = False
    for ex in examples:
        if isinstance(ex, TokenClassificationExample):
            tagging = True
            seen.update(ex.tags)
        else:
            seen.add(ex.label)
    if tagging:
        return sorted(seen, key=lambda t: (t != "O", t[2:], t[:2]))
    if all(re.fullmatch(r"-?\d+", s) for s in seen):
        return sorted(seen, key=int)
    return sorted(seen)


# ---- token classification ------------------------------------------------------------------


def read_token_classification(path: PathLike, *, format: str | None = None,
                              tokens_field: str | None = None, tags_field: str | None = None,
                              tag_names: Sequence[str] | None = None,
                              label_names: Sequence[str] | None = None,
                              limit: int | None = None) -> list[TokenClassificationExample]:
    """Read NER / tagging data: CoNLL (default) or JSONL (``.jsonl``, ``format="jsonl"``).

    CoNLL: one ``token [other columns ...] TAG`` per line, whitespace-separated, the tag
    in the last column (so CoNLL-2003's ``token POS chunk NER`` works as is); a blank line
    ends a sentence; ``-DOCSTART-`` lines are skipped. JSONL: a list of tokens
    (``tokens``/``words``) and a list of tags (``tags``/``ner_tags``/``labels``) per line;
    integer tags (as in Hugging Face datasets) need ``tag_names``. Every tag must be
    ``O``, ``B-TYPE`` or ``I-TYPE``. ``label_names`` makes a tag unseen in training an
    error.
    """
    if format is None:
        format = "conll" if sources.kind(path) in ("text", "tsv", "csv") else "records"
    if format == "conll":
        sentences = ((str(path), *s) for s in _conll(Path(path)))
    elif format in ("jsonl", "records"):
        sentences = _tagged_records(path, tokens_field, tags_field, tag_names)
    else:
        raise DataError(path, None, f"unknown format {format!r}: use 'conll' or 'jsonl'")

    def examples() -> Iterator[TokenClassificationExample]:
        for path, tokens, tags, numbers in sentences:
            for tag, number in zip(tags, numbers):
                if not TAG.fullmatch(tag):
                    raise DataError(path, number, f"tag {tag!r} is not O, B-TYPE or "
                                    "I-TYPE (BIO tagging)")
                _check_label(tag, label_names, path, number)
            yield TokenClassificationExample(tokens, tags)

    return _limited(examples(), limit)


def _conll(path: Path) -> Iterator[tuple[list[str], list[str], list[int]]]:
    tokens: list[str] = []
    tags: list[str] = []
    numbers: list[int] = []
    columns = None  # every token line has as many columns as the first
    for number, line in read_lines(path):
        parts = line.split()
        if parts and parts[0] == "-DOCSTART-":
            continue
        if not parts:
            if tokens:
                yield tokens, tags, numbers
            tokens, tags, numbers = [], [], []
            continue
        if len(parts) < 2:
            raise DataError(path, number, f"one column ({line.strip()!r}): expected "
                        "'token TAG' or 'token ... TAG' separated by whitespace")
        columns = columns or (len(parts), number)
        if len(parts) != columns[0]:
            raise DataError(path, number, f"{len(parts)} columns ({line.strip()!r}) but line "
                            f"{columns[1]} has {columns[0]}: every token line needs the same "
                            "columns, the tag last")
        tokens.append(parts[0])
        tags.append(parts[-1])
        numbers.append(number)
    if tokens:
        yield tokens, tags, numbers


def _tagged_records(source: PathLike, tokens_field: str | None, tags_field: str | None,
                    tag_names: Sequence[str] | None
                    ) -> Iterator[tuple[str, list[str], list[str], list[int]]]:
    for path, number, record in sources.records(source, "jsonl" if sources.kind(source)
                                                 == "text" else None):
        tokens_field = tokens_field or _detect(record, TOKEN_FIELDS, "tokens", path, number,
                                               "tokens_field=")
        tags_field = tags_field or _detect(record, TAG_FIELDS, "tags", path, number,
                                           "tags_field=")
        tokens = _field(record, tokens_field, path, number)
        tags = _field(record, tags_field, path, number)
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise DataError(path, number, f"{tokens_field!r} must be a list of strings")
        if not isinstance(tags, list) or len(tags) != len(tokens):
            raise DataError(path, number, f"{tags_field!r} must be a list with one tag "
                            f"per token ({len(tokens)} tokens)")
        tags = [_tag_name(t, tag_names, path, number) for t in tags]
        if tokens:
            yield path, tokens, tags, [number] * len(tags)


def _tag_name(tag: Any, tag_names: Sequence[str] | None, path: PathLike, number: int) -> str:
    if isinstance(tag, str):
        return tag
    if isinstance(tag, int) and not isinstance(tag, bool):
        if tag_names is None:
            raise DataError(path, number, "integer tags need their names: pass "
                            "tag_names=[...] (the dataset's label list, in id order)")
        if not 0 <= tag < len(tag_names):
            raise DataError(path, number, f"tag id {tag} is outside tag_names "
                            f"(0..{len(tag_names) - 1})")
        return tag_names[tag]
    raise DataError(path, number, f"tag {tag!r} is neither a string nor an integer")


# ---- seq2seq and generation ------------------------------------------------------------------


def read_seq2seq(path: PathLike, *, source_field: str | int | None = None,
                 target_field: str | int | None = None, format: str | None = None,
                 header: bool = False, limit: int | None = None) -> list[Seq2SeqExample]:
    """Read (source, target) pairs for translation or summarization.

    TSV (the default for ``.tsv``, ``.txt`` and other names): ``source<TAB>target``; columns
    after the second (Tatoeba's attribution) are ignored; no header row unless
    ``header=True``, which lets ``source_field`` / ``target_field`` name columns. JSONL:
    fields found among source/target, src/tgt, dialogue/summary, document/summary,
    article/highlights, input/output, or named; a dotted name walks nested objects
    (``source_field="translation.en"``).
    """
    table = sources.kind(path) in ("tsv", "csv", "text") and format in (None, "tsv", "csv")
    rows = sources.records(path, format or ("tsv" if sources.kind(path) == "text" else None),
                           header)

    def examples() -> Iterator[Seq2SeqExample]:
        nonlocal source_field, target_field
        for path, number, row in rows:
            if table and len(row) < 2:
                raise DataError(path, number, "one column: expected source<TAB>target")
            if source_field is None or target_field is None:
                if isinstance(row, list):
                    source_field, target_field = 0, 1
                elif not table:
                    source_field, target_field = _detect(
                        row, SEQ2SEQ_FIELDS, "source and target", path, number,
                        "source_field= and target_field=")
                else:  # a table with a header: its first two columns
                    source_field, target_field = list(row)[:2]
            pair = Seq2SeqExample(_text(row, source_field, path, number),
                                  _text(row, target_field, path, number))
            for name, value in dataclasses.asdict(pair).items():
                if not value.strip():
                    raise DataError(path, number, f"empty {name}")
            yield pair

    return _limited(examples(), limit)


def read_generation(source: PathLike, *, prompt_field: str = "prompt",
                    completion_field: str = "completion",
                    limit: int | None = None) -> list[GenerationExample]:
    """Read JSONL prompt / completion pairs for fine-tuning a causal (decoder) model.
    The prompt may be empty; the completion may not."""
    def examples() -> Iterator[GenerationExample]:
        for path, number, record in sources.records(source, "jsonl" if sources.kind(source)
                                                     == "text" else None):
            prompt = _text(record, prompt_field, path, number)
            completion = _text(record, completion_field, path, number)
            if not completion.strip():
                raise DataError(path, number, f"empty {completion_field!r}")
            yield GenerationExample(prompt, completion)

    return _limited(examples(), limit)
