"""`lmkit evaluate` on language models: the same figures as transformers on the same model
and text (perplexity with the sliding window of the transformers perplexity guide, bits per
byte by its definition, BERT pseudo-perplexity by direct masking, T5 / BART teacher-forced
loss), and the dispatch between task scores and perplexity, in Python and in the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch
import transformers as tf

import lmkit
from lmkit.evaluation import evaluate, language_model_scores, windows
from lmkit.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog; the café serves naïve crêpes. "
        "Sphinx of black quartz, judge my vow. Pack my box with five dozen liquor jugs. ")
DOCS = [TEXT * 3, "How vexingly quick daft zebras jump! " * 2, TEXT]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval")
    (d / "corpus.txt").write_text("\n\n".join(DOCS) + "\n")
    return d


def _hf_folder(d: Path, model: torch.nn.Module, tok: Tokenizer, name: str) -> Path:
    out = d / name
    model.save_pretrained(out)
    tok.save(out)
    return out


def _ids(folder: Path, text: str) -> list[int]:
    """The reference tokenization: the `tokenizers` library on the folder's tokenizer.json."""
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


@pytest.fixture(scope="module")
def gpt2(corpus):
    tok = Tokenizer.train([corpus / "corpus.txt"], "bpe", 300, family="decoder")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        initializer_range=0.3, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)).eval()
    return _hf_folder(corpus, model, tok, "gpt2"), model


def guide_nll(model, ids: list[int], max_length: int, stride: int, docs_count: bool
              ) -> tuple[float, int]:
    """The sliding-window loop of the transformers perplexity guide on one text: (summed
    NLL, tokens). `docs_count`: count tokens as the guide does (valid labels minus one per
    window); else count the labels the loss really used after its shift (the guide's count
    is one short on every window after the first when stride < max_length)."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        if docs_count:
            count = int((target_ids != -100).sum()) - target_ids.size(0)
        else:
            count = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * count
        n_tokens += count
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("max_length,stride", [(64, 64), (32, 32), (32, 16), (24, 5)])
def test_perplexity_equals_the_transformers_guide(corpus, gpt2, max_length, stride):
    folder, hf = gpt2
    assert len(_ids(folder, DOCS[0])) > 2 * max_length  # really slides
    nll = count = 0
    for doc in DOCS:
        n, c = guide_nll(hf, _ids(folder, doc), max_length, stride, docs_count=False)
        nll, count = nll + n, count + c
        if stride == max_length:  # no overlap: the guide's own count is exact
            assert guide_nll(hf, _ids(folder, doc), max_length, stride, True)[1] == c
    got = language_model_scores(lmkit.load(folder), corpus / "corpus.txt",
                                max_length=max_length, stride=stride, batch_size=3)
    assert got["tokens"] == count
    if stride < max_length:  # overlapping windows predict every token but the first
        assert count == sum(len(_ids(folder, d)) - 1 for d in DOCS)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got["loss"] == pytest.approx(nll / count, rel=1e-4)
    # bits per byte: the summed NLL in bits over the UTF-8 bytes of the text
    nbytes = sum(len(d.encode("utf-8")) for d in DOCS)
    assert nbytes > sum(map(len, DOCS))  # the accents take two bytes
    assert got["bytes"] == nbytes
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)


def test_windows_score_every_token_once():
    for n, length, stride in ((100, 32, 16), (100, 32, 32), (7, 32, 3), (33, 32, 1)):
        spans = list(windows(n, length, stride))
        scored = [t for _, end, new in spans for t in range(end - new, end)]
        assert scored == list(range(n)) and all(e - b <= length for b, e, _ in spans)
    with pytest.raises(ValueError, match="stride must be between 1 and max_length=8"):
        list(windows(10, 8, 9))


def test_pseudo_perplexity_equals_direct_masking(corpus):
    tok = Tokenizer.train([corpus / "corpus.txt"], "wordpiece", 200, family="encoder")
    torch.manual_seed(0)
    hf = tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, initializer_range=0.3,
        pad_token_id=tok.pad_id)).eval()
    folder = _hf_folder(corpus, hf, tok, "bert")
    nll = count = 0
    for doc in DOCS[1:]:
        ids = _ids(folder, doc)  # [CLS] ... [SEP]
        assert len(ids) <= 128
        for i in range(1, len(ids) - 1):
            masked = torch.tensor([ids])
            masked[0, i] = tok.mask_id
            with torch.no_grad():
                logp = hf(masked).logits[0, i].log_softmax(-1)
            nll, count = nll - float(logp[ids[i]]), count + 1
    (corpus / "short.txt").write_text("\n\n".join(DOCS[1:]) + "\n")
    model = lmkit.load(folder)
    got = language_model_scores(model, corpus / "short.txt", batch_size=16)
    assert got["tokens"] == count
    assert got["pseudo_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    # long texts in windows: still each text token masked once (specials never)
    windowed = language_model_scores(model, corpus / "corpus.txt", max_length=24, stride=8)
    assert windowed["tokens"] == sum(len(_ids(folder, d)) - 2 for d in DOCS)
    assert math.isfinite(windowed["pseudo_perplexity"])


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_loss_equals_transformers(corpus, family):
    tok = Tokenizer.train([corpus / "corpus.txt"], "unigram", 200, family="encoder-decoder")
    common = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                  decoder_start_token_id=tok.pad_id)
    torch.manual_seed(0)
    if family == "t5":
        hf = tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, initializer_factor=3.0,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, **common))
    else:
        hf = tf.BartForConditionalGeneration(tf.BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=128, init_std=0.3, bos_token_id=tok.pad_id, **common))
    hf.eval()
    folder = _hf_folder(corpus, hf, tok, family)
    pairs = [{"text": "judge my vow", "target": "pack my box"},
             {"text": "the lazy dog", "target": "the quick brown fox jumps"}]
    (corpus / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

    def reference(rows: list[tuple[str, str]]) -> float:
        nll = count = 0
        for source, target in rows:
            labels = torch.tensor([_ids(folder, target)])
            with torch.no_grad():
                loss = hf(input_ids=torch.tensor([_ids(folder, source)]), labels=labels).loss
            nll, count = nll + float(loss) * labels.numel(), count + labels.numel()
        return nll / count

    model = lmkit.load(folder)
    got = language_model_scores(model, corpus / "pairs.jsonl", target_column="target")
    assert got["loss"] == pytest.approx(reference([(p["text"], p["target"]) for p in pairs]),
                                        rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    alone = language_model_scores(model, corpus / "short.txt")  # the text is its own target
    assert alone["loss"] == pytest.approx(reference([(d, d) for d in DOCS[1:]]), rel=1e-4)


def test_cli_pretrains_from_parquet_and_evaluates(corpus, gpt2, capsys, monkeypatch):
    """`lmkit pretrain` on a Parquet text column, `lmkit evaluate` of the model on it (the
    same figure as the Python function), and of a fine-tuned run (task metrics). The CLI's
    entry point runs in this process: tests/test_cli.py runs these commands as processes."""
    from lmkit.cli import main

    def lmkit_cli(*args) -> dict | str:
        capsys.readouterr()
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err[-3000:]
        out = capsys.readouterr().out
        return json.loads(out) if out.startswith("{") else out

    d = corpus
    monkeypatch.chdir(d)
    rows = [{"body": doc, "label": i % 2} for i, doc in enumerate(DOCS * 10)]
    pq.write_table(pa.Table.from_pylist(rows), d / "docs.parquet", row_group_size=7)
    out = d / "lm"
    lmkit_cli("pretrain", "--preset", "tiny-decoder", "--data", d / "docs.parquet",
              "--text-column", "body", "--tokenizer", "bpe:300", "--steps", "2",
              "--seq-len", "32", "--batch-size", "4", "--out", out, "--set", "progress=false",
              "--set", "tensorboard=false", "--set", "plot=false")
    scores = lmkit_cli("evaluate", out, "--data", d / "docs.parquet", "--text-column", "body",
                       "--max-length", "32", "--stride", "16", "--limit", "3", "--device",
                       "cpu")
    same = evaluate(out, d / "docs.parquet", text_column="body", max_length=32, stride=16,
                    limit=3, device="cpu")
    assert scores["perplexity"] == pytest.approx(same["perplexity"], rel=1e-5)
    assert scores["documents"] == 3 and scores["stride"] == 16 and scores["bits_per_byte"] > 0

    run = d / "cls"
    lmkit_cli("finetune", out, "--task", "classification", "--train", d / "docs.parquet",
              "--text-column", "body", "--label-names", "odd,even", "--out", run,
              "--steps", "2", "--batch-size", "4", "--set", "progress=false", "--set",
              "tensorboard=false", "--set", "plot=false")
    assert lmkit.load(run).config.label_names == ["odd", "even"]
    task = lmkit_cli("evaluate", run, "--data", d / "docs.parquet", "--device", "cpu")
    assert set(task) >= {"accuracy", "macro_f1"}


def test_evaluate_refuses_what_it_cannot_score(corpus, tmp_path):
    tok = Tokenizer.train([corpus / "corpus.txt"], "wordpiece", 200, family="encoder")
    body = tmp_path / "body"
    lmkit.Model(lmkit.preset("tiny-encoder", vocab_size=tok.vocab_size, head="none",
                             pad_id=tok.pad_id)).save(body, tokenizer=tok)
    with pytest.raises(ValueError, match="has no head .* needs a language-model head"):
        evaluate(body, corpus / "corpus.txt")
    lm = tmp_path / "lm"
    lmkit.Model(lmkit.preset("tiny-encoder", vocab_size=tok.vocab_size, head="mlm",
                             pad_id=tok.pad_id)).save(lm, tokenizer=tok)
    with pytest.raises(ValueError, match="target_column is for encoder-decoder models"):
        evaluate(lm, corpus / "corpus.txt", target_column="target")
    with pytest.raises(ValueError, match="stride must be between 1 and max_length=16"):
        evaluate(lm, corpus / "corpus.txt", max_length=16, stride=32)
