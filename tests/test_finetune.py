"""Fine-tuning end to end on tiny synthetic tasks: each must be learned well above chance,
through the same functions the CLI calls."""

import json
import random

import pytest
import torch

import lmkit
from lmkit.finetune import FinetuneConfig, evaluate_run, finetune, pipeline
from lmkit.tasks import DataError, bleu, read_classification, read_seq2seq
from lmkit.tokenizer import Tokenizer

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo"]
FILLER = ["the", "a", "today", "saw", "went", "to", "and", "with", "very", "really", "was"]
GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "sad"]
WORDS = NAMES + CITIES + FILLER
LEXICON = {w: WORDS[(i + 1) % len(WORDS)] for i, w in enumerate(WORDS)}  # word-for-word


def sentence(rng, n=6):
    return " ".join(rng.choice(FILLER) for _ in range(n))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    corpus = [sentence(rng) + " " + " ".join(rng.sample(NAMES + CITIES + GOOD + BAD, 3))
              for _ in range(400)] + list(LEXICON.values())
    (d / "corpus.txt").write_text("\n\n".join(corpus))

    def cls_rows(n):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            word = rng.choice(GOOD if label == "pos" else BAD)
            words = sentence(rng, 5).split()
            words.insert(rng.randrange(6), word)
            rows.append(" ".join(words) + "\t" + label)
        return "\n".join(rows) + "\n"
    (d / "cls_train.tsv").write_text(cls_rows(300))
    (d / "cls_dev.tsv").write_text(cls_rows(60))

    def ner_rows(n):
        out = []
        for _ in range(n):
            words = sentence(rng, 4).split()
            tags = ["O"] * 4
            for entity, kind in ((rng.choice(NAMES), "PER"), (rng.choice(CITIES), "LOC")):
                at = rng.randrange(len(words) + 1)
                words.insert(at, entity)
                tags.insert(at, "B-" + kind)
            out.append("\n".join(f"{w} X X {t}" for w, t in zip(words, tags)))
        return "-DOCSTART- -X- -X- O\n\n" + "\n\n".join(out) + "\n"
    (d / "ner_train.txt").write_text(ner_rows(300))
    (d / "ner_dev.txt").write_text(ner_rows(50))

    def mt_rows(n):
        rows = []
        for _ in range(n):
            src = [rng.choice(list(LEXICON)) for _ in range(rng.randint(2, 4))]
            rows.append(" ".join(src) + "\t" + " ".join(LEXICON[w] for w in src))
        return "\n".join(rows) + "\n"
    (d / "mt_train.tsv").write_text(mt_rows(600))
    (d / "mt_dev.tsv").write_text(mt_rows(30))
    gen = [{"prompt": f"{n} lives in", "completion": f" {c}"}
           for n, c in zip(NAMES, CITIES)] * 8
    (d / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen) + "\n")
    return d


def pretrained(tmp_path_factory, data, preset, kind, family, **over):
    """A tiny 'pretrained' checkpoint with a tokenizer trained on the corpus."""
    out = tmp_path_factory.mktemp(preset)
    size = 400 if kind == "bpe" else 200  # byte-level BPE starts from 256 bytes
    tok = Tokenizer.train([data / "corpus.txt"], kind, size, family=family)
    cfg = lmkit.preset(preset, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                       eos_id=tok.eos_id if family != "encoder" else None, **over)
    model = lmkit.Model(cfg)
    model.save(out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, data):
    return pretrained(tmp_path_factory, data, "tiny-encoder", "wordpiece", "encoder")


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory, data):
    # BART-style learned positions: T5's relative scheme gives cross-attention no position
    # signal, which a model this small does not learn to align in a few hundred steps.
    return pretrained(tmp_path_factory, data, "tiny-seq2seq", "bpe", "encoder-decoder",
                      decoder_start_id=0, position="learned", norm="layernorm",
                      scale_attention=True, output_scale=1.0)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, data):
    return pretrained(tmp_path_factory, data, "tiny-decoder", "bpe", "decoder", bos_id=None)


def run(tmp_path, checkpoint, **kw):
    cfg = FinetuneConfig(out=str(tmp_path / "run"), progress=False, tensorboard=False,
                         plot=False, **kw)
    return finetune(checkpoint, cfg)


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_classification(tmp_path, data, encoder, scheme):
    res = run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
              dev=str(data / "cls_dev.tsv"), epochs=6, lr=2e-3, batch_size=16, scheme=scheme,
              lora_rank=4, lora_targets=["q", "k", "v", "o", "up", "down"])
    assert res.new_tensors == ["head.proj.bias", "head.proj.weight"]
    assert res.metrics["accuracy"] > 85, res.metrics
    if scheme == "lora":
        assert res.trainable < res.total / 3
        assert (res.out_dir / "adapter" / "adapter.safetensors").exists()
    assert evaluate_run(res.out_dir, data / "cls_dev.tsv") == pytest.approx(res.metrics)
    clf = pipeline(None, res.out_dir)
    one = clf("the lovely day with alice")
    assert one["label"] in ("neg", "pos") and set(one["scores"]) == {"neg", "pos"}
    assert one["score"] == max(one["scores"].values()) and sum(one["scores"].values()) == \
        pytest.approx(1)
    dev = read_classification(data / "cls_dev.tsv")
    preds = clf([e.text for e in dev])  # the pipeline agrees with the reported accuracy
    hits = sum(p["label"] == e.label for p, e in zip(preds, dev))
    assert 100 * hits / len(dev) == pytest.approx(res.metrics["accuracy"])
    card = (res.out_dir / "README.md").read_text()
    assert "classification" in card and "FLOPs" in card
    assert lmkit.load(res.out_dir).config.lora is None  # merged into a plain checkpoint


def test_ner(tmp_path, data, encoder):
    res = run(tmp_path, encoder, task="ner", train=str(data / "ner_train.txt"),
              dev=str(data / "ner_dev.txt"), epochs=6, lr=2e-3, batch_size=16)
    assert res.metrics["f1"] > 85, res.metrics
    text = "today  alice went to paris"
    spans = lmkit.pipeline("ner", res.out_dir)(text)
    assert [(s["type"], text[s["start"]:s["end"]]) for s in spans] == [("PER", "alice"),
                                                                        ("LOC", "paris")]
    assert all(0 < s["score"] <= 1 for s in spans)


def test_translation_encoder_decoder(tmp_path, data, seq2seq):
    res = run(tmp_path, seq2seq, task="translation", train=str(data / "mt_train.tsv"),
              dev=str(data / "mt_dev.tsv"), epochs=12, lr=3e-3, batch_size=16, num_beams=2)
    assert res.metrics["bleu"] > 50 and res.metrics["chrf"] > 60, res.metrics
    translate = lmkit.pipeline("translation", res.out_dir)
    assert isinstance(translate("alice went to paris"), str)
    dev = read_seq2seq(data / "mt_dev.tsv")  # the pipeline reproduces the reported score
    hyps = translate([e.source for e in dev])
    assert bleu(hyps, [e.target for e in dev])["bleu"] == pytest.approx(res.metrics["bleu"])


def test_generation_decoder(tmp_path, data, decoder):
    res = run(tmp_path, decoder, task="generation", train=str(data / "gen.jsonl"),
              dev=str(data / "gen.jsonl"), dev_limit=6, epochs=25, lr=3e-3, batch_size=8,
              max_new_tokens=4)
    assert res.metrics["perplexity"] < 1.5, res.metrics
    gen = lmkit.pipeline("generation", res.out_dir, max_new_tokens=4)
    assert gen("carol lives in").strip() == "oslo"


def test_frozen_body_keeps_pretrained_weights(tmp_path, data, encoder):
    res = run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
              steps=5, scheme="frozen", batch_size=8)
    before, after = lmkit.load(encoder), lmkit.load(res.out_dir)
    assert torch.equal(before.encoder.layers[0].attn.q.weight,
                       after.encoder.layers[0].attn.q.weight)
    assert res.trainable == 64 * 2 + 2


def test_bad_input_names_file_and_line(tmp_path, data, encoder, decoder):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nfine day\tpos\nodd one\tneutral\n")
    with pytest.raises(DataError, match=r"dev.tsv:3.*'neutral'"):
        run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
            dev=str(dev), steps=1)
    broken = tmp_path / "broken.txt"
    broken.write_text("alice B-PER\nparis\n")
    with pytest.raises(DataError, match=r"broken.txt:2"):
        run(tmp_path, encoder, task="ner", train=str(broken), steps=1)
    with pytest.raises(ValueError, match="translation task needs a encoder-decoder or decoder"):
        run(tmp_path, encoder, task="translation", train=str(data / "mt_train.tsv"), steps=1)
    with pytest.raises(ValueError, match="unknown task 'sentiment'"):
        run(tmp_path, encoder, task="sentiment", train=str(data / "cls_train.tsv"), steps=1)
