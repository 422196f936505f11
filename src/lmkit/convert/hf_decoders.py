"""Llama's relatives: Mistral, Qwen2, Qwen3, Gemma (1) and Phi-3. Each is the Llama
translation (hf_llama) with the fields its family fixes or adds, and Llama's tensor-name table:

    mistral  sliding-window attention (sliding_window)
    qwen2    biases on q/k/v but not on the output projection (attention_out_bias=False)
    qwen3    RMSNorm over each head's queries and keys (qk_norm)
    gemma    embeddings scaled by sqrt(hidden), RMSNorm scaling by (1 + w) (norm_offset=1),
             a GELU-tanh gate, tied embeddings
    phi3     q/k/v in one matrix (qkv_proj) and gate/up in one (gate_up_proj): split on
             reading, fused on writing; partial rotary (partial_rotary_factor)

A family's fixed choices are set on reading whatever config.json says, so a model that differs
from them is never exported as that family (hf.choose_spec compares the round trip).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmkit.config import ModelConfig
from lmkit.convert.hf import ACTIVATIONS_TO_HF, Spec, activation_from_hf
from lmkit.convert.hf_llama import llama_from_hf, llama_table, llama_to_hf
from lmkit.convert.tables import join_rows, split_rows

IGNORE = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
NO_BIAS = dict(attention_bias=False, mlp_bias=False)


def _spec(model_type: str, prefix: str, defaults: dict[str, Any],
          read: Callable[[dict[str, Any]], dict[str, Any]],
          write: Callable[[ModelConfig], dict[str, Any]], **kw: Any) -> Spec:
    """A Llama-like Spec: `defaults` are the HF class's defaults for keys config.json may lack,
    `read` gives the fields the family fixes or adds, `write` its HF keys beyond Llama's."""
    def from_hf(hf: dict[str, Any], names: set[str]) -> dict[str, Any]:
        hf = {**defaults, **hf}
        return {**llama_from_hf(hf, names), **read(hf)}

    def to_hf(cfg: ModelConfig) -> dict[str, Any]:
        out = {k: v for k, v in llama_to_hf(cfg).items() if k not in ("attention_bias",
                                                                       "mlp_bias")}
        return {**out, **write(cfg)}

    return Spec(model_type, {"none": f"{prefix}Model", "lm": f"{prefix}ForCausalLM"}, "model.",
                ("lm_head", "score"), from_hf, to_hf, llama_table, ignore=IGNORE, **kw)


# ---- sliding windows: Mistral and Phi-3 one key; Qwen per layer (all or none here) -------------
def _window(hf: dict[str, Any]) -> dict[str, Any]:
    return {"sliding_window": hf.get("sliding_window")}


def _qwen_window(hf: dict[str, Any]) -> dict[str, Any]:
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds == {"full_attention"}:
        return {"sliding_window": None}
    if kinds == {"sliding_attention"}:
        return {"sliding_window": hf["sliding_window"]}
    raise ValueError("sliding-window attention on some layers only (max_window_layers) is not "
                     "supported; lmkit applies one window to every layer or none")


def _qwen_window_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    window = cfg.sliding_window is not None
    return dict(use_sliding_window=window, sliding_window=cfg.sliding_window,
                max_window_layers=0 if window else cfg.decoder_layers,
                layer_types=[("sliding" if window else "full") + "_attention"] *
                cfg.decoder_layers)


# ---- Phi-3: fused projections ------------------------------------------------------------------
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}  # rows in this order


def _phi3_read(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return {**NO_BIAS, **_window(hf), "rotary_fraction": float(fraction)}


def _phi3_write(cfg: ModelConfig) -> dict[str, Any]:
    rope = llama_to_hf(cfg)["rope_parameters"]
    return dict(sliding_window=cfg.sliding_window, partial_rotary_factor=cfg.rotary_fraction,
                rope_parameters={**rope, "partial_rotary_factor": cfg.rotary_fraction})


def _gemma_activation(hf: dict[str, Any]) -> str:
    # Gemma's released configs say "gelu" (or hidden_activation) and mean the tanh form
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


SPECS = [
    _spec("mistral", "Mistral", {"sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2},
          lambda hf: {**NO_BIAS, **_window(hf)},
          lambda cfg: {"sliding_window": cfg.sliding_window}),
    _spec("qwen2", "Qwen2", {"bos_token_id": None, "eos_token_id": None},
          lambda hf: dict(attention_bias=True, attention_out_bias=False, mlp_bias=False,
                          **_qwen_window(hf)),
          _qwen_window_to_hf),
    _spec("qwen3", "Qwen3", {"head_dim": 128, "bos_token_id": None, "eos_token_id": None},
          lambda hf: dict(attention_bias=hf.get("attention_bias", False), mlp_bias=False,
                          qk_norm=True, **_qwen_window(hf)),
          lambda cfg: dict(attention_bias=cfg.attention_bias, **_qwen_window_to_hf(cfg))),
    _spec("gemma", "Gemma", {"head_dim": 256, "tie_word_embeddings": True, "pad_token_id": 0,
                             "bos_token_id": 2, "eos_token_id": 1},
          lambda hf: dict(attention_bias=hf.get("attention_bias", False), mlp_bias=False,
                          norm_offset=1.0, scale_embeddings=True,
                          activation=activation_from_hf(_gemma_activation(hf))),
          lambda cfg: dict(attention_bias=cfg.attention_bias, hidden_act=(
              "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else
              ACTIVATIONS_TO_HF[cfg.activation]))),
    _spec("phi3", "Phi3", {"rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 32000,
                           "pad_token_id": 32000},
          _phi3_read, _phi3_write, from_hf=lambda t, cfg: split_rows(t, FUSED, cfg),
          to_hf=lambda t, cfg: join_rows(t, FUSED)),
]
