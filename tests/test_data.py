import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lmkit.data import PackedDataset, TokenCache, iter_documents, pad_batch, tokenize_corpus
from lmkit.errors import DataError
from lmkit.tokenizer import Tokenizer

DOCS = [f"Document number {i}: " + " ".join(["some words here"] * (i % 7 + 1)) for i in range(40)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """The documents split over a plain text file (blank-line blocks) and a JSONL file."""
    folder = tmp_path_factory.mktemp("corpus")
    text = folder / "a.txt"
    # Documents span two lines; whitespace-only lines also separate them.
    text.write_text("\n \n".join(d.replace(": ", ":\n") for d in DOCS[:30]) + "\n\n\n")
    jsonl = folder / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in DOCS[30:]) + "\n")
    return [text, jsonl]


@pytest.fixture(scope="module")
def tok(files) -> Tokenizer:
    return Tokenizer.train(files, "bpe", 300)


@pytest.fixture
def cache(files, tok, tmp_path) -> TokenCache:
    return tokenize_corpus(files, tok, tmp_path)


def expected_stream(tok: Tokenizer) -> list[list[int]]:
    docs = [d.replace(": ", ":\n") for d in DOCS[:30]] + DOCS[30:]
    return [ids + [tok.eos_id] for ids in tok.encode_batch(docs, add_special_tokens=False)]


def test_iter_documents(files, tmp_path, monkeypatch):
    docs = list(iter_documents(files[0]))
    assert docs[:2] == ["Document number 0:\nsome words here",
                        "Document number 1:\nsome words here some words here"]
    assert len(docs) == 30
    assert list(iter_documents(files[1])) == DOCS[30:]
    other = tmp_path / "records.json"
    other.write_text('{"body": "x y"}\n\n{"body": ""}\n{"body": "z"}\n')
    assert list(iter_documents(other, text_field="body")) == ["x y", "z"]
    with pytest.raises(DataError, match="records.json:1: no field 'text'"):
        list(iter_documents(other, text_field="text"))
    other.write_bytes(b'{"body": "x"}\n{"body": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match="records.json:2: not UTF-8"):
        list(iter_documents(other, text_field="body"))
    # A block without blank lines is cut at a line boundary once it is long.
    monkeypatch.setattr("lmkit.textfiles.MAX_DOC_CHARS", 10)
    long = tmp_path / "long.txt"
    long.write_text("aaaa\nbbbb\ncccc\n")
    assert list(iter_documents(long)) == ["aaaa\nbbbb", "cccc"]


def test_tokenize_corpus_contents(cache, tok):
    docs = expected_stream(tok)
    assert cache.num_docs == len(docs) == 40
    assert cache.num_tokens == sum(map(len, docs))
    assert cache.tokens.dtype == np.uint16 and isinstance(cache.tokens, np.memmap)
    assert cache.doc_offsets.dtype == np.int64
    assert cache.tokens.tolist() == sum(docs, [])
    assert [cache.doc(i).tolist() for i in range(cache.num_docs)] == docs


def test_cache_is_reused_until_inputs_change(files, tok, tmp_path, monkeypatch):
    first = tokenize_corpus(files, tok, tmp_path)
    calls = []
    real_encode = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, *a, **k: calls.append(1) or real_encode(self, *a, **k))
    again = tokenize_corpus(files, tok, tmp_path)
    assert again.path == first.path and calls == []

    assert tokenize_corpus(files, tok, tmp_path, append_eos=False).path != first.path
    assert calls
    changed = tmp_path / "changed.txt"
    changed.write_bytes(files[0].read_bytes() + b"\nOne more document.\n")
    grown = tokenize_corpus([changed, files[1]], tok, tmp_path)
    assert grown.num_docs == first.num_docs + 1
    other_tok = Tokenizer.train(files, "bpe", 280)
    assert tokenize_corpus(files, other_tok, tmp_path).path != first.path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_uint32_for_large_vocabularies(files, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70_000))
    cache = tokenize_corpus(files, tok, tmp_path)
    assert cache.tokens.dtype == np.uint32
    assert cache.tokens.tolist() == sum(expected_stream(tok), [])


def test_tokenize_corpus_errors(files, tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="data file .missing.txt. does not exist"):
        tokenize_corpus(["missing.txt"], tok, tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="corpus '.*empty.txt' has no text"):
        tokenize_corpus(empty, tok, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written left behind
    words = ["[PAD]", "[UNK]", "[CLS]", "[MASK]", "some", "words"]
    (tmp_path / "vocab.txt").write_text("\n".join(words + ["[SEP]"]) + "\n")
    bert = Tokenizer.from_dir(tmp_path)
    assert tokenize_corpus(files[1], bert, tmp_path).doc(0)[-1] == bert.sep_id
    bert.roles["sep"] = None
    with pytest.raises(ValueError, match="pass append_eos=False"):
        tokenize_corpus(files[1], bert, tmp_path)


def test_split(cache):
    train, valid = cache.split(0.2, seed=1)
    assert (train.num_docs, valid.num_docs) == (32, 8)
    assert sorted([*train.docs, *valid.docs]) == list(range(40))
    assert train.num_tokens + valid.num_tokens == cache.num_tokens
    assert valid.doc(0).tolist() == cache.doc(int(valid.docs[0])).tolist()
    assert np.array_equal(cache.split(0.2, seed=1)[1].docs, valid.docs)
    assert not np.array_equal(cache.split(0.2, seed=2)[1].docs, valid.docs)
    with pytest.raises(ValueError, match="valid_fraction must be between 0 and 1"):
        cache.split(1.0)


def all_rows(ds: PackedDataset) -> list[dict[str, torch.Tensor]]:
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("view", ["whole", "split"])
def test_packed_rows_follow_the_stream(cache, view):
    source = cache if view == "whole" else cache.split(0.3, seed=0)[0]
    docs = [source.doc(i).tolist() for i in range(source.num_docs)]
    stream = sum(docs, [])
    seq_len = 16
    ds = PackedDataset(source, seq_len, shuffle=False)
    assert len(ds) == len(stream) // seq_len  # the remainder is dropped
    rows = all_rows(ds)
    assert torch.cat([r["input_ids"] for r in rows]).tolist() == stream[:len(ds) * seq_len]
    doc_of_token = sum([[d] * len(doc) for d, doc in enumerate(docs)], [])
    for r, row in enumerate(rows):
        assert row["input_ids"].dtype == row["segment_ids"].dtype == torch.int64
        docs_here = doc_of_token[r * seq_len:(r + 1) * seq_len]
        expected = np.unique(docs_here, return_inverse=True)[1] + 1  # 1, 2, ... by document
        assert row["segment_ids"].tolist() == expected.tolist()


def test_packed_example_by_hand(tmp_path):
    """Documents of 5, 3 and 9 tokens in rows of 4."""
    text = tmp_path / "abc.txt"
    text.write_text("aaaa\n\nbb\n\ncccccccc\n")
    tok = Tokenizer.from_gpt2_files(*_char_vocab(tmp_path))
    cache = tokenize_corpus(text, tok, tmp_path)
    ds = PackedDataset(cache, 4, shuffle=False)
    e, a, b, c = (tok.token_to_id(t) for t in ("<|endoftext|>", "a", "b", "c"))
    assert [r["input_ids"].tolist() for r in ds] == [
        [a, a, a, a], [e, b, b, e], [c, c, c, c], [c, c, c, c]]  # the last eos is dropped
    assert [r["segment_ids"].tolist() for r in ds] == [
        [1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1]]


def _char_vocab(folder: Path) -> tuple[Path, Path]:
    vocab = {ch: i for i, ch in enumerate("abcĊ")} | {"<|endoftext|>": 4}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def test_shuffle_resume_and_ranks(cache):
    base = PackedDataset(cache, 8, shuffle=False)
    order = [r["input_ids"].tolist() for r in base]
    ds = PackedDataset(cache, 8, seed=3)
    shuffled = [r["input_ids"].tolist() for r in ds]
    assert shuffled != order and sorted(shuffled) == sorted(order)
    assert [r["input_ids"].tolist() for r in PackedDataset(cache, 8, seed=3)] == shuffled
    ds.set_epoch(1)
    assert [r["input_ids"].tolist() for r in ds] != shuffled

    resumed = PackedDataset(cache, 8, seed=3, start_row=5)
    assert [r["input_ids"].tolist() for r in resumed] == shuffled[5:]

    world = 3
    ranks = [PackedDataset(cache, 8, seed=3, rank=k, world_size=world) for k in range(world)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(order) // world
    for k, ds_k in enumerate(ranks):
        assert [r["input_ids"].tolist() for r in ds_k] == shuffled[k:world * len(ds_k):world]
    late = PackedDataset(cache, 8, seed=3, rank=1, world_size=world, start_row=2)
    assert [r["input_ids"].tolist() for r in late] == shuffled[1 + 2 * world::world][:len(late)]


def test_packed_dataset_in_a_dataloader(cache):
    ds = PackedDataset(cache, 8, seed=0)
    assert len(pickle.dumps(ds)) < 4 * cache.num_tokens  # workers get a path, not the tokens
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[3]["input_ids"], ds[3]["input_ids"])
    batches = list(DataLoader(ds, batch_size=4))
    assert batches[0]["input_ids"].shape == batches[0]["segment_ids"].shape == (4, 8)
    assert torch.equal(batches[1]["input_ids"][0], ds[4]["input_ids"])


def test_packed_dataset_errors(cache):
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        PackedDataset(cache, 1)
    with pytest.raises(ValueError, match="too few for one row of seq_len=100000"):
        PackedDataset(cache, 100_000)
    with pytest.raises(ValueError, match=r"rank=2 is not in \[0, world_size=2\)"):
        PackedDataset(cache, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_row=10000 is outside"):
        PackedDataset(cache, 8, start_row=10_000)


def test_pad_batch():
    out = pad_batch([[5, 6, 7], [8], torch.tensor([9, 10])], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    left = pad_batch([[5, 6, 7], [8]], pad_id=-1, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [-1, -1, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64
    with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
        pad_batch([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="no sequences"):
        pad_batch([], 0)


def test_tokenize_corpus_streams(files, tok, tmp_path, monkeypatch):
    """Documents reach the tokenizer in batches of batch_docs, never all at once."""
    sizes = []
    real_encode = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, texts, **k: sizes.append(len(texts)) or real_encode(
                            self, texts, **k))
    cache = tokenize_corpus(files, tok, tmp_path, batch_docs=7)
    assert max(sizes) == 7 and sum(sizes) == 40
    assert cache.tokens.tolist() == sum(expected_stream(tok), [])
    assert os.path.getsize(cache.path / "tokens.bin") == 2 * cache.num_tokens
