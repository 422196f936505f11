"""Parity of Llama's relatives (Mistral, Qwen2, Qwen3, Gemma, Phi-3) and of rope scaling
(llama3, linear, dynamic, yarn) with `transformers`, the reference.

Each case is a tiny random transformers model (fp32) saved with save_pretrained: logits on a
left-padded batch and on an unpadded one (SDPA's fast path), greedy generation with the KV
cache past the sliding window and the dynamic-rope length, and the folder lmkit exports back.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from test_convert_gguf import gguf_writer
from test_convert_hf import saved_models

import lmkit
from lmkit.convert import save_hf
from lmkit.loading import convert

V, T = 99, 12  # vocabulary; batch length (longer than every window below)
BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**BASE, sliding_window=4)),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**BASE)),
    "qwen2-sliding": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**BASE, use_sliding_window=True,
                                                          sliding_window=5,
                                                          max_window_layers=0)),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**BASE, head_dim=16)),
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**BASE, head_dim=8)),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**BASE, partial_rotary_factor=0.5,
                                               sliding_window=6)),
    "llama3-rope": (tf.LlamaForCausalLM, tf.LlamaConfig(**BASE, rope_parameters=LLAMA3,
                                                        max_position_embeddings=256)),
    "linear-rope": (tf.LlamaForCausalLM, tf.LlamaConfig(
        **BASE, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    "dynamic-rope": (tf.LlamaForCausalLM, tf.LlamaConfig(
        **BASE, max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0})),
    "yarn-rope": (tf.Qwen2ForCausalLM, tf.Qwen2Config(  # Qwen2.5's long-context setting
        **BASE, max_position_embeddings=32, rope_parameters={
            "rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
            "original_max_position_embeddings": 8})),
    "yarn-mscale": (tf.LlamaForCausalLM, tf.LlamaConfig(  # DeepSeek's mscale, no truncation
        **BASE, max_position_embeddings=32,
        rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 2.0,
                                 "original_max_position_embeddings": 16, "mscale": 0.7,
                                 "mscale_all_dim": 1.0, "beta_fast": 16.0, "truncate": False})),
}
MODEL_TYPE = {"llama3-rope": "llama", "linear-rope": "llama", "dynamic-rope": "llama",
              "qwen2-sliding": "qwen2", "yarn-rope": "qwen2", "yarn-mscale": "llama"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Saved HF folders, made once per case."""
    get = saved_models(CASES, tmp_path_factory)
    return lambda case: get(case)[0]


def _reference(case: str, path):
    """A fresh transformers model (dynamic rope keeps state between calls)."""
    return CASES[case][0].from_pretrained(path).eval()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (2, T), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def _hf_logits(model, batch: dict) -> torch.Tensor:
    mask = batch.get("attention_mask")
    kwargs = dict(batch)
    if mask is not None:  # positions restart after left padding, as in lmkit
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**kwargs).logits


def _max_diff(model, ref, batch: dict) -> float:
    with torch.no_grad():
        got = model(**batch).logits
    expected = _hf_logits(ref, batch)
    real = batch["attention_mask"].bool() if "attention_mask" in batch else slice(None)
    return float((got[real] - expected[real]).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, hf_dir):
    path = hf_dir(case)
    model = lmkit.load(path)
    assert model.hf_model_type == MODEL_TYPE.get(case, case) and model.new_tensors == []
    batch = _batch()
    assert _max_diff(model, _reference(case, path), batch) < 1e-5  # padded: the mask path
    unpadded = {"input_ids": batch["input_ids"][:1]}  # no mask: SDPA's fast path
    assert _max_diff(model, _reference(case, path), unpadded) < 1e-5


def _until(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(case, hf_dir):
    """Prompt + new tokens run past the sliding windows (4-6) and the dynamic rope's 8."""
    path = hf_dir(case)
    model = lmkit.load(path)
    for prompts in ([[5, 17, 42, 8, 61], [33, 9]], [[5, 17, 42, 8, 61]]):
        got = lmkit.generate(model, prompts, max_new_tokens=12, eos_id=V).sequences
        n = max(map(len, prompts))
        ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
        mask = (torch.arange(n) >= torch.tensor([n - len(p) for p in prompts])[:, None]).long()
        ref = _reference(case, path)
        ref.generation_config = tf.GenerationConfig(do_sample=False, num_beams=1,
                                                    max_new_tokens=12, pad_token_id=0)
        out = ref.generate(input_ids=ids, attention_mask=mask)
        assert got == [row[n:].tolist() for row in out]
        assert all(len(s) == 12 for s in got)


@pytest.mark.parametrize("case", list(CASES))
def test_export_reloads_in_transformers(case, hf_dir, tmp_path):
    path = hf_dir(case)
    out = convert(path, tmp_path / "hf", to="hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == \
        MODEL_TYPE.get(case, case)
    again = _reference(case, out)
    batch = _batch()
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(_hf_logits(again, batch)[real],
                               _hf_logits(_reference(case, path), batch)[real],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("changes", "model_type"), [
    ({}, "llama"), ({"sliding_window": 3}, "mistral"), ({"qk_norm": True}, "qwen3"),
    ({"attention_bias": True, "attention_out_bias": False}, "qwen2"),
    ({"norm_offset": 1.0, "scale_embeddings": True, "activation": "gelu_tanh",
      "tie_embeddings": True}, "gemma"),
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "llama"),
])
def test_lmkit_models_export_to_the_family_that_computes_them(changes, model_type, tmp_path):
    """A model built in lmkit is written as the HF type whose fixed choices it has."""
    model = lmkit.Model(lmkit.preset("tiny-decoder", **changes)).eval()
    out = save_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    ids = torch.randint(4, 500, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lmkit.load(out)(ids).logits, model(ids).logits)


def test_new_fields_round_trip_and_default_when_absent(tmp_path):
    cfg = lmkit.preset("tiny-decoder", sliding_window=8, qk_norm=True, attention_out_bias=False,
                       rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_positions": 64})
    cfg.to_json(tmp_path / "config.json")
    assert lmkit.ModelConfig.from_json(tmp_path / "config.json") == cfg
    # a config.json saved before these fields existed loads with the old behaviour
    old = {k: v for k, v in lmkit.preset("tiny-decoder").to_dict().items()
           if k not in ("rope_scaling", "attention_out_bias", "qk_norm", "sliding_window",
                        "norm_offset")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert lmkit.ModelConfig.from_json(tmp_path / "config.json") == lmkit.preset("tiny-decoder")


@pytest.mark.parametrize(("changes", "message"), [
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling type 'longrope'"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "needs exactly the keys"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_positions": 8,
                       "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.1,
                       "truncate": "yes"}}, "truncate must be true or false"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "needs exactly the keys"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "factor must be >= 1"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "position": "learned"},
     "needs position='rotary'"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0, "original_max_positions": 64}},
     "high_freq_factor must be larger"),
    ({"sliding_window": 0}, "sliding_window=0"),
    ({"norm": "layernorm", "norm_offset": 1.0}, "norm_offset applies to RMSNorm"),
])
def test_bad_new_fields_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        lmkit.preset("tiny-decoder", **changes)


def test_unsupported_variants_are_refused(hf_dir, tmp_path):
    """Per-layer windows and rope kinds lmkit lacks are one clear error, not a wrong model."""
    path = hf_dir("qwen2")
    raw = json.loads((path / "config.json").read_text())
    for change, message in [
            ({"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4},
             "some layers only"),
            ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}},
             "rope type 'longrope'")]:
        (path / "config.json").write_text(json.dumps({**raw, **change}))
        try:
            with pytest.raises(lmkit.CheckpointError, match=message):
                lmkit.load(path)
        finally:
            (path / "config.json").write_text(json.dumps(raw))


# ---- GGUF: the files llama.cpp's converter writes for these architectures ---------------------
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    hf = hf.removeprefix("model.")
    if hf.startswith("layers."):
        _, i, rest = hf.split(".", 2)
        module, _, leaf = rest.rpartition(".")
        return f"blk.{i}.{GGUF_NAMES[module]}.{leaf}"
    return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _write_gguf(path, ref, arch: str) -> None:
    """A GGUF file as llama.cpp's convert_hf_to_gguf.py writes it (unpermuted Q/K for these
    architectures, Gemma's norms stored as 1 + w, Phi-3's fused matrices kept)."""
    c = ref.config
    w = gguf_writer(path, arch, c.num_hidden_layers, c.max_position_embeddings, c.hidden_size,
                    c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                    c.rope_parameters["rope_theta"], c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    fraction = c.rope_parameters.get("partial_rotary_factor", 1.0)
    w.add_rope_dimension_count(int(head_dim * fraction))
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        arr = t.detach().float().numpy()
        if arch == "gemma" and name.endswith("norm.weight"):
            arr = arr + 1
        w.add_tensor(_gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["qwen2", "qwen3", "gemma", "phi3"])
def test_gguf_architectures_match_transformers(case, hf_dir, tmp_path):
    path = hf_dir(case)
    ref = _reference(case, path)
    _write_gguf(tmp_path / "m.gguf", ref, case)
    model = lmkit.load(tmp_path / "m.gguf")
    same = dict(max_positions=model.config.max_positions, norm_eps=model.config.norm_eps)
    assert model.config == lmkit.load(path).config.replace(**same)  # eps: stored as float32
    assert _max_diff(model, ref, _batch()) < 1e-5
    out = convert(tmp_path / "m.gguf", tmp_path / "hf", to="hf")  # and on to transformers
    assert json.loads((out / "config.json").read_text())["model_type"] == case
    torch.testing.assert_close(_hf_logits(_reference(case, out), _batch()),
                               _hf_logits(ref, _batch()), atol=1e-5, rtol=1e-5)
