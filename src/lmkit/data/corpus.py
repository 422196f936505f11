"""Corpora -> a cached, memory-mapped stream of token ids.

A corpus is a list of sources (``lmkit.sources``: plain text, JSONL, CSV / TSV, Parquet, Arrow,
datasets folders or cached names, globs), streamed document by document. Documents are
tokenized once and written to ``cache_dir/<key>/``:

- ``tokens.bin``: every document's token ids back to back (raw ``uint16`` or ``uint32``);
- ``doc_offsets.npy``: ``int64`` array of ``num_docs + 1`` offsets into ``tokens.bin``;
- ``meta.json``: dtype, counts and what the key was made from.

The key hashes the bytes of the files the sources read, the tokenizer's JSON and the options,
so a second call with the same inputs reuses the cache and any change re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmkit import sources
from lmkit.textfiles import PathLike
from lmkit.tokenizer import Tokenizer

CACHE_VERSION = 1


class TokenCache:
    """A tokenized corpus on disk, or a view of some of its documents.

    Attributes:
        path: the cache folder.
        tokens: ``np.memmap`` of all token ids in the folder (read-only).
        doc_offsets: ``int64`` offsets of every document of the folder into ``tokens``
            (``num_docs_in_folder + 1`` entries).
        docs: indices of the documents in this view, ascending (all of them by default).
    """

    def __init__(self, path: PathLike, docs: np.ndarray | None = None):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.meta = meta
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.dtype(meta["dtype"]),
                                mode="r", shape=(meta["num_tokens"],))
        self.doc_offsets = np.load(self.path / "doc_offsets.npy")
        all_docs = len(self.doc_offsets) - 1
        self.docs = np.arange(all_docs, dtype=np.int64) if docs is None else np.asarray(docs)

    # A memmap pickles as a full copy of its data: send the path instead (DataLoader workers).
    def __getstate__(self) -> dict:
        return {"path": self.path, "docs": self.docs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["docs"])

    def __repr__(self) -> str:
        return f"TokenCache('{self.path}', docs={self.num_docs}, tokens={self.num_tokens})"

    @property
    def num_docs(self) -> int:
        return len(self.docs)

    @property
    def doc_starts(self) -> np.ndarray:
        """Offset into ``tokens`` of each document of the view."""
        return self.doc_offsets[self.docs]

    @property
    def doc_lengths(self) -> np.ndarray:
        """Number of tokens of each document of the view."""
        return self.doc_offsets[self.docs + 1] - self.doc_offsets[self.docs]

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def doc(self, i: int) -> np.ndarray:
        """The token ids of the ``i``-th document of the view."""
        d = self.docs[i]
        return np.asarray(self.tokens[self.doc_offsets[d]:self.doc_offsets[d + 1]])

    def split(self, valid_fraction: float, seed: int = 0) -> tuple[TokenCache, TokenCache]:
        """Split the documents at random into (train, valid) views; order is kept inside each."""
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be between 0 and 1 (got {valid_fraction})")
        if self.num_docs < 2:
            raise ValueError(f"cannot split a corpus of {self.num_docs} document(s): a split "
                             "needs at least 2 (plain text documents are separated by blank "
                             "lines)")
        n_valid = min(max(1, round(valid_fraction * self.num_docs)), self.num_docs - 1)
        perm = np.random.default_rng(seed).permutation(self.num_docs)
        valid, train = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
        return TokenCache(self.path, self.docs[train]), TokenCache(self.path, self.docs[valid])


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def _separator(tokenizer: Tokenizer) -> int:
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if sep is None:
        raise ValueError("append_eos=True but the tokenizer has no end-of-sequence (or [SEP]) "
                         "token: pass append_eos=False or use a tokenizer that has one")
    return sep


def cache_key(refs: list[str], tokenizer: Tokenizer, text_field: str | None,
              append_eos: bool) -> str:
    """Hash of everything the token stream depends on."""
    h = hashlib.blake2b(digest_size=12)
    digests = [file_digest(f) for ref in refs for f in sources.files(ref)]
    parts = [f"v{CACHE_VERSION}", *digests, tokenizer.backend.to_str(),
             repr(text_field), repr(append_eos), repr(tokenizer.eos_id), repr(tokenizer.sep_id)]
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def tokenize_corpus(files: Sequence[PathLike] | PathLike, tokenizer: Tokenizer,
                    cache_dir: PathLike, text_field: str | None = None, append_eos: bool = True,
                    batch_docs: int = 1024) -> TokenCache:
    """Tokenize the corpus sources ``files`` once into ``cache_dir/<key>/`` and return the cache.

    Documents are read as a stream and encoded ``batch_docs`` at a time (without the
    tokenizer's post-processing, so no [CLS]/[SEP]); with ``append_eos`` each document is
    followed by the tokenizer's eos id (its [SEP] id when it has no eos). The folder is
    written under a temporary name and renamed, so an interrupted run leaves no cache.
    """
    paths = sources.check(files)
    cache_dir = Path(cache_dir)
    key = cache_key(paths, tokenizer, text_field, append_eos)
    final = cache_dir / key
    if (final / "meta.json").is_file():
        return TokenCache(final)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_cache(tmp, paths, tokenizer, text_field, append_eos, batch_docs)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return TokenCache(final)


def _write_cache(out: Path, paths: list[str], tokenizer: Tokenizer, text_field: str | None,
                 append_eos: bool, batch_docs: int) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    suffix = [_separator(tokenizer)] if append_eos else []
    lengths = array("q")  # compact: one int64 per document

    def flush(batch: list[str], f) -> None:
        for ids in tokenizer.encode_batch(batch, add_special_tokens=False):
            ids += suffix
            if ids:
                np.asarray(ids, dtype=dtype).tofile(f)
                lengths.append(len(ids))
        batch.clear()

    with open(out / "tokens.bin", "wb") as f:
        batch: list[str] = []
        for path in paths:
            for doc in sources.iter_documents(path, text_field):
                batch.append(doc)
                if len(batch) >= batch_docs:
                    flush(batch, f)
        flush(batch, f)

    if not lengths:
        names = ", ".join(f"'{p}'" for p in paths)
        hint = f" (no record has text in field '{text_field}')" if text_field else ""
        raise ValueError(f"corpus {names} has no text{hint}: check the files")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
    np.save(out / "doc_offsets.npy", offsets)
    meta = {"version": CACHE_VERSION, "dtype": np.dtype(dtype).name,
            "num_tokens": int(offsets[-1]), "num_docs": len(lengths),
            "vocab_size": tokenizer.vocab_size, "files": paths,
            "text_field": text_field, "append_eos": append_eos}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
