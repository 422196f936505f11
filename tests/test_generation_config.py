"""Generation settings as part of a checkpoint: generation_config.json read, applied as the
defaults of `lmkit.generate`, saved in lmkit folders and written back on export so that
transformers generates the same from the export as from the original; EOS sets."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as tf

import lmkit
from lmkit.convert import save_hf
from lmkit.errors import ConfigError
from lmkit.generation_config import GenerationConfig

V = 99
S2S = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
           decoder_ffn_dim=64, max_position_embeddings=64)
SOURCES = torch.tensor([[5, 17, 42, 8, 61, 2], [33, 9, 70, 2, 1, 1]])  # BART: 2 = EOS, 1 = pad
ROWS = [[5, 17, 42, 8, 61, 2], [33, 9, 70, 2]]  # the same sources, unpadded


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "embed_positions" in name and isinstance(model, tf.MarianMTModel):
                continue  # computed, not stored
            norm = "norm" in name.lower() and name.endswith("weight")
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g) if norm
                    else 0.3 * torch.randn(t.shape, generator=g))


def _seq2seq(kind: str, tmp_path, **generation):
    """A random tiny BART or Marian saved with these generation settings."""
    if kind == "bart":
        model = tf.BartForConditionalGeneration(tf.BartConfig(**S2S))
    else:
        model = tf.MarianMTModel(tf.MarianConfig(**S2S, decoder_vocab_size=V, pad_token_id=1,
                                                 eos_token_id=2, decoder_start_token_id=1,
                                                 forced_eos_token_id=2))
    _randomise(model)
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    model.eval().save_pretrained(tmp_path / kind)
    return tmp_path / kind, model


def _hf_generate(model, **kwargs) -> list[list[int]]:
    mask = SOURCES.ne(model.config.pad_token_id).long()
    with torch.no_grad():
        out = model.generate(input_ids=SOURCES, attention_mask=mask, **kwargs)
    return out.tolist()


def test_read_apply_and_write_back_keys():
    raw = {"num_beams": 4, "max_length": 20, "forced_eos_token_id": [2], "eos_token_id": 2,
           "no_repeat_ngram_size": 3, "early_stopping": True, "transformers_version": "5",
           "min_length": 5, "num_beam_groups": 1, "typical_p": 0.5}
    gen = GenerationConfig.from_dict(raw)
    assert (gen.num_beams, gen.forced_eos_token_id, gen.eos_token_id) == (4, 2, [2])
    assert gen.ignored() == ["min_length=5", "typical_p=0.5"]  # neutral values and bookkeeping
    assert GenerationConfig.from_dict(gen.to_dict()) == gen  # carried keys survive too
    assert gen.to_dict()["transformers_version"] == "5"
    with pytest.raises(ConfigError, match="num_beams='4'"):
        GenerationConfig.from_dict({"num_beams": "4"})
    with pytest.raises(ConfigError, match="eos_token_id"):
        GenerationConfig.from_dict({"eos_token_id": [2, "x"]})
    # config.json of an older checkpoint: generation keys, not only special ids
    assert GenerationConfig.from_model_config({"eos_token_id": 2, "pad_token_id": 1}) is None
    legacy = GenerationConfig.from_model_config({"eos_token_id": 2, "num_beams": 4,
                                                 "min_length": 0, "hidden_size": 8})
    assert legacy.to_dict() == {"num_beams": 4, "eos_token_id": [2]}


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_forced_eos_survives_export(kind, tmp_path):
    """The export generates in transformers exactly what the original does (forced EOS, beam
    settings, a setting lmkit does not apply but carries); lmkit applies what it supports."""
    settings = dict(num_beams=3, max_length=9, no_repeat_ngram_size=2, early_stopping=False,
                    repetition_penalty=1.3, forced_eos_token_id=2)
    path, ref = _seq2seq(kind, tmp_path, **settings)
    model = lmkit.load(path)
    assert model.generation_config.forced_eos_token_id == 2
    # lmkit's generate uses the checkpoint's settings as its defaults, as transformers does
    expected = _hf_generate(ref)
    new = [row[1:] for row in expected]  # after the decoder start token
    assert all(2 in row for row in new)  # every output ends with the (forced) EOS
    got = lmkit.generate(model, ROWS).sequences
    assert got == [row[:row.index(2)] for row in new]
    # explicit arguments win over the checkpoint's settings
    assert len(lmkit.generate(model, ROWS, max_new_tokens=3,
                              num_beams=1).sequences[0]) <= 3
    # lmkit -> lmkit folder -> HF: the settings and transformers' outputs survive
    lmkit.save(model, tmp_path / "lm")
    back = lmkit.load(tmp_path / "lm")
    assert back.generation_config == model.generation_config
    save_hf(back, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert {k: written[k] for k in settings} == settings
    exported = type(ref).from_pretrained(tmp_path / "hf").eval()
    assert _hf_generate(exported) == expected
    assert lmkit.load(tmp_path / "hf").generation_config == model.generation_config


def test_unapplied_settings_are_carried_and_named_once(tmp_path, caplog):
    path, ref = _seq2seq("bart", tmp_path, min_length=4, num_beams=2, max_length=8)
    with caplog.at_level(logging.WARNING, logger="lmkit"):
        model = lmkit.load(path)
    lines = [r.getMessage() for r in caplog.records if "generation settings" in r.getMessage()]
    assert len(lines) == 1 and "min_length=4" in lines[0] and "num_beams" not in lines[0]
    save_hf(model, tmp_path / "hf")
    exported = tf.BartForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert exported.generation_config.min_length == 4
    assert _hf_generate(exported) == _hf_generate(ref)


def test_legacy_config_keys_are_read(tmp_path):
    """An older checkpoint keeps its generation settings in config.json."""
    path, _ = _seq2seq("bart", tmp_path)
    (path / "generation_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    config.update(num_beams=4, no_repeat_ngram_size=3, forced_eos_token_id=2)
    (path / "config.json").write_text(json.dumps(config))
    gen = lmkit.load(path).generation_config
    assert (gen.num_beams, gen.no_repeat_ngram_size, gen.forced_eos_token_id) == (4, 3, 2)


def _tiny_decoder(**overrides) -> lmkit.Model:
    model = lmkit.Model(lmkit.preset("tiny-decoder", **overrides)).eval()
    _randomise(model)  # varied outputs (an untrained model repeats one token)
    return model


def test_eos_set_stops_on_any_member():
    prompt = [[5, 9, 14]]
    free = lmkit.generate(_tiny_decoder(), prompt, max_new_tokens=12, eos_id=-1).sequences[0]
    stop = next(t for t in free if free.index(t) >= 2)
    cut = free[:free.index(stop)]
    assert len(cut) >= 2  # a real cut, not an empty output
    unseen = next(i for i in range(3, 512) if i not in free)
    for kwargs in (dict(eos_id=[unseen, stop]), dict(eos_id=[stop, unseen])):
        assert lmkit.generate(_tiny_decoder(), prompt, max_new_tokens=12,
                              **kwargs).sequences[0] == cut
    # from the model config and from the generation config
    model = _tiny_decoder(eos_id=[unseen, stop])
    assert lmkit.generate(model, prompt, max_new_tokens=12).sequences[0] == cut
    model = _tiny_decoder()
    model.generation_config = GenerationConfig(eos_token_id=[unseen, stop])
    assert lmkit.generate(model, prompt, max_new_tokens=12).sequences[0] == cut
    beam = lmkit.generate(model, prompt, max_new_tokens=12, num_beams=3, num_return_sequences=3)
    assert all(stop not in s and unseen not in s for s in beam.sequences)


def test_llama3_eos_list_survives_load_and_export(tmp_path):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0)
    ref = tf.LlamaForCausalLM(config).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path / "plain")
    prompt = [[5, 17, 42, 8]]
    free = lmkit.generate(lmkit.load(tmp_path / "plain"), prompt, max_new_tokens=10,
                          eos_id=-1).sequences[0]
    eos = [2, free[3]]
    ref.config.eos_token_id = ref.generation_config.eos_token_id = eos
    ref.save_pretrained(tmp_path / "src")
    model = lmkit.load(tmp_path / "src")
    assert model.config.eos_id == eos and model.generation_config.eos_token_id == eos
    end = next(i for i, t in enumerate(free) if t in eos)
    got = lmkit.generate(model, prompt, max_new_tokens=10).sequences[0]
    assert got == free[:end] and len(got) >= 2
    save_hf(model, tmp_path / "hf")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "hf" / name).read_text())["eos_token_id"] == eos
    for hf in (ref, tf.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()):
        with torch.no_grad():
            out = hf.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False)
        assert out[0, 4:].tolist() == free[:end + 1]  # stopped at the EOS, which it keeps
