"""T5 (v1.0, and v1.1's gated-gelu) and mT5: a pre-norm encoder-decoder with RMS-style
T5LayerNorm, no biases, no attention scaling, and a learned relative-position bias stored once
per stack (in HF, in block 0's self-attention). With tied embeddings T5's decoder output is
multiplied by d_model ** -0.5 before the LM head (lmkit `output_scale`); v1.1 unties and does
not scale. mT5 is the v1.1 layout with a 250k vocabulary and never scales. T5EncoderModel /
MT5EncoderModel are the encoder stack alone: an lmkit encoder with T5's relative bias.
"""

from __future__ import annotations

from typing import Any

from lmkit.config import ModelConfig
from lmkit.convert.hf import Spec, activation_from_hf, common_from_hf, common_to_hf
from lmkit.convert.tables import Table

_FF_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


def _stack(s: str, gated: bool) -> Table:
    pre = f"{s}.block.{{i}}.layer"
    table: Table = [(f"{s}.layers.{{i}}.attn.{p}", f"{pre}.0.SelfAttention.{p}") for p in "qkvo"]
    table += [(f"{s}.layers.{{i}}.attn_norm", f"{pre}.0.layer_norm"),
              (f"{s}.relative_bias.bias",
               f"{s}.block.0.layer.0.SelfAttention.relative_attention_bias"),
              (f"{s}.final_norm", f"{s}.final_layer_norm")]
    ff = 1
    if s == "decoder":
        table += [(f"decoder.layers.{{i}}.cross_attn.{p}", f"{pre}.1.EncDecAttention.{p}")
                  for p in "qkvo"]
        table.append(("decoder.layers.{i}.cross_norm", f"{pre}.1.layer_norm"))
        ff = 2
    mlp = f"{pre}.{ff}.DenseReluDense"
    if gated:  # wi_0 goes through the activation, wi_1 is the linear branch
        table += [(f"{s}.layers.{{i}}.mlp.gate", f"{mlp}.wi_0"),
                  (f"{s}.layers.{{i}}.mlp.up", f"{mlp}.wi_1")]
    else:
        table.append((f"{s}.layers.{{i}}.mlp.up", f"{mlp}.wi"))
    return table + [(f"{s}.layers.{{i}}.mlp.down", f"{mlp}.wo"),
                    (f"{s}.layers.{{i}}.mlp_norm", f"{pre}.{ff}.layer_norm")]


def _table(cfg: ModelConfig) -> Table:
    table: Table = [("tokens", ("shared", "encoder.embed_tokens", "decoder.embed_tokens"))]
    table += _stack("encoder", cfg.gated_mlp)
    if cfg.has_decoder:
        table += _stack("decoder", cfg.gated_mlp)
    if cfg.head == "lm":
        table.append(("head.proj.weight", "lm_head.weight"))
    return table


_ENCODERS = ("T5EncoderModel", "MT5EncoderModel")
# Defaults of keys a config.json may leave out: T5Config's, MT5Config's
_DEFAULTS = {"t5": dict(vocab_size=32128, d_ff=2048, num_layers=6, num_heads=8,
                        feed_forward_proj="relu"),
             "mt5": dict(vocab_size=250112, d_ff=1024, num_layers=8, num_heads=6,
                         feed_forward_proj="gated-gelu")}


def _encoder_only(hf: dict[str, Any], names: set[str]) -> bool:
    """T5EncoderModel: named so in `architectures`, else a checkpoint without decoder tensors."""
    archs = hf.get("architectures") or []
    if archs:
        return archs[0] in _ENCODERS
    return bool(names) and not any(n.startswith("decoder.") for n in names)


def _from_hf(hf: dict[str, Any], names: set[str], mt5: bool = False) -> dict[str, Any]:
    hf = {**_DEFAULTS["mt5" if mt5 else "t5"], **hf}
    ff = hf["feed_forward_proj"]
    parts = ff.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ValueError(f"feed_forward_proj={ff!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if ff == "gated-gelu" else parts[-1]  # HF's historical special case
    d = hf.get("d_model", 512)
    if mt5:  # never scaled; tied unless the checkpoint has its own LM head
        scale, tied = False, "lm_head.weight" not in names
    elif "scale_decoder_outputs" in hf:
        # transformers 5 writes tie_word_embeddings=True always; whether the LM head is its own
        # matrix shows in the weights, and the scale has its own key.
        scale, tied = hf["scale_decoder_outputs"], "lm_head.weight" not in names
    else:
        scale = tied = hf.get("tie_word_embeddings", True) is not False
    common = common_from_hf(hf, pad=0, bos=None, eos=1)
    encoder = _encoder_only(hf, names)
    return dict(family="encoder" if encoder else "encoder-decoder",
                vocab_size=hf["vocab_size"], hidden_size=d,
                num_heads=hf["num_heads"], head_dim=hf.get("d_kv", 64),
                encoder_layers=hf["num_layers"],
                decoder_layers=0 if encoder else hf.get("num_decoder_layers") or hf["num_layers"],
                intermediate_size=hf["d_ff"], activation=activation_from_hf(act),
                gated_mlp=gated, norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6),
                position="relative",
                relative_buckets=hf.get("relative_attention_num_buckets", 32),
                relative_max_distance=hf.get("relative_attention_max_distance", 128),
                max_positions=hf.get("n_positions", 512), attention_bias=False, mlp_bias=False,
                scale_attention=False, dropout=hf.get("dropout_rate", 0.1),
                attention_dropout=hf.get("dropout_rate", 0.1), tie_embeddings=tied,
                output_scale=d ** -0.5 if scale else 1.0,
                decoder_start_id=hf.get("decoder_start_token_id", common["pad_id"]), **common)


def _to_hf(cfg: ModelConfig, mt5: bool = False) -> dict[str, Any]:
    act = _FF_TO_HF[cfg.activation]
    ff = ("gated-gelu" if act == "gelu_new" else f"gated-{act}") if cfg.gated_mlp else act
    out = dict(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, num_heads=cfg.num_heads,
               d_kv=cfg.dim_per_head, num_layers=cfg.encoder_layers,
               num_decoder_layers=cfg.decoder_layers or cfg.encoder_layers,
               d_ff=cfg.intermediate_size, feed_forward_proj=ff,
               layer_norm_epsilon=cfg.norm_eps,
               relative_attention_num_buckets=cfg.relative_buckets,
               relative_attention_max_distance=cfg.relative_max_distance,
               dropout_rate=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
               decoder_start_token_id=cfg.decoder_start_id,
               is_encoder_decoder=cfg.family == "encoder-decoder", **common_to_hf(cfg))
    if not mt5:  # transformers 5 reads the scale from this key (4.x from tie_word_embeddings)
        out["scale_decoder_outputs"] = cfg.output_scale != 1.0
    return out


def _spec(model_type: str, name: str) -> Spec:
    mt5 = model_type == "mt5"
    return Spec(model_type, {"none": f"{name}Model", "lm": f"{name}ForConditionalGeneration"},
                "", ("lm_head",), lambda hf, names: _from_hf(hf, names, mt5),
                lambda cfg: _to_hf(cfg, mt5), _table,
                # an unused table some checkpoints carry in the decoder's cross-attention
                ignore=(r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias"
                        r"\.weight",),
                encoder_architectures={"none": f"{name}EncoderModel"})


SPECS = [_spec("t5", "T5"), _spec("mt5", "MT5")]
