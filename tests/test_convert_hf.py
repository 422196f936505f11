"""Parity with `transformers` (the reference; lmkit itself never imports it).

For every family a tiny randomly initialised transformers model is saved with save_pretrained,
loaded by lmkit, and compared in fp32 with padding in the batch: hidden states / logits,
greedy generation, and the folder lmkit exports back to HF format.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil

import pytest
import torch
import transformers as tf

import lmkit
from lmkit.convert import save_hf
from lmkit.finetune import FinetuneConfig, finetune
from lmkit.loading import convert
from lmkit.tokenizer import Tokenizer

V = 99  # vocabulary of the tiny models; ids 0-3 are special in every case below
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           vocab_size=V, max_position_embeddings=64)
# RoBERTa's position table has pad_id + 1 = 2 extra rows
ROBERTA = {**ENC, "max_position_embeddings": 66, "pad_token_id": 1}
LABELS = dict(id2label={0: "neg", 1: "pos", 2: "mixed"})
GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2,
            eos_token_id=2)
LLAMA = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, rope_theta=500.0, bos_token_id=1,
             eos_token_id=2)
T5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16,
          decoder_start_token_id=0)
MT5 = {**T5, "d_kv": 16, "num_decoder_layers": 1}  # gated-gelu, never scaled
# 3 blocks: global, local (a window of 2 positions each side), global; rope bases apart
MODERNBERT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=64, local_attention=4,
                  global_attn_every_n_layers=2, global_rope_theta=1000.0,
                  local_rope_theta=50.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  cls_token_id=1, sep_token_id=2)
S2S = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
           decoder_ffn_dim=64, max_position_embeddings=64)
CASES = {
    "bert": (tf.BertForMaskedLM, tf.BertConfig(**ENC)),
    "bert-cls": (tf.BertForSequenceClassification,
                 tf.BertConfig(**ENC, id2label={0: "neg", 1: "pos", 2: "mixed"})),
    "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig(**ROBERTA, type_vocab_size=1)),
    "roberta-tok": (tf.RobertaForTokenClassification, tf.RobertaConfig(**ROBERTA, num_labels=4)),
    "roberta-cls": (tf.RobertaForSequenceClassification, tf.RobertaConfig(**ROBERTA, **LABELS)),
    "bert-tok": (tf.BertForTokenClassification, tf.BertConfig(**ENC, num_labels=5)),
    "xlm-roberta": (tf.XLMRobertaForMaskedLM, tf.XLMRobertaConfig(**ROBERTA, type_vocab_size=1)),
    "xlm-roberta-cls": (tf.XLMRobertaForSequenceClassification,
                        tf.XLMRobertaConfig(**ROBERTA, **LABELS)),
    # a pad id other than 1: positions start at pad_id + 1 = 4
    "xlm-roberta-tok": (tf.XLMRobertaForTokenClassification,
                        tf.XLMRobertaConfig(**{**ROBERTA, "pad_token_id": 3,
                                               "max_position_embeddings": 68}, num_labels=4)),
    "distilbert": (tf.DistilBertForMaskedLM,
                   tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                       max_position_embeddings=64)),
    "distilbert-cls": (tf.DistilBertForSequenceClassification,
                       tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4,
                                           hidden_dim=64, max_position_embeddings=64)),
    "distilbert-tok": (tf.DistilBertForTokenClassification,
                       tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4,
                                           hidden_dim=64, max_position_embeddings=64,
                                           num_labels=3)),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(**GPT2)),
    # HF pools the last token that is not pad_token_id; lmkit the last real one (the same here)
    "gpt2-cls": (tf.GPT2ForSequenceClassification,
                 tf.GPT2Config(**GPT2, pad_token_id=0, **LABELS)),
    "gpt2-tok": (tf.GPT2ForTokenClassification, tf.GPT2Config(**GPT2, num_labels=4)),
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**LLAMA)),
    "llama-cls": (tf.LlamaForSequenceClassification,
                  tf.LlamaConfig(**LLAMA, pad_token_id=0, **LABELS)),
    "llama-tok": (tf.LlamaForTokenClassification, tf.LlamaConfig(**LLAMA, num_labels=4)),
    "llama-tied": (tf.LlamaForCausalLM,
                   tf.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1,
                                  intermediate_size=64, tie_word_embeddings=True,
                                  attention_bias=True, bos_token_id=1, eos_token_id=2)),
    "bart": (tf.BartForConditionalGeneration, tf.BartConfig(**S2S, scale_embedding=True)),
    "bart-cls": (tf.BartForSequenceClassification, tf.BartConfig(**S2S, num_labels=3)),
    "marian": (tf.MarianMTModel,
               tf.MarianConfig(**S2S, decoder_vocab_size=V, pad_token_id=3, eos_token_id=2,
                               decoder_start_token_id=3, activation_function="swish",
                               scale_embedding=True)),
    "t5": (tf.T5ForConditionalGeneration, tf.T5Config(**T5)),
    "t5-encoder": (tf.T5EncoderModel, tf.T5Config(**T5)),
    "mt5": (tf.MT5ForConditionalGeneration, tf.MT5Config(**MT5)),
    "mt5-encoder": (tf.MT5EncoderModel, tf.MT5Config(**MT5)),
    "modernbert": (tf.ModernBertForMaskedLM, tf.ModernBertConfig(**MODERNBERT)),
    "modernbert-cls": (tf.ModernBertForSequenceClassification,
                       tf.ModernBertConfig(**MODERNBERT, classifier_pooling="mean", **LABELS)),
    "t5-v1.1": (tf.T5ForConditionalGeneration,
                tf.T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                            num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                            tie_word_embeddings=False, relative_attention_num_buckets=8,
                            relative_attention_max_distance=16, decoder_start_token_id=0)),
}
GENERATIVE = [k for k, (cls, _) in CASES.items()
              if cls.__name__.endswith(("LMHeadModel", "CausalLM", "Generation", "MTModel"))]


def _randomise(model: torch.nn.Module) -> None:
    """Every parameter and buffer random (HF zero-initialises biases; a mix-up of two zero
    tensors would go unnoticed), norms near 1 so activations stay in a sane range."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            fixed = "inv_freq" in name or (isinstance(model, tf.MarianMTModel) and
                                           "embed_positions" in name)  # computed, not stored
            if not t.is_floating_point() or fixed:
                continue
            noise = torch.randn(t.shape, generator=g)
            norm = "norm" in name.lower() and name.endswith("weight")
            t.copy_(1 + 0.1 * noise if norm else 0.3 * noise)


def saved_models(cases: dict, tmp_path_factory):
    """get(case) -> (folder, reference model): a random tiny transformers model of each case
    (class, config), saved with save_pretrained once."""
    made: dict[str, tuple] = {}

    def get(case: str):
        if case not in made:
            cls, config = cases[case]
            torch.manual_seed(0)
            model = cls(config).eval()
            _randomise(model)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            made[case] = (path, model)
        return made[case]
    return get


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Saved HF folders, made once per case; returns (folder, reference model)."""
    return saved_models(CASES, tmp_path_factory)


def _batch(case: str, model) -> dict[str, torch.Tensor]:
    """Two rows, the second padded (on the left for decoder-only models)."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    left = not cfg.is_encoder_decoder and "bert" not in case and "roberta" not in case \
        and "encoder" not in case
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    if left:
        ids[1, :3], mask[1, :3] = pad, 0
    else:
        ids[1, 4:], mask[1, 4:] = pad, 0
    if case.startswith("bart"):  # BART pools / ends at EOS: one per row
        ids[0, -1], ids[1, 3] = cfg.eos_token_id, cfg.eos_token_id
    out = {"input_ids": ids, "attention_mask": mask}
    if case.startswith("bert"):
        out["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=g)
    if cfg.is_encoder_decoder and case != "bart-cls":
        dec = torch.randint(4, V, (2, 5), generator=g)
        dec[:, 0] = cfg.decoder_start_token_id
        dmask = torch.ones_like(dec)
        dmask[1, 3:] = 0
        out.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    return out


def _hf_outputs(model, batch: dict) -> torch.Tensor:
    """Logits, or the hidden states of a model without a head (T5EncoderModel)."""
    kwargs = dict(batch)
    if not model.config.is_encoder_decoder and "token_type_ids" not in batch and \
            model.config.model_type in ("gpt2", "llama"):
        mask = batch["attention_mask"]  # positions restart after left padding, as in lmkit
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if "logits" in out else out.last_hidden_state


def _lmkit_outputs(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if out.logits is not None else out.hidden_states


def _real(batch: dict, out: torch.Tensor) -> torch.Tensor:
    """The positions that hold real tokens (padding rows may differ between libraries)."""
    if out.dim() == 2:
        return out
    mask = batch.get("decoder_attention_mask", batch["attention_mask"])
    return out[mask.bool()]


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_transformers(case, hf_dir):
    path, ref = hf_dir(case)
    model = lmkit.load(path)
    assert not model.training and model.new_tensors == []
    batch = _batch(case, ref)
    expected = _hf_outputs(ref, batch)
    got = _lmkit_outputs(model, batch)
    assert got.shape == expected.shape
    torch.testing.assert_close(_real(batch, got), _real(batch, expected), atol=1e-5, rtol=1e-5)
    if model.config.family == "encoder":  # the body alone, too
        with torch.no_grad():
            hidden = ref.base_model(**batch).last_hidden_state
        torch.testing.assert_close(_real(batch, model(**batch).hidden_states),
                                   _real(batch, hidden), atol=1e-5, rtol=1e-5)


def _until(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("case", GENERATIVE)
def test_greedy_generation_matches_transformers(case, hf_dir):
    path, ref = hf_dir(case)
    model = lmkit.load(path)
    cfg = model.config
    prompts = [[5, 17, 42, 8, 61], [33, 9]]
    eos = cfg.eos_id
    got = lmkit.generate(model, prompts, max_new_tokens=8).sequences
    gen = dict(do_sample=False, num_beams=1, max_new_tokens=8, eos_token_id=eos,
               pad_token_id=cfg.pad_id if cfg.pad_id is not None else eos)
    batch = _batch(case, ref)
    ids, mask = batch["input_ids"][:, :5].clone(), torch.ones(2, 5, dtype=torch.long)
    pad = gen["pad_token_id"]
    if cfg.family == "decoder":
        ids[0], ids[1] = torch.tensor(prompts[0]), torch.tensor([pad] * 3 + prompts[1])
        mask[1, :3] = 0
    else:
        ids[0], ids[1] = torch.tensor(prompts[0]), torch.tensor(prompts[1] + [pad] * 3)
        mask[1, 2:] = 0
        gen["decoder_start_token_id"] = cfg.decoder_start_id
    # On top of the checkpoint's own generation settings (BART's forced_eos_token_id), which
    # lmkit applies too.
    out = ref.generate(input_ids=ids, attention_mask=mask, **gen)
    start = ids.shape[1] if cfg.family == "decoder" else 1
    expected = [_until(row[start:].tolist(), eos) for row in out]
    assert got == expected
    assert any(len(s) > 2 for s in got)  # a real comparison, not two empty lists


@pytest.mark.parametrize("case", ["gpt2", "llama", "bart", "marian", "t5"])
def test_beam_search_matches_transformers(case, hf_dir):
    """Same beams and scores as transformers' beam search, EOS and length penalty included
    (on weights laid out for decoding: `generate` does it at its first call)."""
    path, ref = hf_dir(case)
    model = lmkit.load(path)
    cfg = model.config
    prompt = [5, 17, 42, 8, 61]
    eos = cfg.eos_id
    got = lmkit.generate(model, [prompt], max_new_tokens=7, num_beams=4, length_penalty=0.8,
                         num_return_sequences=2)
    gen = dict(do_sample=False, num_beams=4, num_return_sequences=2, max_new_tokens=7,
               length_penalty=0.8, early_stopping=True, eos_token_id=eos,
               output_scores=True, return_dict_in_generate=True,
               pad_token_id=cfg.pad_id if cfg.pad_id is not None else eos)
    if cfg.family != "decoder":
        gen["decoder_start_token_id"] = cfg.decoder_start_id
    out = ref.generate(input_ids=torch.tensor([prompt]), **gen)
    start = len(prompt) if cfg.family == "decoder" else 1
    assert got.sequences == [_until(row[start:].tolist(), eos) for row in out.sequences]
    assert got.scores == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)
    assert any(len(s) > 2 for s in got.sequences)  # a real comparison


@pytest.mark.parametrize("case", list(CASES))
def test_export_to_hf_reloads_in_transformers(case, hf_dir, tmp_path):
    path, ref = hf_dir(case)
    out = convert(path, tmp_path / "hf", to="hf")
    again = type(ref).from_pretrained(out).eval()
    batch = _batch(case, ref)
    torch.testing.assert_close(_real(batch, _hf_outputs(again, batch)),
                               _real(batch, _hf_outputs(ref, batch)), atol=1e-5, rtol=1e-5)


def test_convert_hf_to_lmkit_and_back(hf_dir, tmp_path):
    path, ref = hf_dir("t5-v1.1")
    native = convert(path, tmp_path / "native", to="lmkit")
    assert (native / "config.json").exists() and "model_type" not in \
        (native / "config.json").read_text()
    back = convert(native, tmp_path / "hf", to="hf")
    again = tf.T5ForConditionalGeneration.from_pretrained(back).eval()
    batch = _batch("t5-v1.1", ref)
    torch.testing.assert_close(_hf_outputs(again, batch), _hf_outputs(ref, batch))


def test_lmkit_presets_export_to_their_hf_family(tmp_path):
    """Models built in lmkit (not imported) pick the HF family that computes the same thing."""
    expect = {"tiny-encoder": "bert", "tiny-decoder": "llama", "tiny-seq2seq": "t5"}
    for name, model_type in expect.items():
        model = lmkit.Model(lmkit.preset(name)).eval()
        out = save_hf(model, tmp_path / name)
        assert f'"model_type": "{model_type}"' in (out / "config.json").read_text()
        back = lmkit.load(out)
        ids = torch.randint(4, 500, (2, 6))
        kwargs = {"decoder_input_ids": ids[:, :4]} if model.config.has_decoder and \
            model.config.has_encoder else {}
        with torch.no_grad():
            torch.testing.assert_close(back(ids, **kwargs).logits, model(ids, **kwargs).logits)


def test_export_refuses_configs_no_hf_family_expresses(tmp_path):
    model = lmkit.Model(lmkit.preset("tiny-decoder", position="sinusoidal"))
    with pytest.raises(lmkit.CheckpointError, match="cannot be written.*position"):
        save_hf(model, tmp_path / "x")
    with pytest.raises(lmkit.CheckpointError, match="closest is gpt2"):
        save_hf(lmkit.Model(lmkit.preset("tiny-decoder", position="learned", norm="layernorm",
                                         gated_mlp=False, num_kv_heads=None,
                                         activation="gelu_tanh")), tmp_path / "y",
                model_type="gpt2")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# Bare bodies (no head) of the families with a sequence-classification head in lmkit.
BODIES = {
    "bert": (tf.BertModel, tf.BertConfig(**ENC)),
    "distilbert": (tf.DistilBertModel,
                   tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                       max_position_embeddings=64)),
    "roberta": (tf.RobertaModel, tf.RobertaConfig(**ROBERTA)),
    "xlm-roberta": (tf.XLMRobertaModel, tf.XLMRobertaConfig(**ROBERTA)),
    "gpt2": (tf.GPT2Model, tf.GPT2Config(**GPT2, pad_token_id=0)),
    "llama": (tf.LlamaModel, tf.LlamaConfig(**LLAMA, pad_token_id=0)),
    "modernbert": (tf.ModernBertModel, tf.ModernBertConfig(**MODERNBERT)),
    "bart": (tf.BartModel, tf.BartConfig(**S2S)),
}


@pytest.mark.parametrize("body", list(BODIES))
def test_trained_classifier_exports_to_transformers(body, tmp_path):
    """A new classification head on an HF body, trained a few steps in lmkit (body too), then
    exported: AutoModelForSequenceClassification gives the same logits and label names."""
    cls, config = BODIES[body]
    torch.manual_seed(0)
    ref = cls(config).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path / "body")
    names = ["neg", "pos", "mixed"]
    model = lmkit.load(tmp_path / "body", head="classification", label_names=names)
    batch = _batch(f"{body}-cls", ref)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
    model.eval()
    out = save_hf(model, tmp_path / "hf")
    again = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert again.config.id2label == dict(enumerate(names))
    assert again.config.label2id == {n: i for i, n in enumerate(names)}
    expected = _lmkit_outputs(model, batch)
    assert not torch.allclose(expected, _lmkit_outputs(lmkit.load(
        tmp_path / "body", head="classification", label_names=names), batch))  # it trained
    torch.testing.assert_close(_hf_outputs(again, batch), expected, atol=1e-5, rtol=1e-5)


def test_finetuned_classifier_converts_to_transformers(tmp_path):
    """`lmkit.finetune` on a Hugging Face Llama body with its tokenizer, then `convert` of the
    run's folder: transformers loads a LlamaForSequenceClassification with the run's labels
    and the same logits on a padded batch of real text."""
    rng = random.Random(0)
    good, bad, filler = ["good", "great", "fine"], ["bad", "awful", "poor"], "the a was very so"
    rows = ["sentence\tlabel"]
    for _ in range(64):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(filler.split(), 3) + [rng.choice(good if label == "pos" else bad)]
        rows.append(" ".join(words) + "\t" + label)
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "corpus.txt").write_text("\n\n".join(r.split("\t")[0] for r in rows[1:]))
    tok = Tokenizer.train([tmp_path / "corpus.txt"], "bpe", 300, family="decoder")
    config = tf.LlamaConfig(**{**LLAMA, "vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id,
                               "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
    torch.manual_seed(0)
    tf.LlamaModel(config).save_pretrained(tmp_path / "body")
    tok.save(tmp_path / "body")
    res = finetune(tmp_path / "body", FinetuneConfig(
        out=str(tmp_path / "run"), task="classification", train=str(tmp_path / "train.tsv"),
        steps=4, batch_size=8, progress=False, tensorboard=False, plot=False))
    out = convert(res.out_dir, tmp_path / "hf", to="hf")
    again = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    model = lmkit.load(res.out_dir)
    assert isinstance(again, tf.LlamaForSequenceClassification)
    assert list(again.config.id2label.values()) == model.config.label_names
    ids = tok.encode_batch(["the very good", "a so awful was the"])
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in ids])
    mask = (torch.arange(width) >= torch.tensor([[width - len(r)] for r in ids])).long()
    batch = {"input_ids": input_ids, "attention_mask": mask}
    torch.testing.assert_close(_hf_outputs(again, batch), _lmkit_outputs(model, batch),
                               atol=1e-5, rtol=1e-5)


def test_mt5_reads_its_unigram_tokenizer_and_generates_from_text(hf_dir, tmp_path):
    """An mT5 folder with the tokenizer.json transformers makes of mT5's SentencePiece model
    (Unigram, Metaspace, "</s>" appended): lmkit finds its pad / eos / unk, encodes as
    transformers does and generates the same tokens and text from text prompts."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors
    path, ref = hf_dir("mt5")
    folder = tmp_path / "mt5"
    shutil.copytree(path, folder)
    words = ["▁hello", "▁world", "▁bonjour", "▁le", "▁monde", "▁", "he", "llo", "wor", "ld",
             "mon", "de", "é"] + list("abcdefghijklmnopqrstuvwxyz")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + \
        [(w, -1.0 - i / 10) for i, w in enumerate(words)]
    backend = Backend(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                           special_tokens=[("</s>", 1)])
    backend.add_special_tokens(["<pad>", "</s>", "<unk>"])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    model = lmkit.load(folder)
    tok = model.tokenizer
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert (model.config.pad_id, model.config.eos_id) == (0, 1)
    reference = tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                           pad_token="<pad>", eos_token="</s>")
    texts = ["hello world", "bonjour le monde é"]
    ids = reference(texts, padding=True, return_tensors="pt")
    assert tok.encode_batch(texts) == reference(texts)["input_ids"]
    got = lmkit.generate(model, texts, max_new_tokens=6)
    ref.generation_config = tf.GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=6,
                                                eos_token_id=1, pad_token_id=0,
                                                decoder_start_token_id=0)
    out = ref.generate(**ids)
    expected = [_until(row[1:].tolist(), 1) for row in out]
    assert got.sequences == expected and any(len(s) > 2 for s in expected)
    assert got.texts == reference.batch_decode(expected, skip_special_tokens=True)


# ---- nothing dropped silently --------------------------------------------------------------
@pytest.mark.parametrize("cls", [tf.BertModel, tf.BertForPreTraining])
def test_bert_pooler_and_nsp_head_survive_export(cls, tmp_path):
    """BertModel's pooler and BertForPreTraining's pooler + next-sentence head: kept through
    load, an lmkit folder and export, with transformers' outputs unchanged."""
    torch.manual_seed(0)
    ref = cls(tf.BertConfig(**ENC)).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path / "src")
    batch = _batch("bert", ref)
    outputs = ("pooler_output",) if cls is tf.BertModel else ("seq_relationship_logits",
                                                               "prediction_logits")
    model = lmkit.load(tmp_path / "src")
    lmkit.save(model, tmp_path / "lmkit")
    for source in (model, lmkit.load(tmp_path / "lmkit")):
        out = save_hf(source, tmp_path / "hf")
        again = cls.from_pretrained(out).eval()
        assert again.config.architectures == [cls.__name__]
        with torch.no_grad():
            want, got = ref(**batch), again(**batch)
        for name in outputs:
            torch.testing.assert_close(getattr(got, name), getattr(want, name))


def test_bert_vocab_txt_settings_carried_both_ways(tmp_path):
    """A BERT folder with only vocab.txt honours strip_accents / tokenize_chinese_chars /
    do_lower_case from tokenizer_config.json; the export keeps them and model_max_length."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "café", "cafe", "élan", "elan",
             "東", "京", "東京", "is", "in", "tokyo", "##s", "the", "naïve", "naive", "##é"]
    src = tmp_path / "src"
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(**ENC)).save_pretrained(src)
    (src / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(V - len(words))]))
    texts = ["Café ÉLAN in 東京 is naïve", "the cafés of Tokyo 東京"]
    seen = []
    for settings in ({"do_lower_case": True, "strip_accents": False,
                      "tokenize_chinese_chars": False},
                     {"do_lower_case": True},
                     {"do_lower_case": False, "strip_accents": True}):
        config = {**settings, "tokenizer_class": "BertTokenizer", "model_max_length": 12}
        (src / "tokenizer_config.json").write_text(json.dumps(config))
        want = tf.AutoTokenizer.from_pretrained(src)(texts)["input_ids"]
        model = lmkit.load(src)
        assert model.tokenizer.encode_batch(texts) == want
        exported = tf.AutoTokenizer.from_pretrained(save_hf(model, tmp_path / "hf"))
        assert exported(texts)["input_ids"] == want
        assert exported.model_max_length == 12
        assert len(exported(texts[0] * 3, truncation=True)["input_ids"]) == 12
        assert lmkit.load(tmp_path / "hf").tokenizer.encode_batch(texts) == want
        seen.append(want)
    assert len({str(w) for w in seen}) == 3  # each setting changes the ids


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_convert_dtype_writes_that_format(dtype, hf_dir, tmp_path, capsys):
    from safetensors import safe_open

    from lmkit.cli import main

    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    path, ref = hf_dir("llama")
    for to in ("hf", "lmkit"):
        out = tmp_path / to
        assert main(["convert", str(path), str(out), "--to", to, "--dtype", dtype]) == 0
        with safe_open(out / "model.safetensors", "pt") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{name}"}  # noqa: SIM118
        assert json.loads((out / "config.json").read_text())["dtype"] == name
    # the export computes what the original does with its weights rounded to that format
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    rounded = copy.deepcopy(ref)
    with torch.no_grad():
        for t in rounded.parameters():
            t.copy_(t.to(getattr(torch, name)).float())
    batch = _batch("llama", ref)
    torch.testing.assert_close(_real(batch, _hf_outputs(again, batch)),
                               _real(batch, _hf_outputs(rounded, batch)), atol=1e-5, rtol=1e-5)


def test_convert_names_what_it_cannot_carry_in_one_line(hf_dir, tmp_path, caplog):
    path, _ = hf_dir("bert")
    extra = tmp_path / "src"
    shutil.copytree(path, extra)
    (extra / "modules.json").write_text("[]")
    (extra / "README.md").write_text("# card")
    (extra / "1_Pooling").mkdir()
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        convert(extra, tmp_path / "hf")
    lines = [r.getMessage() for r in caplog.records if "not carried" in r.getMessage()]
    # README.md is carried: the converted folder's card keeps the source card's text
    assert len(lines) == 1 and lines[0].endswith("not carried: files 1_Pooling/, modules.json")
    assert "# card" in (tmp_path / "hf" / "README.md").read_text()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        convert(tmp_path / "hf", tmp_path / "again")
    assert not [r for r in caplog.records if "not carried" in r.getMessage()]


@pytest.mark.parametrize("case, expected", [("bert", 0.0), ("distilbert", 0.0), ("gpt2", 0.0),
                                            ("bart", 0.3), ("t5", 0.1)])
def test_mlp_dropout_where_the_family_has_it(case, expected, tmp_path):
    """The MLP's hidden activations are dropped only where transformers drops them (T5's
    dropout_rate, BART's activation_dropout; never in BERT or GPT-2), and BART's rate goes
    back on export; in train mode a zero rate leaves the MLP deterministic."""
    cls, config = CASES[case]
    config = copy.deepcopy(config)
    if case == "bart":
        config.activation_dropout = 0.3
    cls(config).save_pretrained(tmp_path / "hf")
    model = lmkit.load(tmp_path / "hf").train()
    mlp = model.blocks()[0][1].mlp
    assert mlp.drop.p == pytest.approx(expected)
    if case == "bart":
        save_hf(model, tmp_path / "back")
        saved = json.loads((tmp_path / "back" / "config.json").read_text())
        assert saved["activation_dropout"] == pytest.approx(0.3)
    if expected == 0.0:
        x = torch.randn(2, 5, model.config.hidden_size)
        torch.testing.assert_close(mlp(x), mlp(x), rtol=0, atol=0)
