"""Llama: a pre-norm decoder with RMSNorm, rotary positions (rope_theta, optionally scaled:
linear, dynamic NTK, llama3), a SwiGLU MLP and grouped-query attention; the LM head may be
tied or not (tie_word_embeddings). Its relatives (hf_decoders) start from this translation."""

from __future__ import annotations

import math
from typing import Any

from lmkit.config import ROPE_SCALINGS, ModelConfig
from lmkit.convert.hf import (
    ACTIVATIONS_TO_HF,
    Spec,
    activation_from_hf,
    common_from_hf,
    common_to_hf,
)
from lmkit.convert.tables import Table


def llama_table(cfg: ModelConfig) -> Table:
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
    if cfg.qk_norm:  # Qwen3
        table += [("decoder.layers.{i}.attn.q_norm", "layers.{i}.self_attn.q_norm"),
                  ("decoder.layers.{i}.attn.k_norm", "layers.{i}.self_attn.k_norm")]
    return table + _HEADS.get(cfg.head, [])


# Sequence classification reads the last real token through `score` (no bias); token
# classification's `score` has one.
_HEADS: dict[str, Table] = {"lm": [("head.proj.weight", "lm_head.weight")],
                            "classification": [("head.proj", "score")],
                            "token-classification": [("head.proj", "score")]}


# lmkit rope_scaling keys <-> Hugging Face rope_parameters keys (besides type / rope_type)
_ROPE_KEYS = {"factor": "factor", "low_freq_factor": "low_freq_factor",
              "high_freq_factor": "high_freq_factor",
              "original_max_positions": "original_max_position_embeddings",
              "beta_fast": "beta_fast", "beta_slow": "beta_slow",
              "attention_factor": "attention_factor", "truncate": "truncate"}


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling from a v5 `rope_parameters` dict or the v4 top-level keys
    (`rope_theta`, `rope_scaling`), with transformers' defaults filled in. Scaled kinds lmkit
    lacks (longrope, ...) are refused."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = None
    if kind == "dynamic":  # transformers scales past max_position_embeddings
        params = {**params, "original_max_position_embeddings":
                  hf.get("max_position_embeddings", 2048)}
    elif kind in ("llama3", "yarn"):  # the pretraining length: a top-level key wins (Phi-3)
        original = hf.get("original_max_position_embeddings") or \
            params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
        params = {**params, "original_max_position_embeddings": original}
    if kind == "yarn":
        params = _yarn_defaults(params, hf)
    if kind in ROPE_SCALINGS:
        scaling = {"type": kind, **{lm: params[h] for lm, h in _ROPE_KEYS.items()
                                    if lm in ("factor", *ROPE_SCALINGS[kind])}}
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported (lmkit reads unscaled rotary "
                         f"and {', '.join(ROPE_SCALINGS)})")
    return dict(rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
                rope_scaling=scaling)


def _yarn_defaults(params: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """YaRN's optional keys as transformers computes them when absent: the factor from the
    lengths, the attention factor from the factor (and mscale / mscale_all_dim)."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return {**params, "factor": float(factor), "attention_factor": float(attention),
            "beta_fast": float(params.get("beta_fast") or 32),
            "beta_slow": float(params.get("beta_slow") or 1),
            "truncate": bool(params.get("truncate", True))}


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` (transformers 5) and the top-level keys transformers 4.x reads."""
    scaling = cfg.rope_scaling or {"type": "default"}
    params = {"rope_type": scaling["type"], "rope_theta": cfg.rope_theta,
              **{_ROPE_KEYS[k]: v for k, v in scaling.items() if k != "type"}}
    if scaling["type"] == "dynamic":  # transformers takes the length from the config
        params.pop("original_max_position_embeddings")
    out: dict[str, Any] = {"rope_parameters": params, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = params
    return out


def llama_from_hf(hf: dict[str, Any], names: set[str]) -> dict[str, Any]:
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
                **rope_from_hf(hf), max_positions=hf.get("max_position_embeddings", 2048),
                attention_bias=hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False), dropout=0.0,
                attention_dropout=hf.get("attention_dropout", 0.0),
                tie_embeddings=hf.get("tie_word_embeddings", False), classifier_bias=False,
                **common_from_hf(hf, pad=None, bos=1, eos=2))


def llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.dim_per_head, num_hidden_layers=cfg.decoder_layers,
                intermediate_size=cfg.intermediate_size,
                hidden_act=ACTIVATIONS_TO_HF[cfg.activation], rms_norm_eps=cfg.norm_eps,
                **rope_to_hf(cfg), max_position_embeddings=cfg.max_positions,
                attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
                attention_dropout=cfg.attention_dropout,
                tie_word_embeddings=cfg.tie_embeddings, **common_to_hf(cfg))


SPECS = [Spec("llama", {"none": "LlamaModel", "lm": "LlamaForCausalLM",
                        "classification": "LlamaForSequenceClassification",
                        "token-classification": "LlamaForTokenClassification"}, "model.",
              ("lm_head", "score"), llama_from_hf, llama_to_hf, llama_table,
              ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))]
