"""BART and Marian: post-norm encoder-decoders with one shared token embedding.

BART: learned positions whose table starts at offset 2, a LayerNorm after the embeddings
(layernorm_embedding), optional sqrt(d) embedding scale (scale_embedding), `final_logits_bias`
on the LM head (lmkit `lm_head_bias`), and a classification head that pools the last EOS.
Marian: the same blocks with fixed sinusoidal positions in [sin | cos] layout (computed by lmkit,
never stored), scale_embedding=True and usually swish (silu) activations.
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
from lmkit.convert.tables import Table, Tensors


def _stack(s: str) -> Table:
    pre = f"{s}.layers.{{i}}"
    parts = [("attn", "self_attn", "attn_norm")]
    if s == "decoder":
        parts.append(("cross_attn", "encoder_attn", "cross_norm"))
    table: Table = []
    for lm, hf, norm in parts:
        table += [(f"{pre}.{lm}.{p}", f"{pre}.{hf}.{h}_proj")
                  for p, h in [("q", "q"), ("k", "k"), ("v", "v"), ("o", "out")]]
        table.append((f"{pre}.{norm}", f"{pre}.{hf}_layer_norm"))
    return table + [(f"{pre}.mlp.up", f"{pre}.fc1"), (f"{pre}.mlp.down", f"{pre}.fc2"),
                    (f"{pre}.mlp_norm", f"{pre}.final_layer_norm")]


def _table(cfg: ModelConfig) -> Table:
    table: Table = [("tokens", ("shared", "encoder.embed_tokens", "decoder.embed_tokens"))]
    for s in ("encoder", "decoder"):
        if cfg.position == "learned":
            table.append((f"{s}.positions", f"{s}.embed_positions"))
        if cfg.embed_norm:
            table.append((f"{s}.embed_norm", f"{s}.layernorm_embedding"))
        table += _stack(s)
    if cfg.head == "lm":
        table += [("head.proj.bias", "final_logits_bias"), ("head.proj.weight", "lm_head.weight")]
    elif cfg.head == "classification":
        table += [("head.dense", "classification_head.dense"),
                  ("head.proj", "classification_head.out_proj")]
    return table


def _from_hf(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    if "final_logits_bias" in tensors:  # stored as (1, vocab)
        tensors["final_logits_bias"] = tensors["final_logits_bias"].reshape(-1)
    return tensors


def _to_hf(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    if "final_logits_bias" in tensors:
        tensors["final_logits_bias"] = tensors["final_logits_bias"].reshape(1, -1)
    return tensors


def _config_from_hf(hf: dict[str, Any], marian: bool) -> dict[str, Any]:
    for a, b in [("encoder_attention_heads", "decoder_attention_heads"),
                 ("encoder_ffn_dim", "decoder_ffn_dim")]:
        if hf.get(a, 16) != hf.get(b, 16):
            raise ValueError(f"{a}={hf.get(a)} differs from {b}={hf.get(b)}: lmkit uses one "
                             "value for both stacks")
    if marian and not hf.get("share_encoder_decoder_embeddings", True):
        raise ValueError("Marian with separate encoder and decoder vocabularies "
                         "(share_encoder_decoder_embeddings=False) is not supported")
    vocab = hf.get("vocab_size", 58101 if marian else 50265)
    if marian and hf.get("decoder_vocab_size", vocab) != vocab:
        raise ValueError("decoder_vocab_size differs from vocab_size: not supported")
    common = (common_from_hf(hf, pad=58100, bos=None, eos=0) if marian
              else common_from_hf(hf, pad=1, bos=0, eos=2))
    start = hf.get("decoder_start_token_id", common["pad_id"] if marian else 2)
    return dict(family="encoder-decoder", vocab_size=vocab, hidden_size=hf.get("d_model", 1024),
                num_heads=hf.get("encoder_attention_heads", 16),
                encoder_layers=hf.get("encoder_layers", 12),
                decoder_layers=hf.get("decoder_layers", 12),
                intermediate_size=hf.get("encoder_ffn_dim", 4096),
                activation=activation_from_hf(hf.get("activation_function", "gelu")),
                norm_position="post", final_norm=False, embed_norm=not marian,
                position="sinusoidal" if marian else "learned",
                max_positions=hf.get("max_position_embeddings", 1024),
                position_offset=0 if marian else 2,  # BART's table starts at row 2
                scale_embeddings=bool(hf.get("scale_embedding", False)),
                dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.0),
                activation_dropout=hf.get("activation_dropout", 0.0),
                tie_embeddings=hf.get("tie_word_embeddings", True), lm_head_bias=True,
                pooling="eos", classifier_hidden=True, classifier_activation="tanh",
                decoder_start_id=start, **common)


def _config_to_hf(cfg: ModelConfig, marian: bool) -> dict[str, Any]:
    out = dict(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size,
               encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
               encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
               encoder_ffn_dim=cfg.intermediate_size, decoder_ffn_dim=cfg.intermediate_size,
               activation_function=ACTIVATIONS_TO_HF[cfg.activation],
               max_position_embeddings=cfg.max_positions, scale_embedding=cfg.scale_embeddings,
               dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
               activation_dropout=(cfg.dropout if cfg.activation_dropout is None
                                   else cfg.activation_dropout),
               tie_word_embeddings=cfg.tie_embeddings, decoder_start_token_id=cfg.decoder_start_id,
               is_encoder_decoder=True, **common_to_hf(cfg))
    if marian:
        out.update(decoder_vocab_size=cfg.vocab_size, share_encoder_decoder_embeddings=True)
    return out


_IGNORE = (r"(en|de)coder\.version",)
SPECS = [
    Spec("bart", {"none": "BartModel", "lm": "BartForConditionalGeneration",
                  "classification": "BartForSequenceClassification"}, "model.",
         ("lm_head", "final_logits_bias", "classification_head"),
         lambda hf, names: _config_from_hf(hf, marian=False),
         lambda cfg: _config_to_hf(cfg, marian=False), _table, ignore=_IGNORE,
         from_hf=_from_hf, to_hf=_to_hf),
    Spec("marian", {"none": "MarianModel", "lm": "MarianMTModel"}, "model.",
         ("lm_head", "final_logits_bias"),
         lambda hf, names: _config_from_hf(hf, marian=True),
         lambda cfg: _config_to_hf(cfg, marian=True), _table,
         # sinusoidal tables older Marian checkpoints stored; lmkit computes the same values
         ignore=_IGNORE + (r"(en|de)coder\.embed_positions\.weight",),
         from_hf=_from_hf, to_hf=_to_hf),
]
