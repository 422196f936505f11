import json
import os
import random
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from lmkit.errors import TokenizerError
from lmkit.tokenizer import Tokenizer

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "wizards", "quietly", "hex", "jolly", "boxing", "players", "running", "jumped",
         "houses", "Paris", "London", "café", "naïve", "1984", "2024", "hello", "world", "Hello",
         "World", "tokenizer", "training", "data"]
TEXTS = ["Hello world", "the quick brown fox jumps over the lazy dog.",
         "Paris, London: café naïve 2024!", "  two  spaces\nand a newline\ttab"]
KINDS = [("bpe", "decoder"), ("wordpiece", "encoder"), ("unigram", "encoder-decoder")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~200 lines of varied text, in paragraphs."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = []
    for i in range(200):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ""]))
        if i % 9 == 8:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus) -> dict[str, Tokenizer]:
    return {kind: Tokenizer.train([corpus], kind, 400, family=family) for kind, family in KINDS}


@pytest.mark.parametrize("kind", [k for k, _ in KINDS])
def test_save_load_round_trip(trained, kind, tmp_path):
    tok = trained[kind]
    tok.save(tmp_path / "dir")
    file = tok.save(tmp_path / "elsewhere" / "my-tokenizer.json")
    for loaded in (Tokenizer.from_dir(tmp_path / "dir"), Tokenizer.from_file(file)):
        assert loaded.roles == tok.roles
        assert loaded.sentinel_ids == tok.sentinel_ids
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    config = json.loads((tmp_path / "dir" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_bpe_decode_inverts_encode(trained):
    tok = trained["bpe"]
    for text in [*TEXTS, "unseen: ∑ 漢字 🙂 Ünïcödé", "\n\n  x  \n"]:
        assert tok.decode(tok.encode(text)) == text


def test_decoder_family_special_tokens(trained):
    tok = trained["bpe"]
    eot = tok.token_to_id("<|endoftext|>")
    assert tok.pad_id == tok.bos_id == tok.eos_id == eot
    assert tok.unk_id is tok.mask_id is tok.cls_id is tok.sep_id is None
    assert tok.sentinel_ids == [] and tok.special_ids == [eot]
    assert tok.encode("hello world") == tok.encode("hello world", add_special_tokens=False)
    assert tok.decode([eot, *tok.encode("hi")]) == "hi"
    assert tok.decode([eot], skip_special_tokens=False) == "<|endoftext|>"


def test_encoder_family_special_tokens(trained):
    tok = trained["wordpiece"]
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert tok.bos_id is None and tok.eos_id is None
    body = tok.encode("the dog", add_special_tokens=False)
    assert tok.encode("the dog") == [tok.cls_id, *body, tok.sep_id]
    enc = tok.encode_with_offsets("the dog", pair="a fox")
    second = tok.encode("a fox", add_special_tokens=False)
    assert enc.ids == [tok.cls_id, *body, tok.sep_id, *second, tok.sep_id]
    assert enc.type_ids == [0] * (len(body) + 2) + [1] * (len(second) + 1)
    assert tok.decode(tok.encode("the quick dog")) == "the quick dog"


def test_encoder_decoder_family_special_tokens(trained):
    tok = trained["unigram"]
    assert [tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert tok.sentinel_ids == list(range(5, 105))
    assert tok.id_to_token(tok.sentinel_ids[7]) == "<extra_id_7>"
    ids = tok.encode("the dog")
    assert ids[-1] == tok.eos_id and ids[:-1] == tok.encode("the dog", add_special_tokens=False)
    assert tok.decode(ids) == "the dog"


def test_encode_batch_matches_encode(trained):
    tok = trained["wordpiece"]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    pairs = list(reversed(TEXTS))
    assert tok.encode_batch(TEXTS, pairs) == [tok.encode(a, b) for a, b in zip(TEXTS, pairs)]


@pytest.mark.parametrize("kind", [k for k, _ in KINDS])
def test_offsets_and_word_ids(trained, kind):
    tok, text = trained[kind], "jolly wizards jumped"
    enc = tok.encode_with_offsets(text)
    words: dict[int, str] = {}
    for (start, end), word, special in zip(enc.offsets, enc.word_ids, enc.special_tokens_mask):
        if special:
            assert word is None
            continue
        words[word] = words.get(word, "") + text[start:end].strip().replace("▁", "")
    assert list(words.values()) == ["jolly", "wizards", "jumped"]


def test_word_starts(trained):
    wp = trained["wordpiece"]
    starts = wp.word_starts()
    assert len(starts) == wp.vocab_size
    pieces = [t for t in wp.backend.get_vocab() if t.startswith("##")]
    assert pieces and not any(starts[wp.token_to_id(t)] for t in pieces)
    assert starts[wp.token_to_id("the")] and starts[wp.cls_id]
    bpe = trained["bpe"]
    flags = bpe.word_starts()
    assert flags[bpe.token_to_id("Ġthe")] and not flags[bpe.token_to_id("e")]


def test_train_on_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": f"document {i} about {w}", "id": i} for i, w in enumerate(WORDS * 3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = Tokenizer.train([path], "bpe", 300, text_field="body")
    assert tok.decode(tok.encode("document 7 about houses")) == "document 7 about houses"
    with pytest.raises(ValueError, match="docs.jsonl:1: no field 'text'"):
        Tokenizer.train([path], "bpe", 300)


def test_train_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        Tokenizer.train([corpus], "sentencepiece", 300)
    with pytest.raises(ValueError, match="unknown model family"):
        Tokenizer.train([corpus], "bpe", 300, family="gpt")
    with pytest.raises(FileNotFoundError, match="'nope.txt' does not exist"):
        Tokenizer.train(["nope.txt"], "bpe", 300)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="has no text"):
        Tokenizer.train([empty], "bpe", 300)
    with pytest.raises(TokenizerError, match="vocab_size=50 is too small.*at least 106"):
        Tokenizer.train([corpus], "unigram", 50, family="encoder-decoder")
    # byte-level BPE holds all 256 bytes: a smaller vocabulary is an error, not 257 tokens
    with pytest.raises(TokenizerError, match="vocab_size=10 is too small.*256 byte tokens"):
        Tokenizer.train([corpus], "bpe", 10)
    with pytest.raises(TokenizerError, match="smaller than the corpus's characters"):
        Tokenizer.train([corpus], "wordpiece", 8)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer.json is not a readable tokenizer"):
        Tokenizer.from_file(bad)
    # a corrupted id would make the tokenizers library allocate 10^9 entries and abort
    data = json.loads(Tokenizer.train([corpus], "bpe", 300).backend.to_str())
    data["model"]["vocab"][next(iter(data["model"]["vocab"]))] = 10 ** 9
    bad.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="token id 1000000000 is out of range"):
        Tokenizer.from_file(bad)
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        Tokenizer.from_dir(tmp_path)


def test_roles_from_hf_style_config(trained, tmp_path):
    trained["unigram"].save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["bos_token"] = {"content": "<extra_id_99>", "special": True}  # as transformers writes
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id == tok.sentinel_ids[99]
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        Tokenizer(tok.backend, roles={"eos": "<nope>"})


def write_tiny_gpt2(folder: Path) -> dict[str, int]:
    """A GPT-2 format vocab.json + merges.txt that knows 'Hello' and ' world'."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = ["H e", "He l", "Hel l", "Hell o", "Ġ w", "Ġw o", "Ġwo r", "Ġwor l", "Ġworl d"]
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["".join(m.split()) for m in merges] + ["<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    return vocab


def test_gpt2_files(tmp_path):
    vocab = write_tiny_gpt2(tmp_path)
    for tok in (Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt"),
                Tokenizer.from_dir(tmp_path)):
        assert tok.encode("Hello world") == [vocab["Hello"], vocab["Ġworld"]]
        assert tok.eos_id == tok.pad_id == vocab["<|endoftext|>"]
        assert tok.vocab_size == len(vocab)
        assert tok.decode(tok.encode("Hello worlds!")) == "Hello worlds!"


def test_gpt2_reference_ids(tmp_path):
    """The real GPT-2 files give GPT-2's ids. They live outside the repo (LMKIT_DATA); where
    they are absent the same check runs on tiny files, unless LMKIT_REQUIRE_DATA=1."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    real = Path(os.environ.get("LMKIT_DATA", default)) / "gpt2-tokenizer"
    if real.is_dir():
        tok, expected = Tokenizer.from_dir(real), [15496, 995]
        assert tok.vocab_size == 50257 and tok.eos_id == 50256
    elif os.environ.get("LMKIT_REQUIRE_DATA") == "1":
        pytest.fail(f"LMKIT_REQUIRE_DATA=1 but '{real}' is missing: set LMKIT_DATA")
    else:
        vocab = write_tiny_gpt2(tmp_path)
        tok, expected = Tokenizer.from_dir(tmp_path), [vocab["Hello"], vocab["Ġworld"]]
    assert tok.encode("Hello world") == expected
    assert tok.decode(expected) == "Hello world"


def test_bert_vocab_txt(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "!"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello Worlds!") == [2, 5, 6, 7, 8, 3]  # lowercased, as BERT uncased
    assert tok.decode(tok.encode("hello worlds")) == "hello worlds"
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (2, 3, 4, 0)
    assert Tokenizer.from_bert_vocab(tmp_path / "vocab.txt", lowercase=False).encode(
        "Hello", add_special_tokens=False) == [1]


# ---- character level ("char"): nanoGPT's tokenizer, with a byte fallback ---------------------

def test_char_tokenizer_numbers_characters_as_nanogpt_does(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer.train([tmp_path / "input.txt"], "char", None)
    chars = sorted(set(text))  # nanoGPT's prepare.py: stoi = {ch: i for i, ch in enumerate(chars)}
    first = tok.token_to_id(chars[0])
    assert [tok.token_to_id(c) - first for c in chars] == list(range(len(chars)))
    assert tok.encode("hear me") == [tok.token_to_id(c) for c in "hear me"]
    assert tok.vocab_size == 1 + len(chars) + 256  # <|endoftext|>, the characters, the bytes


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder-decoder"])
def test_char_tokenizer_round_trips_any_text(corpus, family, tmp_path):
    tok = Tokenizer.train([corpus], "char", None, family=family)
    tok.save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    rng = random.Random(1)
    samples = [*TEXTS, "unseen: ∑ 漢字 🙂 Ünïcödé <0x41> ##x ▁y Ġz", "\n\n  x  \n", "",
               "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(300))]
    samples = [s for s in samples if not any(0xD800 <= ord(c) < 0xE000 for c in s)]
    for t in (tok, loaded):
        for text in samples:
            assert t.decode(t.encode(text)) == text
    seen = tok.encode("the dog", add_special_tokens=False)
    assert len(seen) == len("the dog")  # one token per character seen in training
    assert len(tok.encode("漢", add_special_tokens=False)) == 3  # unseen: its 3 UTF-8 bytes


def test_char_tokenizer_cap_keeps_the_most_frequent_characters(tmp_path):
    (tmp_path / "c.txt").write_text("aaaa bbb cc d\n", encoding="utf-8")
    tok = Tokenizer.train([tmp_path / "c.txt"], "char", 1 + 256 + 3)
    assert [tok.token_to_id(c) is not None for c in "ab d"] == [True, True, True, False]
    assert tok.decode(tok.encode("dab")) == "dab"  # "d" through its byte
    with pytest.raises(TokenizerError, match="at least 257"):
        Tokenizer.train([tmp_path / "c.txt"], "char", 100)


def test_pretrain_accepts_the_char_spec():
    from lmkit.train.pretrain import PretrainConfig, tokenizer_spec

    assert tokenizer_spec("char") == ("char", None)
    assert tokenizer_spec("CHAR:300") == ("char", 300)
    assert tokenizer_spec("bpe:8000") == ("bpe", 8000)
    assert tokenizer_spec("bpe") is None and tokenizer_spec("runs/x/tokenizer") is None
    PretrainConfig(data=["x.txt"], tokenizer="char").validate()
    with pytest.raises(ValueError, match="at least 257"):
        PretrainConfig(data=["x.txt"], tokenizer="char:10").validate()
