"""Parity with `transformers` (the reference; lmkit itself never imports it).

For every family a tiny randomly initialised transformers model is saved with save_pretrained,
loaded by lmkit, and compared in fp32 with padding in the batch: hidden states / logits,
greedy generation, and the folder lmkit exports back to HF format.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
import transformers as tf

import lmkit
from lmkit.convert import save_hf
from lmkit.loading import convert

V = 99  # vocabulary of the tiny models; ids 0-3 are special in every case below
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           vocab_size=V, max_position_embeddings=64)
# RoBERTa's position table has pad_id + 1 = 2 extra rows
ROBERTA = {**ENC, "max_position_embeddings": 66, "pad_token_id": 1}
S2S = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
           decoder_ffn_dim=64, max_position_embeddings=64)
CASES = {
    "bert": (tf.BertForMaskedLM, tf.BertConfig(**ENC)),
    "bert-cls": (tf.BertForSequenceClassification,
                 tf.BertConfig(**ENC, id2label={0: "neg", 1: "pos", 2: "mixed"})),
    "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig(**ROBERTA, type_vocab_size=1)),
    "roberta-tok": (tf.RobertaForTokenClassification, tf.RobertaConfig(**ROBERTA, num_labels=4)),
    "distilbert": (tf.DistilBertForMaskedLM,
                   tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                       max_position_embeddings=64)),
    "distilbert-cls": (tf.DistilBertForSequenceClassification,
                       tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4,
                                           hidden_dim=64, max_position_embeddings=64)),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                               n_positions=64, bos_token_id=2, eos_token_id=2)),
    "llama": (tf.LlamaForCausalLM,
              tf.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                             rope_theta=500.0, bos_token_id=1, eos_token_id=2)),
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
    "t5": (tf.T5ForConditionalGeneration,
           tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                       decoder_start_token_id=0)),
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


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Saved HF folders, made once per case; returns (folder, reference model)."""
    made: dict[str, tuple] = {}

    def get(case: str):
        if case not in made:
            cls, config = CASES[case]
            torch.manual_seed(0)
            model = cls(config).eval()
            _randomise(model)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            made[case] = (path, model)
        return made[case]
    return get


def _batch(case: str, model) -> dict[str, torch.Tensor]:
    """Two rows, the second padded (on the left for decoder-only models)."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    left = not cfg.is_encoder_decoder and "bert" not in case and "roberta" not in case
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
    kwargs = dict(batch)
    if not model.config.is_encoder_decoder and "token_type_ids" not in batch and \
            isinstance(model, (tf.GPT2LMHeadModel, tf.LlamaForCausalLM)):
        mask = batch["attention_mask"]  # positions restart after left padding, as in lmkit
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**kwargs).logits


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
    with torch.no_grad():
        got = model(**batch).logits
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
    assert len(lines) == 1 and lines[0].endswith("not carried: files 1_Pooling/, README.md, "
                                                 "modules.json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        convert(tmp_path / "hf", tmp_path / "again")
    assert not [r for r in caplog.records if "not carried" in r.getMessage()]
