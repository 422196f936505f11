"""Data from where it lives: one reader of records for every data path (task files, corpora,
evaluation data).

A *source* is what a user passes as ``--train`` / ``--dev`` / ``--data``:

- a file: TSV / CSV (a header row names the columns), JSONL (``.jsonl`` / ``.json``), plain
  text (corpora only), Parquet (``.parquet``) or Arrow (``.arrow``, IPC file or stream);
- a glob of such files (``data/train-*.parquet``), read in sorted order;
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
- a dataset name (``user/name``) already in the local Hugging Face datasets cache
  (``HF_DATASETS_CACHE``), read offline: nothing is downloaded.

``SOURCE::SPLIT`` picks a split of a ``DatasetDict`` folder or a cached dataset (a source with
one split needs none). Parquet, Arrow and datasets are read a record batch at a time
(``pyarrow`` / ``datasets``, the ``data`` extra), so a corpus larger than memory streams as
text files do. ``datasets`` class labels (``ClassLabel``) come out as their names.

:func:`records` yields ``(where, number, row)`` for each row (``where:number`` is what an
error names: the file and line, or the file and row); :func:`iter_documents` yields the texts
of a corpus; :func:`files` lists the files a source reads (for hashing and checks).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmkit.errors import DataError, require
from lmkit.textfiles import PathLike, iter_blocks, read_jsonl, read_lines

TEXT_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
TABLE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
DATASET_FOLDER_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
BATCH_ROWS = 1024  # rows per record batch read from Parquet / Arrow / datasets

Row = dict[str, Any] | list[str]


def split_ref(ref: PathLike) -> tuple[str, str | None]:
    """``"data/sst2::validation"`` -> ``("data/sst2", "validation")``."""
    text = os.fspath(ref)
    base, sep, split = text.partition("::")
    return (base, split or None) if sep else (text, None)


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def kind(ref: PathLike) -> str:
    """What a source is: "glob", "dataset" (a save_to_disk folder), "name" (the datasets
    cache), or a file format: "tsv", "csv", "jsonl", "parquet", "arrow", "text"."""
    base, _ = split_ref(ref)
    path = Path(base)
    if _is_glob(base):
        return "glob"
    if path.is_dir():
        if any((path / f).is_file() for f in DATASET_FOLDER_FILES):
            return "dataset"
        raise DataError(path, None, "a folder, but not one written by datasets' "
                        "save_to_disk (no dataset_info.json / dataset_dict.json): pass the "
                        "data files, or a glob of them")
    suffix = path.suffix.lower()
    if suffix in TABLE_FORMATS or suffix in TEXT_FORMATS:
        return TABLE_FORMATS.get(suffix) or TEXT_FORMATS[suffix]
    if not path.exists() and NAME.fullmatch(base) and not suffix:
        return "name"
    return "text"


def files(ref: PathLike) -> list[Path]:
    """The files a source reads: raises if there are none (a missing file, an empty glob, a
    name not in the datasets cache)."""
    base, _ = split_ref(ref)
    what = kind(ref)
    if what == "glob":
        found = [Path(p) for p in sorted(glob.glob(base, recursive=True)) if Path(p).is_file()]
        if not found:
            raise FileNotFoundError(f"no file matches '{base}': check the pattern")
        return found
    if what == "name" and importlib.util.find_spec("datasets") is None:
        raise FileNotFoundError(f"'{base}' does not exist (as a dataset name in the local "
                                "datasets cache it needs: pip install 'lmkit[data]')")
    if what in ("dataset", "name"):
        return [Path(f["filename"]) for f in _dataset(ref).cache_files]
    if not Path(base).is_file():
        raise FileNotFoundError(f"data file '{base}' does not exist: check the path")
    return [Path(base)]


def check(refs: Sequence[PathLike] | PathLike) -> list[str]:
    """The sources as strings with local paths made absolute (names and ``::split`` kept);
    raises if one has no files."""
    if isinstance(refs, str | os.PathLike):
        refs = [refs]
    if not refs:
        raise ValueError("no data given: pass at least one file, glob, datasets folder or "
                         "cached dataset name")
    out = []
    for ref in refs:
        files(ref)
        base, split = split_ref(ref)
        if kind(ref) != "name":
            base = os.path.abspath(base)
        out.append(base + (f"::{split}" if split else ""))
    return out


# ---- records ---------------------------------------------------------------------------------


def records(ref: PathLike, format: str | None = None, header: bool = True,
            columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS
            ) -> Iterator[tuple[str, int, Row]]:
    """``(where, number, row)`` for every row of a source, streamed.

    ``row`` is a dict (column -> value) except for a TSV / CSV read with ``header=False`` (a
    list of cells). ``format`` ("tsv", "csv", "jsonl") overrides a text file's extension.
    ``columns`` reads only these columns of a table (a missing one is an error naming the
    columns there are). Numbers are 1-based lines of a text file, rows of a table.
    """
    what = kind(ref)
    if what == "glob":
        for path in files(ref):
            yield from records(path, format, header, columns, batch_rows)
        return
    if what in ("tsv", "csv", "jsonl", "text") and format in (None, "tsv", "csv", "jsonl"):
        fmt = format or what
        if fmt == "text":
            raise DataError(ref, None, "cannot tell the format from the file name: pass "
                            "format='tsv', 'csv' or 'jsonl', or use a .tsv / .csv / .jsonl "
                            "/ .parquet / .arrow file")
        for number, row in _text_rows(Path(ref), fmt, header):
            yield str(ref), number, row
        return
    if format is not None and format not in ("tsv", "csv", "jsonl"):
        raise DataError(ref, None, f"unknown format {format!r}: use 'tsv', 'csv' or 'jsonl'")
    where = str(ref)
    number = 0
    for batch in _batches(ref, what, columns, batch_rows):
        names = list(batch)
        for values in zip(*batch.values()):
            number += 1
            yield where, number, dict(zip(names, values))


def record_batches(ref: PathLike, columns: Sequence[str] | None = None,
                   batch_rows: int = BATCH_ROWS) -> Iterator[dict[str, list]]:
    """Column -> values for each record batch (at most ``batch_rows`` rows) of a Parquet,
    Arrow or datasets source: the table is never read whole."""
    what = kind(ref)
    for path in files(ref) if what == "glob" else [ref]:
        yield from _batches(path, kind(path), columns, batch_rows)


def _batches(ref: PathLike, what: str, columns: Sequence[str] | None,
             batch_rows: int) -> Iterator[dict[str, list]]:
    if what in ("parquet", "arrow"):
        yield from _arrow_batches(Path(ref), what, columns, batch_rows)
    elif what in ("dataset", "name"):
        ds = _dataset(ref)
        _check_columns(ref, ds.column_names, columns)
        if columns:
            ds = ds.select_columns(list(columns))
        labels = {name: names for name, f in ds.features.items()
                  if (names := _class_names(f)) is not None}
        for batch in ds.iter(batch_size=batch_rows):
            for name, names in labels.items():  # ClassLabel ids -> their names
                batch[name] = [_named(v, names) for v in batch[name]]
            yield batch
    else:
        raise DataError(ref, None, f"a {what} file has no record batches")


def _class_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature, or of a list of them (NER tags)."""
    inner = getattr(feature, "feature", None)
    return getattr(feature, "names", None) or getattr(inner, "names", None)


def _named(value: Any, names: list[str]) -> Any:
    if isinstance(value, list):
        return [_named(v, names) for v in value]
    return None if value is None or value < 0 else names[value]


def _check_columns(ref: PathLike, present: Sequence[str], wanted: Sequence[str] | None
                   ) -> None:
    missing = [c for c in wanted or () if c not in present]
    if missing:
        raise DataError(ref, None, f"no column {missing[0]!r} (columns: "
                        f"{', '.join(present)}): name one of them")


def _arrow_batches(path: Path, what: str, columns: Sequence[str] | None,
                   batch_rows: int) -> Iterator[dict[str, list]]:
    pa = require("pyarrow", "data", f"reading {what} files")
    with _reading(path, what):
        if what == "parquet":
            parquet = require("pyarrow.parquet", "data", "reading Parquet files")
            file = parquet.ParquetFile(path)
            _check_columns(path, file.schema_arrow.names, columns)
            batches = file.iter_batches(batch_size=batch_rows, columns=columns)
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # datasets writes the IPC stream format
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            _check_columns(path, reader.schema.names, columns)
        for batch in batches:
            if columns:
                batch = batch.select(list(columns))
            for start in range(0, batch.num_rows, batch_rows):  # big IPC batches, cut
                yield batch.slice(start, batch_rows).to_pydict()


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """pyarrow's errors on a damaged file as a DataError naming it."""
    pa = require("pyarrow", "data", f"reading {what} files")
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(path, None, f"cannot read it as {what} ({e}): is it a {what} "
                        "file?") from None


def _dataset(ref: PathLike) -> Any:
    """The ``datasets.Dataset`` of a save_to_disk folder or a cached name (and split)."""
    datasets = require("datasets", "data", "reading Hugging Face datasets")
    base, split = split_ref(ref)
    if kind(ref) == "dataset":
        data = datasets.load_from_disk(base)
    else:
        data = _cached(datasets, base, split)
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise DataError(base, None, f"{'no split ' + repr(split) if split else 'which split?'}"
                            f" (splits: {', '.join(data)}): pass {base}::SPLIT")
        data = data[split]
    return data


def _cached(datasets: Any, name: str, split: str | None) -> Any:
    """``load_dataset(name)`` from the local cache only (offline: nothing is downloaded)."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        if isinstance(e, ValueError) and "split" in str(e).lower():
            raise DataError(name, None, f"{e}: pass {name}::SPLIT") from None
        raise FileNotFoundError(
            f"'{name}' is neither a file nor a folder, nor a dataset in the local datasets "
            f"cache ({datasets.config.HF_DATASETS_CACHE}): check the path, or download the "
            "dataset with datasets.load_dataset first (lmkit reads the cache offline)"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


# ---- text files ------------------------------------------------------------------------------


def _text_rows(path: Path, fmt: str, header: bool) -> Iterator[tuple[int, Row]]:
    """Rows of a TSV / CSV / JSONL file: dicts (JSONL, or a table with a header) or lists.

    TSV is split on tabs with no quoting (GLUE's TSVs hold unbalanced quotes); CSV follows
    the usual quoting rules. The header row itself is not yielded.
    """
    if fmt == "jsonl":
        yield from read_jsonl(path)
        return
    rows = _csv_rows(path) if fmt == "csv" else (
        (n, line.rstrip("\r\n").split("\t")) for n, line in read_lines(path))
    names = width = None
    for number, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if header and names is None:
            names = [c.strip() for c in row]
            continue
        if names is not None and len(row) != len(names):
            raise DataError(path, number, f"{len(row)} columns but the header has "
                            f"{len(names)} ({', '.join(names)})")
        width = width or (len(row), number)
        if names is None and len(row) != width[0]:
            raise DataError(path, number, f"{len(row)} columns but line {width[1]} has "
                            f"{width[0]}: every row needs the same columns")
        yield number, dict(zip(names, row)) if names is not None else row


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(line for _, line in read_lines(path))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(path, reader.line_num, f"bad CSV ({e})") from None
        yield reader.line_num, row  # the line the row ends on


# ---- corpora ---------------------------------------------------------------------------------


def iter_documents(ref: PathLike, text_field: str | None = None) -> Iterator[str]:
    """Stream the documents (texts) of a corpus source.

    Plain text: a document is a block of lines separated by blank (whitespace-only) lines
    (the block's lines keep their newlines, minus the last). Anything with records (JSONL,
    CSV / TSV with a header, Parquet, Arrow, datasets): a document is one record's
    ``text_field`` (default ``"text"``); empty texts are skipped. A file of another name is
    read as JSONL when ``text_field`` is given.
    """
    what = kind(ref)
    if what == "glob":
        for path in files(ref):
            yield from iter_documents(path, text_field)
        return
    if what == "text" and text_field is None:
        yield from iter_blocks(Path(ref))
        return
    field = text_field or "text"
    fmt = "jsonl" if what == "text" else None
    for where, number, record in records(ref, fmt, columns=[field]):
        if field not in record:
            raise DataError(where, number, f"no field '{field}' (fields: "
                            f"{', '.join(record)}): pass text_field= (--text-column) naming "
                            "the field that holds the text")
        text = record[field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(where, number, f"field '{field}' is not a string but "
                            f"{type(text).__name__}: point text_field at text")
        if text.strip():
            yield text
