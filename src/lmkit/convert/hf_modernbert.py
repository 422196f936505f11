"""ModernBERT: a pre-norm encoder with rotary positions, a GeGLU MLP, no biases (LayerNorms
included), an embedding LayerNorm that also serves as the first block's attention norm, and
alternating attention: every `global_attn_every_n_layers`-th block (from the first) attends
globally with rope base 160k, the others see a window of `local_attention / 2` positions on
each side with base 10k (lmkit `window`, `layer_types`, `local_rope_theta`).

HF fuses q/k/v into `attn.Wqkv` and the MLP's activated and linear halves into `mlp.Wi` (the
first half goes through the activation: lmkit's `gate`). Heads share one prediction head
(`head`: dense + activation + norm): masked LM (then the tied `decoder`) and sequence
classification (then `classifier`; lmkit `classifier_norm`), pooled on the first token or the
mean of real tokens.
"""

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
from lmkit.convert.tables import Table, join_rows, split_rows

_FUSED = {"attn.Wqkv": ("attn.Wqkv.q", "attn.Wqkv.k", "attn.Wqkv.v"),
          "mlp.Wi": ("mlp.Wi.act", "mlp.Wi.lin")}  # rows in this order
_KINDS = {"full_attention": "global", "sliding_attention": "local"}
_POOLING = {"cls": "first", "mean": "mean"}


def _table(cfg: ModelConfig) -> Table:
    layer = "layers.{i}"
    table: Table = [
        ("tokens", "embeddings.tok_embeddings"), ("encoder.embed_norm", "embeddings.norm"),
        ("encoder.final_norm", "final_norm"),
        *[(f"encoder.layers.{{i}}.attn.{p}", f"{layer}.attn.Wqkv.{p}") for p in "qkv"],
        ("encoder.layers.{i}.attn.o", f"{layer}.attn.Wo"),
        ("encoder.layers.{i}.attn_norm", f"{layer}.attn_norm"),  # none in block 0
        ("encoder.layers.{i}.mlp_norm", f"{layer}.mlp_norm"),
        ("encoder.layers.{i}.mlp.gate", f"{layer}.mlp.Wi.act"),
        ("encoder.layers.{i}.mlp.up", f"{layer}.mlp.Wi.lin"),
        ("encoder.layers.{i}.mlp.down", f"{layer}.mlp.Wo"),
    ]
    if cfg.head in ("mlm", "classification"):
        table += [("head.dense", "head.dense"), ("head.norm", "head.norm")]
    if cfg.head == "mlm":
        table.append(("head.proj", "decoder"))
    elif cfg.head == "classification":
        table.append(("head.proj", "classifier"))
    return table


def _rope_theta(hf: dict[str, Any], kind: str, old_key: str, default: float) -> float:
    params = (hf.get("rope_parameters") or {}).get(kind) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {params['rope_type']!r} is not supported (only unscaled "
                         "rotary)")
    return float(params.get("rope_theta", hf.get(old_key, default)))


def _from_hf(hf: dict[str, Any], names: set[str]) -> dict[str, Any]:
    layers = hf.get("num_hidden_layers", 22)
    every = hf.get("global_attn_every_n_layers", 3)  # transformers 4.x; 5.x: layer_types
    kinds = hf.get("layer_types") or ["sliding_attention" if i % every else "full_attention"
                                      for i in range(layers)]
    if any(k not in _KINDS for k in kinds):
        raise ValueError(f"layer_types {sorted(set(kinds) - set(_KINDS))} are not supported")
    act = activation_from_hf(hf.get("hidden_activation", "gelu"))
    head_act = hf.get("classifier_activation", "gelu")
    if head_act != hf.get("hidden_activation", "gelu"):
        raise ValueError(f"classifier_activation={head_act!r} differs from hidden_activation: "
                         "lmkit's masked-LM head uses the body's activation")
    if not hf.get("decoder_bias", True):
        raise ValueError("decoder_bias=False is not supported (lmkit's masked-LM projection "
                         "has a bias)")
    pooling = hf.get("classifier_pooling", "cls")
    if pooling not in _POOLING:
        raise ValueError(f"classifier_pooling={pooling!r} is not 'cls' or 'mean'")
    return dict(family="encoder", vocab_size=hf.get("vocab_size", 50368),
                hidden_size=hf.get("hidden_size", 768),
                num_heads=hf.get("num_attention_heads", 12), encoder_layers=layers,
                intermediate_size=hf.get("intermediate_size", 1152), activation=act,
                gated_mlp=True, norm_position="pre", embed_norm=True, final_norm=True,
                first_attn_norm=False, norm_eps=hf.get("norm_eps", 1e-5),
                norm_bias=hf.get("norm_bias", False), position="rotary",
                max_positions=hf.get("max_position_embeddings", 8192),
                rope_theta=_rope_theta(hf, "full_attention", "global_rope_theta", 160000.0),
                local_rope_theta=_rope_theta(hf, "sliding_attention", "local_rope_theta",
                                             10000.0),
                window=hf.get("local_attention", 128) // 2,
                layer_types=[_KINDS[k] for k in kinds],
                attention_bias=hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False), dropout=hf.get("mlp_dropout", 0.0),
                attention_dropout=hf.get("attention_dropout", 0.0),
                tie_embeddings=hf.get("tie_word_embeddings", True), type_vocab_size=0,
                pooling=_POOLING[pooling], classifier_hidden=True, classifier_norm=True,
                classifier_activation=act, head_dense_bias=hf.get("classifier_bias", False),
                mlm_transform=True,
                **common_from_hf(hf, pad=50283, bos=50281, eos=50282))


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    kinds = [cfg.layer_type(i) for i in range(cfg.encoder_layers)]
    window = cfg.window if cfg.window is not None else 64  # unused when every block is global
    act = ACTIVATIONS_TO_HF[cfg.activation]
    pooling = {v: k for k, v in _POOLING.items()}.get(cfg.pooling, cfg.pooling)
    theta = {"global": cfg.rope_theta, "local": cfg.local_rope_theta or cfg.rope_theta}
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_heads, num_hidden_layers=cfg.encoder_layers,
                intermediate_size=cfg.intermediate_size, hidden_activation=act,
                max_position_embeddings=cfg.max_positions, norm_eps=cfg.norm_eps,
                norm_bias=cfg.norm_bias, attention_bias=cfg.attention_bias,
                mlp_bias=cfg.mlp_bias, classifier_bias=cfg.head_dense_bias, decoder_bias=True,
                classifier_activation=act, classifier_pooling=pooling,
                local_attention=2 * window,
                layer_types=[{v: k for k, v in _KINDS.items()}[k] for k in kinds],
                rope_parameters={"full_attention": {"rope_type": "default",
                                                    "rope_theta": theta["global"]},
                                 "sliding_attention": {"rope_type": "default",
                                                       "rope_theta": theta["local"]}},
                global_rope_theta=theta["global"], local_rope_theta=theta["local"],  # 4.x
                mlp_dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                tie_word_embeddings=cfg.tie_embeddings, **common_to_hf(cfg),
                # ModernBERT's [CLS] / [SEP] are its bos / eos
                cls_token_id=cfg.bos_id, sep_token_id=cfg.eos_id)


SPECS = [Spec("modernbert", {"none": "ModernBertModel", "mlm": "ModernBertForMaskedLM",
                             "classification": "ModernBertForSequenceClassification"},
              "model.", ("head", "decoder", "classifier"), _from_hf, _to_hf, _table,
              from_hf=lambda t, cfg: split_rows(t, _FUSED, cfg),
              to_hf=lambda t, cfg: join_rows(t, _FUSED))]
