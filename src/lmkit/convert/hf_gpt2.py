"""GPT-2: a pre-norm decoder with learned positions, gelu_new (lmkit 'gelu_tanh') and a tied LM
head. Its linear layers are `Conv1D` modules that store weights as (in, out), the transpose of
`nn.Linear`, and the query/key/value projections are one fused `c_attn` tensor."""

from __future__ import annotations

from typing import Any

import torch

from lmkit.config import ModelConfig
from lmkit.convert.hf import (
    ACTIVATIONS_TO_HF,
    Spec,
    activation_from_hf,
    common_from_hf,
    common_to_hf,
)
from lmkit.convert.tables import Table, Tensors

_CONV1D = ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _table(cfg: ModelConfig) -> Table:
    table: Table = [
        ("tokens", "wte"), ("decoder.positions", "wpe"), ("decoder.final_norm", "ln_f"),
        ("decoder.layers.{i}.attn_norm", "h.{i}.ln_1"),
        # q/k/v are slices of c_attn, split and fused by from_hf / to_hf below.
        ("decoder.layers.{i}.attn.q", "h.{i}.attn.c_attn.q"),
        ("decoder.layers.{i}.attn.k", "h.{i}.attn.c_attn.k"),
        ("decoder.layers.{i}.attn.v", "h.{i}.attn.c_attn.v"),
        ("decoder.layers.{i}.attn.o", "h.{i}.attn.c_proj"),
        ("decoder.layers.{i}.mlp_norm", "h.{i}.ln_2"),
        ("decoder.layers.{i}.mlp.up", "h.{i}.mlp.c_fc"),
        ("decoder.layers.{i}.mlp.down", "h.{i}.mlp.c_proj"),
    ]
    return table + _HEADS.get(cfg.head, [])


# Sequence classification reads the last real token through `score` (no bias).
_HEADS: dict[str, Table] = {"lm": [("head.proj.weight", "lm_head.weight")],
                            "classification": [("head.proj", "score")],
                            "token-classification": [("head.proj", "classifier")]}


def _from_hf(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """Split c_attn into q, k, v and transpose every Conv1D weight into nn.Linear layout."""
    out: Tensors = {}
    for name in list(tensors):
        t = tensors.pop(name)  # one tensor at a time, so the originals are freed as we go
        module, _, leaf = name.rpartition(".")
        if module.endswith("attn.c_attn"):
            parts = (t.t() if leaf == "weight" else t).chunk(3, dim=0)
            for part, qkv in zip(parts, "qkv"):
                out[f"{module}.{qkv}.{leaf}"] = part.contiguous()
        elif module.endswith(_CONV1D) and leaf == "weight":
            out[name] = t.t().contiguous()
        else:
            out[name] = t
    return out


def _to_hf(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """Fuse q, k, v into c_attn and transpose Linear weights back into Conv1D layout."""
    out: Tensors = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module.endswith("attn.c_attn.q"):
            base = module[:-2]
            fused = torch.cat([t, tensors[f"{base}.k.{leaf}"], tensors[f"{base}.v.{leaf}"]])
            out[f"{base}.{leaf}"] = fused.t() if leaf == "weight" else fused
        elif module.endswith(("attn.c_attn.k", "attn.c_attn.v")):
            continue
        elif module.endswith(_CONV1D) and leaf == "weight":
            out[name] = t.t()
        else:
            out[name] = t
    return out


def _from_hf_config(hf: dict[str, Any], names: set[str]) -> dict[str, Any]:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported")
    if hf.get("add_cross_attention"):
        raise ValueError("GPT-2 with cross-attention is not supported")
    d = hf.get("n_embd", 768)
    return dict(family="decoder", vocab_size=hf.get("vocab_size", 50257), hidden_size=d,
                num_heads=hf.get("n_head", 12), decoder_layers=hf.get("n_layer", 12),
                intermediate_size=hf.get("n_inner") or 4 * d,
                activation=activation_from_hf(hf.get("activation_function", "gelu_new")),
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
                max_positions=hf.get("n_positions", 1024),
                scale_attention=hf.get("scale_attn_weights", True),
                dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
                activation_dropout=0.0,
                tie_embeddings=hf.get("tie_word_embeddings", True), classifier_bias=False,
                **common_from_hf(hf, pad=None, bos=50256, eos=50256))


def _to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_head=cfg.num_heads,
                n_layer=cfg.decoder_layers, n_inner=cfg.intermediate_size,
                activation_function=ACTIVATIONS_TO_HF[cfg.activation],
                layer_norm_epsilon=cfg.norm_eps, n_positions=cfg.max_positions,
                scale_attn_weights=cfg.scale_attention, resid_pdrop=cfg.dropout,
                embd_pdrop=cfg.dropout, attn_pdrop=cfg.attention_dropout,
                tie_word_embeddings=cfg.tie_embeddings, **common_to_hf(cfg))


SPECS = [Spec("gpt2", {"none": "GPT2Model", "lm": "GPT2LMHeadModel",
                       "classification": "GPT2ForSequenceClassification",
                       "token-classification": "GPT2ForTokenClassification"}, "transformer.",
              ("lm_head", "score", "classifier"), _from_hf_config, _to_hf_config, _table,
              # attn.bias / masked_bias: causal-mask buffers older checkpoints stored
              ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),
              from_hf=_from_hf, to_hf=_to_hf)]
