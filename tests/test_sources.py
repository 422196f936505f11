"""Data from where it lives (lmkit.sources): every source kind, written by the test with the
real libraries (pyarrow, datasets), read by the task readers, the corpus reader, fine-tuning
and pretraining."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lmkit
from lmkit import sources
from lmkit.data import iter_documents, tokenize_corpus
from lmkit.errors import DataError
from lmkit.finetune import FinetuneConfig, finetune, pipeline
from lmkit.tasks import (
    ClassificationExample,
    Seq2SeqExample,
    read_classification,
    read_seq2seq,
    read_token_classification,
)
from lmkit.tokenizer import Tokenizer

GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "film", "was", "and", "very", "really", "plot", "cast", "it"]
NAMES = ["neg", "pos"]


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(5)]
        words.insert(rng.randrange(6), rng.choice(GOOD if label else BAD))
        out.append({"sentence": " ".join(words), "label": label})
    return out


ROWS = _rows(100)
EXPECTED = [ClassificationExample(r["sentence"], NAMES[r["label"]]) for r in ROWS]


def _features() -> datasets.Features:
    return datasets.Features({"sentence": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=NAMES)})


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """The same 100 labelled rows in every kind of source."""
    d = tmp_path_factory.mktemp("sources")
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, d / "data.parquet", row_group_size=20)
    with pa.ipc.new_file(d / "data.arrow", table.schema) as writer:  # IPC file format
        writer.write_table(table, max_chunksize=30)
    ds = datasets.Dataset.from_list(ROWS, features=_features())
    ds.save_to_disk(d / "folder")
    datasets.DatasetDict({"train": ds.select(range(80)),
                          "validation": ds.select(range(80, 100))}).save_to_disk(d / "dict")
    (d / "json").mkdir()
    (d / "csv").mkdir()
    for part, chunk in enumerate((ROWS[:50], ROWS[50:])):
        (d / "json" / f"part-{part}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in chunk))
        (d / "csv" / f"part-{part}.csv").write_text(
            "sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in chunk))
    return d


@pytest.mark.parametrize("ref", ["data.parquet", "data.arrow", "folder", "dict::train",
                                 "json/*.jsonl", "csv/part-*.csv"])
def test_classification_from_every_source(src, ref):
    examples = read_classification(src / ref, label_names=NAMES)
    expected = EXPECTED[:80] if ref == "dict::train" else EXPECTED
    assert examples == expected
    assert read_classification(src / ref, label_names=NAMES, limit=3) == expected[:3]


def test_datasets_class_labels_come_as_names(src):
    """A ClassLabel column needs no label names: its names come with the dataset."""
    assert read_classification(src / "folder") == EXPECTED
    assert read_classification(f"{src / 'dict'}::validation") == EXPECTED[80:]
    with pytest.raises(DataError, match=r"which split\? \(splits: train, validation\)"):
        read_classification(src / "dict")
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, validation\)"):
        read_classification(f"{src / 'dict'}::test")


def test_the_datasets_cache_by_name(src, tmp_path, monkeypatch):
    """A dataset in the local datasets cache, in datasets' layout
    (<cache>/<user>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow), read by name
    with nothing downloaded."""
    built = tmp_path / "build"
    datasets.load_dataset("json", data_files={"train": str(src / "json" / "part-0.jsonl")},
                          cache_dir=str(built))
    (prepared,) = built.glob("json/default-*/0.0.0/*/")
    cache = tmp_path / "hf-datasets"
    folder = cache / "someone___reviews" / "default" / "0.0.0" / prepared.name
    shutil.copytree(prepared, folder)
    (folder / "json-train.arrow").rename(folder / "reviews-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    assert read_classification("someone/reviews", label_names=NAMES) == EXPECTED[:50]
    assert read_classification("someone/reviews::train", label_names=NAMES) == EXPECTED[:50]
    assert sources.files("someone/reviews") == [folder / "reviews-train.arrow"]
    with pytest.raises(FileNotFoundError, match="nor a dataset in the local datasets cache"):
        read_classification("someone/elsewhere")


def test_columns_and_label_names(tmp_path):
    file = tmp_path / "reviews.parquet"
    pq.write_table(pa.Table.from_pylist(
        [{"body": r["sentence"], "title": "t", "stars": r["label"]} for r in ROWS]), file)
    got = read_classification(file, text_column="body", pair_column="title",
                              label_column="stars", label_names=NAMES)
    assert [(e.text, e.text_pair, e.label) for e in got] == [
        (e.text, "t", e.label) for e in EXPECTED]
    with pytest.raises(DataError, match=r"no field 'review' \(fields: body, title, stars\)"):
        read_classification(file, text_column="review", label_column="stars")
    with pytest.raises(DataError, match=r"cannot tell which column holds the text \(columns: "
                       r"body, title, stars\)"):
        read_classification(file)
    # a label that is neither a name nor an index of one: both named in the error
    with pytest.raises(DataError, match=r"reviews.parquet:\d+: label '1' was not seen in the "
                       r"training data or the label names \(known labels: bad\)"):
        read_classification(file, text_column="body", label_column="stars",
                            label_names=["bad"])


def test_parquet_streams_in_record_batches(src):
    """A Parquet file is read a record batch at a time, never as a whole table."""
    batches = list(sources.record_batches(src / "data.parquet", columns=["sentence"],
                                          batch_rows=7))
    assert all(set(b) == {"sentence"} and 0 < len(b["sentence"]) <= 7 for b in batches)
    assert len(batches) >= 15  # ceil(100 / 7) at least (row groups of 20 cut batches too)
    assert [s for b in batches for s in b["sentence"]] == [r["sentence"] for r in ROWS]
    arrow = list(sources.record_batches(src / "data.arrow", batch_rows=7))
    assert all(len(b["label"]) <= 7 for b in arrow) and sum(len(b["label"]) for b in arrow) \
        == 100
    with pytest.raises(DataError, match=r"no column 'text' \(columns: sentence, label\)"):
        list(sources.record_batches(src / "data.parquet", columns=["text"]))


def test_other_tasks_read_records(tmp_path):
    tags = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                              "ner_tags": datasets.Sequence(datasets.ClassLabel(
                                  names=["O", "B-PER", "I-PER"]))})
    datasets.Dataset.from_dict({"tokens": [["Ada", "Lovelace", "wrote"]],
                                "ner_tags": [[1, 2, 0]]}, features=tags
                               ).save_to_disk(tmp_path / "ner")
    (ex,) = read_token_classification(tmp_path / "ner")
    assert ex.tokens == ["Ada", "Lovelace", "wrote"] and ex.tags == ["B-PER", "I-PER", "O"]
    pq.write_table(pa.Table.from_pylist([{"translation": {"en": "cat", "fr": "chat"}}]),
                   tmp_path / "mt.parquet")
    assert read_seq2seq(tmp_path / "mt.parquet", source_field="translation.en",
                        target_field="translation.fr") == [Seq2SeqExample("cat", "chat")]


def test_corpus_documents_from_tables(src, tmp_path):
    """Pretraining reads the same documents (and builds the same token stream) from a text
    column of a Parquet file, an Arrow file or a datasets folder as from JSONL."""
    texts = [r["sentence"] for r in ROWS]
    for ref in ("data.parquet", "data.arrow", "folder", "json/*.jsonl"):
        assert list(iter_documents(src / ref, "sentence")) == texts
    with pytest.raises(DataError, match=r"no column 'text' \(columns: sentence, label\)"):
        list(iter_documents(src / "data.parquet"))
    tok = Tokenizer.train([src / "data.parquet"], "bpe", 300, text_field="sentence")
    caches = [tokenize_corpus(src / ref, tok, tmp_path / "cache", text_field="sentence")
              for ref in ("data.parquet", "folder", "json/*.jsonl")]
    expected = [ids + [tok.eos_id] for ids in tok.encode_batch(texts,
                                                               add_special_tokens=False)]
    for cache in caches:
        assert [cache.doc(i).tolist() for i in range(cache.num_docs)] == expected
    assert len({c.path for c in caches}) == 3  # keyed by the files read


def test_finetune_from_parquet_with_label_names(src, tmp_path):
    """--train a Parquet file of 0/1 labels, --dev a datasets split, classes named: the names
    are the model's labels, in eval.json, the card and the predictions."""
    tok = Tokenizer.train([src / "data.parquet"], "wordpiece", 200, family="encoder",
                          text_field="sentence")
    base = tmp_path / "base"
    lmkit.Model(lmkit.preset("tiny-encoder", vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                             eos_id=None)).save(base, tokenizer=tok)
    cfg = FinetuneConfig(task="classification", train=str(src / "data.parquet"),
                         dev=f"{src / 'dict'}::validation", label_names=["neg", "pos"],
                         out=str(tmp_path / "run"), steps=3, batch_size=16, progress=False,
                         tensorboard=False, plot=False)
    res = finetune(base, cfg)
    assert lmkit.load(res.out_dir).config.label_names == ["neg", "pos"]
    evaluation = json.loads((res.out_dir / "eval.json").read_text())
    assert evaluation["label_names"] == ["neg", "pos"] and "accuracy" in evaluation
    assert "labels (in id order): neg, pos" in (res.out_dir / "README.md").read_text()
    prediction = pipeline(None, res.out_dir)("the film was great")
    assert prediction["label"] in NAMES and set(prediction["scores"]) == set(NAMES)
    task = json.loads((res.out_dir / "task.json").read_text())
    assert task["options"]["label_names"] == ["neg", "pos"]
    assert np.isfinite(res.metrics["accuracy"])
