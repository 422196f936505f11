"""BERT, RoBERTa, XLM-RoBERTa and DistilBERT: post-norm encoders with an embedding LayerNorm.

RoBERTa is BERT with learned positions starting at pad_id + 1 (lmkit's `position_offset`) and
its own head names; XLM-RoBERTa is the same layout and names with a 250k vocabulary.
DistilBERT has no token types, fixed LayerNorm eps 1e-12 and other names.
Heads: masked LM (transform + tied decoder + bias), sequence classification (BERT's pooler =
dense + tanh on the first token; RoBERTa's classifier.dense; DistilBERT's pre_classifier + ReLU)
and token classification.
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
from lmkit.convert.tables import Table

_BERT_BODY: Table = [
    ("tokens", "embeddings.word_embeddings"),
    ("encoder.positions", "embeddings.position_embeddings"),
    ("encoder.types", "embeddings.token_type_embeddings"),
    ("encoder.embed_norm", "embeddings.LayerNorm"),
    ("encoder.layers.{i}.attn.q", "encoder.layer.{i}.attention.self.query"),
    ("encoder.layers.{i}.attn.k", "encoder.layer.{i}.attention.self.key"),
    ("encoder.layers.{i}.attn.v", "encoder.layer.{i}.attention.self.value"),
    ("encoder.layers.{i}.attn.o", "encoder.layer.{i}.attention.output.dense"),
    ("encoder.layers.{i}.attn_norm", "encoder.layer.{i}.attention.output.LayerNorm"),
    ("encoder.layers.{i}.mlp.up", "encoder.layer.{i}.intermediate.dense"),
    ("encoder.layers.{i}.mlp.down", "encoder.layer.{i}.output.dense"),
    ("encoder.layers.{i}.mlp_norm", "encoder.layer.{i}.output.LayerNorm"),
]
_BERT_HEADS: dict[str, Table] = {
    "mlm": [("head.dense", "cls.predictions.transform.dense"),
            ("head.norm", "cls.predictions.transform.LayerNorm"),
            ("head.proj.bias", ("cls.predictions.bias", "cls.predictions.decoder.bias")),
            ("head.proj.weight", "cls.predictions.decoder.weight")],
    "classification": [("head.dense", "pooler.dense"), ("head.proj", "classifier")],
    "token-classification": [("head.proj", "classifier")],
}
_ROBERTA_HEADS: dict[str, Table] = {
    "mlm": [("head.dense", "lm_head.dense"), ("head.norm", "lm_head.layer_norm"),
            ("head.proj.bias", ("lm_head.bias", "lm_head.decoder.bias")),
            ("head.proj.weight", "lm_head.decoder.weight")],
    "classification": [("head.dense", "classifier.dense"), ("head.proj", "classifier.out_proj")],
    "token-classification": [("head.proj", "classifier")],
}
_DISTIL_BODY: Table = [
    ("tokens", "embeddings.word_embeddings"),
    ("encoder.positions", "embeddings.position_embeddings"),
    ("encoder.embed_norm", "embeddings.LayerNorm"),
    ("encoder.layers.{i}.attn.q", "transformer.layer.{i}.attention.q_lin"),
    ("encoder.layers.{i}.attn.k", "transformer.layer.{i}.attention.k_lin"),
    ("encoder.layers.{i}.attn.v", "transformer.layer.{i}.attention.v_lin"),
    ("encoder.layers.{i}.attn.o", "transformer.layer.{i}.attention.out_lin"),
    ("encoder.layers.{i}.attn_norm", "transformer.layer.{i}.sa_layer_norm"),
    ("encoder.layers.{i}.mlp.up", "transformer.layer.{i}.ffn.lin1"),
    ("encoder.layers.{i}.mlp.down", "transformer.layer.{i}.ffn.lin2"),
    ("encoder.layers.{i}.mlp_norm", "transformer.layer.{i}.output_layer_norm"),
]
_DISTIL_HEADS: dict[str, Table] = {
    "mlm": [("head.dense", "vocab_transform"), ("head.norm", "vocab_layer_norm"),
            ("head.proj.bias", "vocab_projector.bias"),
            ("head.proj.weight", "vocab_projector.weight")],
    "classification": [("head.dense", "pre_classifier"), ("head.proj", "classifier")],
    "token-classification": [("head.proj", "classifier")],
}


def _bert_from_hf(hf: dict[str, Any], roberta: bool) -> dict[str, Any]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r}: only "
                         "'absolute' positions are supported")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("BERT used as a decoder (is_decoder / add_cross_attention) is not "
                         "supported; use a decoder family such as GPT-2 or Llama")
    if hf.get("type_vocab_size", 2) < 1:
        raise ValueError("type_vocab_size must be at least 1 (a model without token types "
                         "is a DistilBERT)")
    common = common_from_hf(hf, pad=1 if roberta else 0, bos=0 if roberta else None,
                            eos=2 if roberta else None)
    # RoBERTa numbers positions from pad_id + 1; its table has those extra rows.
    offset = common["pad_id"] + 1 if roberta else 0
    return dict(family="encoder", vocab_size=hf.get("vocab_size", 30522),
                hidden_size=hf.get("hidden_size", 768),
                num_heads=hf.get("num_attention_heads", 12),
                encoder_layers=hf.get("num_hidden_layers", 12),
                intermediate_size=hf.get("intermediate_size", 3072),
                activation=activation_from_hf(hf.get("hidden_act", "gelu")),
                norm_position="post", final_norm=False, embed_norm=True,
                norm_eps=hf.get("layer_norm_eps", 1e-12), position="learned",
                max_positions=hf.get("max_position_embeddings", 512) - offset,
                position_offset=offset, type_vocab_size=hf.get("type_vocab_size", 2),
                dropout=hf.get("hidden_dropout_prob", 0.1),
                attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                activation_dropout=0.0, tie_embeddings=hf.get("tie_word_embeddings", True),
                pooling="first",
                classifier_hidden=True, classifier_activation="tanh", mlm_transform=True,
                **common)


def _bert_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_heads, num_hidden_layers=cfg.encoder_layers,
                intermediate_size=cfg.intermediate_size,
                hidden_act=ACTIVATIONS_TO_HF[cfg.activation], layer_norm_eps=cfg.norm_eps,
                max_position_embeddings=cfg.max_positions + cfg.position_offset,
                type_vocab_size=cfg.type_vocab_size, hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.attention_dropout,
                position_embedding_type="absolute", tie_word_embeddings=cfg.tie_embeddings,
                **common_to_hf(cfg))


def _distil_from_hf(hf: dict[str, Any], names: set[str]) -> dict[str, Any]:
    return dict(family="encoder", vocab_size=hf.get("vocab_size", 30522),
                hidden_size=hf.get("dim", 768), num_heads=hf.get("n_heads", 12),
                encoder_layers=hf.get("n_layers", 6), intermediate_size=hf.get("hidden_dim", 3072),
                activation=activation_from_hf(hf.get("activation", "gelu")),
                norm_position="post", final_norm=False, embed_norm=True, norm_eps=1e-12,
                position="learned", max_positions=hf.get("max_position_embeddings", 512),
                type_vocab_size=0, dropout=hf.get("dropout", 0.1),
                attention_dropout=hf.get("attention_dropout", 0.1),
                activation_dropout=0.0, tie_embeddings=hf.get("tie_word_embeddings", True),
                pooling="first",
                classifier_hidden=True, classifier_activation="relu", mlm_transform=True,
                **common_from_hf(hf, pad=0))


def _distil_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_heads=cfg.num_heads,
                n_layers=cfg.encoder_layers, hidden_dim=cfg.intermediate_size,
                activation=ACTIVATIONS_TO_HF[cfg.activation],
                max_position_embeddings=cfg.max_positions, sinusoidal_pos_embds=False,
                dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                tie_word_embeddings=cfg.tie_embeddings, **common_to_hf(cfg))


def _table(body: Table, heads: dict[str, Table]):  # noqa: ANN202 - a table factory
    return lambda cfg: body + heads.get(cfg.head, [])


def _architectures(name: str, mlm: str = "ForMaskedLM") -> dict[str, str]:
    return {"none": f"{name}Model", "mlm": f"{name}{mlm}",
            "classification": f"{name}ForSequenceClassification",
            "token-classification": f"{name}ForTokenClassification"}


SPECS = [
    Spec("bert", _architectures("Bert"), "bert.", ("cls", "classifier"),
         lambda hf, names: _bert_from_hf(hf, roberta=False), _bert_to_hf,
         _table(_BERT_BODY, _BERT_HEADS),
         ignore=(r"embeddings\.position_ids",),
         carry=(r"pooler\..*", r"cls\.seq_relationship\..*"),
         read_aliases={"BertForPreTraining": "mlm"}),
    *[Spec(model_type, _architectures(name), "roberta.", ("lm_head", "classifier"),
           lambda hf, names: _bert_from_hf(hf, roberta=True), _bert_to_hf,
           _table(_BERT_BODY, _ROBERTA_HEADS),
           ignore=(r"embeddings\.position_ids",), carry=(r"pooler\..*",))
      for model_type, name in (("roberta", "Roberta"), ("xlm-roberta", "XLMRoberta"))],
    Spec("distilbert", _architectures("DistilBert"), "distilbert.",
         ("vocab_transform", "vocab_layer_norm", "vocab_projector", "pre_classifier",
          "classifier"),
         _distil_from_hf, _distil_to_hf, _table(_DISTIL_BODY, _DISTIL_HEADS),
         ignore=(r"embeddings\.position_ids",)),
]
