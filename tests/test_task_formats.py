"""Task data readers, NER label alignment and length-grouped batching."""

import json
import random

import numpy as np
import pytest
import torch

from lmkit.tasks import (
    ClassificationExample,
    GenerationExample,
    Seq2SeqExample,
    Span,
    TaskDataError,
    TokenClassificationExample,
    align_labels,
    align_predictions,
    collate,
    encode_words,
    label_names,
    length_grouped_batches,
    padding_fraction,
    read_classification,
    read_generation,
    read_seq2seq,
    read_token_classification,
    split_words,
    tags_to_spans,
)
from lmkit.tokenizer import Tokenizer


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records):
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# ---- classification ------------------------------------------------------------------------


def test_sst2_tsv_label_first_with_unbalanced_quotes(tmp_path):
    f = write(tmp_path / "train.tsv", 'label\tsentence\n1\tit \'s a "charming journey\n'
              "0\tdull , dull , dull\n\n")
    assert read_classification(f) == [
        ClassificationExample('it \'s a "charming journey', "1"),
        ClassificationExample("dull , dull , dull", "0")]


def test_csv_pairs_with_quoting_and_configured_columns(tmp_path):
    f = write(tmp_path / "nli.csv", 'premise,hypothesis,gold_label\n'
              '"A man, smiling",A person,entailment\n"two\nlines",x,neutral\n')
    ex = read_classification(f)
    assert ex == [ClassificationExample("A man, smiling", "entailment", "A person"),
                  ClassificationExample("two\nlines", "neutral", "x")]
    g = write(tmp_path / "custom.csv", "review,stars\ngood,5\n")
    assert read_classification(g, text_column="review", label_column="stars") == [
        ClassificationExample("good", "5")]


def test_headerless_tsv_by_column_number(tmp_path):
    # CoLA's raw files: source, label, original label, sentence; no header
    f = write(tmp_path / "cola.tsv", "gj04\t1\t\tThe sailors rode the breeze .\n"
              "gj04\t0\t*\tThe more we study verbs .\n")
    ex = read_classification(f, header=False, text_column=3, label_column=1)
    assert [(e.text, e.label) for e in ex] == [("The sailors rode the breeze .", "1"),
                                              ("The more we study verbs .", "0")]


def test_jsonl_labels_integers_and_strings_and_label_names(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2},
                                     {"text": "c", "label": "2"}])
    ex = read_classification(f)
    assert [e.label for e in ex] == ["10", "2", "2"]
    assert label_names(ex) == ["2", "10"]  # numeric order, not "10" < "2"
    words = [ClassificationExample("x", lab) for lab in ["pos", "neg", "neutral", "neg"]]
    assert label_names(words) == ["neg", "neutral", "pos"]
    assert read_classification(f, limit=2) == ex[:2]


def test_unknown_dev_label_names_file_line_label_and_known(tmp_path):
    train = read_classification(write(tmp_path / "train.tsv",
                                      "sentence\tlabel\ngood\tpositive\nbad\tnegative\n"))
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\nok\tpositive\nmeh\tneutral\n")
    with pytest.raises(TaskDataError) as err:
        read_classification(dev, label_names=label_names(train))
    msg = str(err.value)
    assert msg.startswith(f"{dev}:3:")
    assert "'neutral'" in msg and "negative, positive" in msg
    assert (err.value.path, err.value.line) == (str(dev), 3)


@pytest.mark.parametrize("name,text,match", [
    ("a.tsv", "sentence\tlabel\ngood\t1\nbad\n", r"a\.tsv:3: 1 columns but the header has 2"),
    ("b.tsv", "words\tlabel\ngood\t1\n", r"b\.tsv:2: cannot tell .* text .*words, label.*"
     r"text_column="),
    ("c.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n',
     r"c\.jsonl:2: label 0\.5 is a float"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1\n',
     r"d\.jsonl:2: invalid JSON"),
    ("e.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 1}\n',
     r"e\.jsonl:2: no field 'text'"),
    ("f.tsv", "sentence\tlabel\ngood\t \n", r"f\.tsv:2: empty label"),
    ("g.dat", "x", r"g\.dat: cannot tell the format"),
])
def test_classification_errors_name_file_and_line(tmp_path, name, text, match):
    with pytest.raises(TaskDataError, match=match):
        read_classification(write(tmp_path / name, text))


def test_non_utf8_line_is_named(tmp_path):
    f = tmp_path / "latin1.tsv"
    f.write_bytes("sentence\tlabel\ncaf\u00e9\t1\n".encode("latin-1"))
    with pytest.raises(TaskDataError, match=r"latin1\.tsv:2: not UTF-8"):
        read_classification(f)


# ---- token classification ----------------------------------------------------------------


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_2003_four_columns(tmp_path):
    ex = read_token_classification(write(tmp_path / "train.txt", CONLL))
    assert ex == [TokenClassificationExample(["EU", "rejects", "German"],
                                             ["B-ORG", "O", "B-MISC"]),
                  TokenClassificationExample(["Peter", "Blackburn"], ["B-PER", "I-PER"])]
    assert label_names(ex) == ["O", "B-MISC", "B-ORG", "B-PER", "I-PER"]
    two_columns = write(tmp_path / "two.conll", "Paris\tB-LOC\nis\tO\n\n\nRome\tB-LOC\n")
    assert [e.tags for e in read_token_classification(two_columns, limit=1)] == [["B-LOC", "O"]]


@pytest.mark.parametrize("text,match", [
    ("EU B-ORG\nrejects\n", r"bad\.txt:2: one column \('rejects'\)"),
    ("EU B-ORG\n\nGerman X-MISC\n", r"bad\.txt:3: tag 'X-MISC' is not O, B-TYPE or I-TYPE"),
    ("EU B-ORG\nGerman B-\n", r"bad\.txt:2: tag 'B-'"),
])
def test_conll_errors_name_file_and_line(tmp_path, text, match):
    with pytest.raises(TaskDataError, match=match):
        read_token_classification(write(tmp_path / "bad.txt", text))


def test_conll_dev_tag_unseen_in_training(tmp_path):
    dev = write(tmp_path / "dev.txt", "Paris B-LOC\n\nIBM B-ORG\n")
    with pytest.raises(TaskDataError, match=r"dev\.txt:3: label 'B-ORG' was not seen.*O, B-LOC"):
        read_token_classification(dev, label_names=["O", "B-LOC", "I-LOC"])


def test_tagging_jsonl_with_string_and_integer_tags(tmp_path):
    f = jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Paris", "!"], "tags": ["B-LOC", "O"]}])
    assert read_token_classification(f) == [
        TokenClassificationExample(["Paris", "!"], ["B-LOC", "O"])]
    # Hugging Face datasets store ids: conll2003's ner_tags, names in id order
    hf = jsonl(tmp_path / "hf.jsonl", [{"id": "0", "tokens": ["EU", "rejects"],
                                        "ner_tags": [3, 0]}])
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    assert read_token_classification(hf, tag_names=names)[0].tags == ["B-ORG", "O"]
    with pytest.raises(TaskDataError, match=r"hf\.jsonl:1: integer tags need .*tag_names="):
        read_token_classification(hf)
    short = jsonl(tmp_path / "short.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(TaskDataError, match=r"short\.jsonl:1: 'tags' must be a list with one"):
        read_token_classification(short)


# ---- seq2seq and generation --------------------------------------------------------------


def test_tatoeba_tsv_takes_first_two_columns(tmp_path):
    f = write(tmp_path / "fra.txt", "Go.\tVa !\tCC-BY 2.0 (France) Attribution: #2877272\n"
              "Hi.\tSalut !\tCC-BY 2.0 (France) Attribution: #538123\n")
    assert read_seq2seq(f) == [Seq2SeqExample("Go.", "Va !"), Seq2SeqExample("Hi.", "Salut !")]
    assert len(read_seq2seq(f, limit=1)) == 1
    bad = write(tmp_path / "bad.tsv", "Go.\tVa !\nHi.\n")
    with pytest.raises(TaskDataError, match=r"bad\.tsv:2: one column"):
        read_seq2seq(bad)
    empty = write(tmp_path / "empty.tsv", "Go.\t\n")
    with pytest.raises(TaskDataError, match=r"empty\.tsv:1: empty target"):
        read_seq2seq(empty)
    headed = write(tmp_path / "headed.tsv", "fr\ten\nSalut\tHi\n")
    assert read_seq2seq(headed, header=True, source_field="en", target_field="fr") == [
        Seq2SeqExample("Hi", "Salut")]


def test_seq2seq_jsonl_dialogsum_and_nested_fields(tmp_path):
    f = jsonl(tmp_path / "dialogsum.jsonl", [
        {"fname": "train_0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.",
         "summary": "They greet.", "topic": "greeting"}])
    assert read_seq2seq(f) == [Seq2SeqExample("#Person1#: Hi.\n#Person2#: Hello.",
                                              "They greet.")]
    wmt = jsonl(tmp_path / "wmt.jsonl", [{"translation": {"de": "Hallo", "en": "Hello"}}])
    assert read_seq2seq(wmt, source_field="translation.en", target_field="translation.de") == [
        Seq2SeqExample("Hello", "Hallo")]
    with pytest.raises(TaskDataError, match=r"wmt\.jsonl:1: cannot tell .*source_field="):
        read_seq2seq(wmt)


def test_generation_jsonl(tmp_path):
    f = jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"},
                                       {"prompt": "", "completion": "Once upon a time"}])
    assert read_generation(f) == [GenerationExample("Q: 2+2?\nA:", " 4"),
                                  GenerationExample("", "Once upon a time")]
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": ["y"]}])
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:1: field 'completion' is a list"):
        read_generation(bad)


# ---- NER alignment -------------------------------------------------------------------------

CORPUS = """John Smith lives in New York and works for the United Nations.
Angela Merkel visited Paris on Monday with a European Union delegation.
The U.S. economy grew while exports from Germany fell.
Washington is the capital of the United States of America.
"""
KINDS = {"wordpiece": ("encoder", 150), "bpe": ("decoder", 300),
         "unigram": ("encoder-decoder", 150)}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    corpus = write(tmp_path_factory.mktemp("ner") / "corpus.txt", CORPUS * 3)
    return {kind: Tokenizer.train([corpus], kind, size, family=family)
            for kind, (family, size) in KINDS.items()}


def test_align_labels_and_predictions_by_hand():
    label_to_id = {"O": 0, "B-PER": 1, "I-PER": 2}
    # [CLS] John Smith ##son visited [SEP]
    word_ids = [None, 0, 1, 1, 2, None]
    labels = align_labels(["B-PER", "I-PER", "O"], word_ids, label_to_id)
    assert labels == [-100, 1, 2, -100, 0, -100]
    # the words' tags come back from their first subwords; the others are never read
    preds = [2, 1, 2, 0, 0, 2]
    assert align_predictions(preds, word_ids, ["O", "B-PER", "I-PER"]) == ["B-PER", "I-PER", "O"]
    # a word cut off by truncation predicts O
    assert align_predictions(preds[:3], word_ids[:3], ["O", "B-PER", "I-PER"], num_words=3) == [
        "B-PER", "I-PER", "O"]
    with pytest.raises(ValueError, match="'B-LOC' is not in the label set"):
        align_labels(["B-LOC", "O", "O"], word_ids, label_to_id)


@pytest.mark.parametrize("kind", list(KINDS))
def test_encode_words_keeps_the_given_words(tokenizers, kind):
    tok = tokenizers[kind]
    words = ["John", "Smithson", "visited", "U.S.", "today"]
    tags = ["B-PER", "I-PER", "O", "B-LOC", "O"]
    enc = encode_words(tok, words)
    # every word is rebuilt from exactly its subwords, though the tokenizer's own
    # pre-tokenizer would cut "U.S." into several words
    for w, word in enumerate(words):
        pieces = [t for t, i in zip(enc.tokens, enc.word_ids) if i == w]
        assert "".join(p.replace("##", "").lstrip("Ġ▁") for p in pieces) == word
    special = [i for i, s in enumerate(enc.special_tokens_mask) if s]
    assert all(enc.word_ids[i] is None for i in special)
    label_to_id = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3}
    labels = align_labels(tags, enc.word_ids, label_to_id)
    firsts = [enc.word_ids.index(w) for w in range(len(words))]
    assert [labels[i] for i in firsts] == [1, 2, 0, 3, 0]
    assert sum(lab != -100 for lab in labels) == len(words)
    assert align_predictions(labels, enc.word_ids, list(label_to_id)) == tags


def test_wordpiece_subwords_of_a_punctuated_word(tokenizers):
    enc = encode_words(tokenizers["wordpiece"], ["in", "U.S."])
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert enc.tokens[-5:-1] == ["U", ".", "S", "."]
    assert enc.word_ids[-5:] == [1, 1, 1, 1, None]
    assert align_labels(["O", "B-LOC"], enc.word_ids, {"O": 0, "B-LOC": 1})[-5:] == [
        1, -100, -100, -100, -100]


def test_ner_on_raw_text_gives_character_spans(tokenizers):
    tok = tokenizers["wordpiece"]
    text = "Angela  Merkel visited Paris, France."
    spans = split_words(tok, text)
    words = [text[s:e] for s, e in spans]
    assert words == ["Angela", "Merkel", "visited", "Paris", ",", "France", "."]
    tags = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC", "O"]
    names = ["O", "B-LOC", "B-PER", "I-PER"]
    # a perfect model: its subword predictions are the aligned labels
    enc = encode_words(tok, words)
    preds = [max(lab, 0) for lab in align_labels(tags, enc.word_ids, {n: i for i, n in
                                                                     enumerate(names)})]
    predicted = align_predictions(preds, enc.word_ids, names, num_words=len(words))
    assert predicted == tags
    assert tags_to_spans(words, predicted, spans, text) == [
        Span("PER", 0, 14, "Angela  Merkel"), Span("LOC", 23, 28, "Paris"),
        Span("LOC", 30, 36, "France")]
    assert tags_to_spans(words, tags, spans)[0] == Span("PER", 0, 14, "Angela Merkel")


# ---- batching ------------------------------------------------------------------------------


def test_length_grouped_batches_cover_every_example_once():
    lengths = [random.Random(i).randint(1, 100) for i in range(1000)]
    batches = length_grouped_batches(lengths, 16, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    assert max(map(len, batches)) == 16
    assert batches == length_grouped_batches(lengths, 16, seed=3)
    assert batches != length_grouped_batches(lengths, 16, seed=4)
    # batches come in a random order, not shortest first
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # evaluation: one global sort by length
    evaluation = length_grouped_batches(lengths, 16, shuffle=False)
    assert [i for b in evaluation for i in b] == sorted(range(1000), key=lengths.__getitem__)
    assert length_grouped_batches([], 4) == []


def test_length_grouped_batches_by_token_budget():
    lengths = [random.Random(i).randint(1, 100) for i in range(500)] + [300]
    batches = length_grouped_batches(lengths, max_tokens=256, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(501))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 256 or len(b) == 1
    assert [500] in batches  # longer than the budget: a batch of its own
    with pytest.raises(ValueError, match="exactly one of batch_size and max_tokens"):
        length_grouped_batches(lengths, 8, max_tokens=256)


def test_length_grouping_wastes_far_less_padding_than_random_batches():
    # a long-tailed length distribution, like sentences and documents
    lengths = np.clip(np.random.default_rng(0).lognormal(3.5, 0.8, 20_000), 2, 512)
    lengths = lengths.astype(int).tolist()
    order = np.random.default_rng(0).permutation(len(lengths)).tolist()
    shuffled = padding_fraction([order[i:i + 32] for i in range(0, len(order), 32)], lengths)
    grouped = padding_fraction(length_grouped_batches(lengths, 32, seed=0), lengths)
    # a token budget gives long examples smaller batches; evaluation sorts everything
    budget = padding_fraction(length_grouped_batches(lengths, max_tokens=2048), lengths)
    ordered = padding_fraction(length_grouped_batches(lengths, 32, shuffle=False), lengths)
    print(f"padding fraction: random batches {shuffled:.1%}, length-grouped {grouped:.1%}, "
          f"token budget {budget:.1%}, sorted (evaluation) {ordered:.1%}")
    # measured: 75.4%, 11.8%, 3.7%, 1.0% (most of the grouped waste is in the long tail)
    assert shuffled > 0.7
    assert grouped < shuffled / 5
    assert budget < 0.05 and ordered < 0.02
    assert padding_fraction([[0, 1]], [3, 1]) == pytest.approx(2 / 6)


def test_collate_pads_each_key_its_own_way():
    pairs = collate([{"input_ids": [2, 7, 3, 8, 3], "token_type_ids": [0, 0, 0, 1, 1],
                      "labels": 1},
                     {"input_ids": [2, 9, 3], "token_type_ids": [0, 0, 0], "labels": 0}],
                    pad_id=0)
    assert pairs["input_ids"].tolist() == [[2, 7, 3, 8, 3], [2, 9, 3, 0, 0]]
    assert pairs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert pairs["token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert pairs["labels"].tolist() == [1, 0] and pairs["labels"].dtype == torch.int64
    # seq2seq: targets padded with -100 to their own longest length
    s2s = collate([{"input_ids": [5, 6, 1], "labels": [7, 1]},
                   {"input_ids": [5, 1], "labels": [8, 9, 4, 1]}], pad_id=0)
    assert set(s2s) == {"input_ids", "attention_mask", "labels"}
    assert s2s["labels"].tolist() == [[7, 1, -100, -100], [8, 9, 4, 1]]
    with pytest.raises(ValueError, match="1 of 2 features have 'labels'"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1]}], pad_id=0)
