"""Corpus files -> documents: plain text (blank-line-separated blocks) or JSON lines.

The lowest layer of the data path, shared by tokenizer training (`lmkit.tokenizer`) and the
token cache (`lmkit.data.corpus`), so neither has to import the other to read a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

PathLike = str | os.PathLike
# A plain-text "document" with no blank line in it is cut at a line boundary once it
# passes this many characters, so a huge file without blank lines never sits whole in RAM.
MAX_DOC_CHARS = 1 << 20


def check_files(files: Sequence[PathLike] | PathLike) -> list[Path]:
    """Return ``files`` as a list of Paths, raising if one of them does not exist."""
    if isinstance(files, str | os.PathLike):
        files = [files]
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no corpus files given: pass at least one text or JSONL file")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"corpus file '{p}' does not exist: check the --data path")
    return paths


def is_jsonl(path: Path, text_field: str | None) -> bool:
    """A file is read as JSON lines when it ends in ``.jsonl`` or a ``text_field`` is given."""
    return text_field is not None or path.suffix == ".jsonl"


def iter_documents(path: PathLike, text_field: str | None = None) -> Iterator[str]:
    """Stream the documents of one file.

    Plain text: a document is a block of lines separated by blank (whitespace-only) lines;
    the block's lines keep their newlines, minus the last. JSONL: a document is one record's
    ``text_field`` (default ``"text"``); empty texts are skipped.
    """
    path = Path(path)
    if is_jsonl(path, text_field):
        yield from _iter_jsonl(path, text_field or "text")
    else:
        yield from _iter_blocks(path)


def _iter_blocks(path: Path) -> Iterator[str]:
    block: list[str] = []
    size = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                block.append(line)
                size += len(line)
                if size < MAX_DOC_CHARS:
                    continue
            if block:
                yield "".join(block).rstrip("\n")
            block, size = [], 0
    if block:
        yield "".join(block).rstrip("\n")


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {lineno} of '{path}' is not valid JSON ({e}): "
                                 "JSONL files need one JSON object per line") from e
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"line {lineno} of '{path}' has no field '{field}': pass "
                                 "text_field= naming the field that holds the text")
            text = record[field]
            if not isinstance(text, str):
                raise TypeError(f"field '{field}' on line {lineno} of '{path}' is not a "
                                 f"string but {type(text).__name__}: point text_field at text")
            if text.strip():
                yield text
