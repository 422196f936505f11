"""Text files: plain-text corpus files -> documents (blank-line-separated blocks), the UTF-8 /
JSON-lines readers every data path uses (through `lmkit.sources`), `read_json`, the one reader
of whole JSON files (configs, weight indexes, manifests, tokenizers; errors name file:line), and
`split_card`, the one parser of a model card's YAML front matter.

The lowest layer of the file readers: shared by configs and checkpoints (`lmkit.config`,
`lmkit.checkpoint`) and the data sources (`lmkit.sources`), so none of them has to import
another to read a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import yaml

from lmkit.errors import ConfigError, DataError, LmkitError, storage

PathLike = str | os.PathLike
# A plain-text "document" with no blank line in it is cut at a line boundary once it
# passes this many characters, so a huge file without blank lines never sits whole in RAM.
MAX_DOC_CHARS = 1 << 20
MAX_JSON_BYTES = 16 << 20  # config, index, manifest and tokenizer files; real ones are < 1 MB


def read_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) of a UTF-8 file, decoded line by line
    so that an encoding error names its line (a byte-order mark is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file '{path}' does not exist: check the path")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, number, f"not UTF-8 ({e.reason} at byte {e.start}): "
                                "convert the file to UTF-8") from None
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def iter_blocks(path: Path) -> Iterator[str]:
    """The documents of a plain-text file: blocks of lines separated by blank lines (the
    lines keep their newlines, minus the last); a block is cut at a line boundary once it
    passes MAX_DOC_CHARS."""
    block: list[str] = []
    size = 0
    for _, line in read_lines(path):
        line = line.replace("\r\n", "\n")
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


def read_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) of each non-blank line of a JSON-lines file; anything but
    one JSON object on a line is a DataError naming file:line."""
    for number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, number, f"invalid JSON ({e.msg} at column {e.colno}): "
                            "JSONL files need one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(path, number, f"expected a JSON object, got "
                            f"{type(record).__name__}")
        yield number, record


def read_bytes(path: PathLike, limit: int, what: str, error: type[LmkitError]) -> bytes:
    """The bytes of a file that is never larger than `limit` (a config, an index): a bigger
    one is damaged or hostile and is refused unread with `error`; a failed read raises a
    StorageError."""
    path = Path(path)
    with storage("read", path):
        size = path.stat().st_size
        if size > limit:
            raise error(f"{path} is {size:,} bytes, more than a {what} can be ({limit:,}): it "
                        f"is damaged or not a {what}")
        return path.read_bytes()


def read_json(path: PathLike, what: str = "config", error: type[LmkitError] = ConfigError
              ) -> dict:
    """The JSON object in the file `path`, a `what` of at most MAX_JSON_BYTES. Anything else
    (too large, not UTF-8, bad JSON: naming file:line, not an object) raises `error`."""
    path = Path(path)
    text = read_bytes(path, MAX_JSON_BYTES, what, error)
    try:
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); the {what} is "
                    "corrupted: copy it again or re-save it") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); the "
                    f"{what} is truncated or corrupted: copy it again or re-save it") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object ({{...}}), got {type(data).__name__}: "
                    f"it is damaged or not a {what}")
    return data


def split_card(text: str) -> tuple[dict, str]:
    """A model card (README.md) as (front matter, Markdown body): ({}, text) when it has no
    front matter. Raises yaml.YAMLError when the front matter is not YAML (callers decide
    whether that is worth a warning: a card is informative, never a reason to refuse)."""
    if not text.startswith("---"):
        return {}, text
    end = text.find("\n---", 3)
    if end < 0:
        return {}, text
    meta = yaml.safe_load(text[3:end]) or {}
    body = text[end + 4:].lstrip("-").lstrip("\n")
    return (meta if isinstance(meta, dict) else {}), body
