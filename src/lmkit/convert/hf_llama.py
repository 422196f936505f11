"""Llama: a pre-norm decoder with RMSNorm, rotary positions (rope_theta), a SwiGLU MLP and
grouped-query attention; the LM head may be tied or not (tie_word_embeddings)."""

from __future__ import annotations

from typing import Any

from lmkit.config import ModelConfig
from lmkit.convert.hf import (
    ACTIVATIONS_TO_HF,
    Spec,
    activation_from_hf,
    common_from_hf,
    common_to_hf,
)
from lmkit.convert.tables import Table


def _table(cfg: ModelConfig) -> Table:
    table: Table = [
        ("tokens", "embed_tokens"), ("decoder.final_norm", "norm"),
        ("decoder.layers.{i}.attn_norm", "layers.{i}.input_layernorm"),
        ("decoder.layers.{i}.attn.q", "layers.{i}.self_attn.q_proj"),
        ("decoder.layers.{i}.attn.k", "layers.{i}.self_attn.k_proj"),
        ("decoder.layers.{i}.attn.v", "layers.{i}.self_attn.v_proj"),
        ("decoder.layers.{i}.attn.o", "layers.{i}.self_attn.o_proj"),
        ("decoder.layers.{i}.mlp_norm", "layers.{i}.post_attention_layernorm"),
        ("decoder.layers.{i}.mlp.gate", "layers.{i}.mlp.gate_proj"),
        ("decoder.layers.{i}.mlp.up", "layers.{i}.mlp.up_proj"),
        ("decoder.layers.{i}.mlp.down", "layers.{i}.mlp.down_proj"),
    ]
    return table + _HEADS.get(cfg.head, [])


# Sequence classification reads the last real token through `score` (no bias); token
# classification's `score` has one.
_HEADS: dict[str, Table] = {"lm": [("head.proj.weight", "lm_head.weight")],
                            "classification": [("head.proj", "score")],
                            "token-classification": [("head.proj", "score")]}


def rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from a v5 `rope_parameters` dict or the v4 top-level keys; scaled variants
    (linear, dynamic, yarn, llama3) change the frequencies and are refused."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported (only unscaled rotary)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _from_hf(hf: dict[str, Any], names: set[str]) -> dict[str, Any]:
    heads = hf.get("num_attention_heads", 32)
    d = hf.get("hidden_size", 4096)
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or d // heads
    return dict(family="decoder", vocab_size=hf.get("vocab_size", 32000), hidden_size=d,
                num_heads=heads, num_kv_heads=None if kv_heads == heads else kv_heads,
                head_dim=None if head_dim * heads == d else head_dim,
                decoder_layers=hf.get("num_hidden_layers", 32),
                intermediate_size=hf.get("intermediate_size", 11008),
                activation=activation_from_hf(hf.get("hidden_act", "silu")), gated_mlp=True,
                norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), position="rotary",
                rope_theta=rope_theta(hf), max_positions=hf.get("max_position_embeddings", 2048),
                attention_bias=hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False), dropout=0.0,
                attention_dropout=hf.get("attention_dropout", 0.0),
                tie_embeddings=hf.get("tie_word_embeddings", False), classifier_bias=False,
                **common_from_hf(hf, pad=None, bos=1, eos=2))


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.dim_per_head, num_hidden_layers=cfg.decoder_layers,
                intermediate_size=cfg.intermediate_size,
                hidden_act=ACTIVATIONS_TO_HF[cfg.activation], rms_norm_eps=cfg.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                rope_theta=cfg.rope_theta,  # transformers 4.x reads this key
                max_position_embeddings=cfg.max_positions, attention_bias=cfg.attention_bias,
                mlp_bias=cfg.mlp_bias, attention_dropout=cfg.attention_dropout,
                tie_word_embeddings=cfg.tie_embeddings, **common_to_hf(cfg))


SPECS = [Spec("llama", {"none": "LlamaModel", "lm": "LlamaForCausalLM",
                        "classification": "LlamaForSequenceClassification",
                        "token-classification": "LlamaForTokenClassification"}, "model.",
              ("lm_head", "score"), _from_hf, _to_hf, _table,
              ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))]
