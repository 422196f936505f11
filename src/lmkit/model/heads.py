"""Task heads on top of the body's hidden states: LM, masked LM, classification, tagging.

Each class is a row of `lmkit.config.HEADS`, which says what the rest of the code needs to
know about it (its loss, whether it ties to the embeddings, needs labels, pools)."""

from __future__ import annotations

import torch
from torch import nn

from lmkit.config import POOLINGS, ModelConfig
from lmkit.model.layers import ACTIVATIONS, Dropout, make_norm


class LMHead(nn.Module):
    """Next-token (or target-token) logits over the vocabulary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.scale = cfg.output_scale

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """What the vocabulary projection reads (the fused loss projects it itself)."""
        return h * self.scale if self.scale != 1.0 else h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(h))


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense + activation + LayerNorm, then the vocabulary projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.dense = nn.Linear(d, d, bias=cfg.head_dense_bias) if cfg.mlm_transform else None
        self.norm = make_norm(cfg, kind="layernorm") if cfg.mlm_transform else None
        self.act = ACTIVATIONS[cfg.activation]
        self.proj = nn.Linear(d, cfg.vocab_size)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """What the vocabulary projection reads (the fused loss projects it itself)."""
        return self.norm(self.act(self.dense(h))) if self.dense is not None else h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(h))


class ClassificationHead(nn.Module):
    """One label per sequence from a pooled vector (optionally through a dense layer first:
    BERT's pooler, RoBERTa's and BART's classification heads; then a norm: ModernBERT's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        hidden = cfg.classifier_hidden
        self.dense = nn.Linear(d, d, bias=cfg.head_dense_bias) if hidden else None
        self.act = ACTIVATIONS[cfg.classifier_activation]
        self.norm = make_norm(cfg, kind="layernorm") if hidden and cfg.classifier_norm else None
        self.drop = Dropout(cfg.dropout)
        self.proj = nn.Linear(d, cfg.num_labels, bias=cfg.classifier_bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            pooled = self.act(self.dense(self.drop(pooled)))
        if self.norm is not None:
            pooled = self.norm(pooled)
        return self.proj(self.drop(pooled))


class TokenClassificationHead(nn.Module):
    """One label per token (named-entity recognition, tagging)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.drop = Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(h))


def pool(h: torch.Tensor, how: str, segments: torch.Tensor | None,
         input_ids: torch.Tensor, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """Reduce (B, T, d) to (B, d): the first token, the last real token (works with left and
    right padding), the mean of real tokens, or the last real EOS token (BART)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if segments is None else segments > 0
    rows = torch.arange(h.shape[0], device=h.device)
    idx = torch.arange(h.shape[1], device=h.device)
    if how == "first":
        return h[:, 0]
    if how == "last":
        return h[rows, (idx * real).argmax(-1)]
    if how == "eos":
        if not eos_ids:
            raise ValueError("eos pooling needs config.eos_id")
        eos = torch.isin(input_ids, torch.tensor(eos_ids, device=input_ids.device))
        return h[rows, (idx * (eos & real)).argmax(-1)]
    if how == "mean":
        weights = real.to(h.dtype)[..., None]
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1)
    raise ValueError(f"pooling={how!r} is not supported; choose one of {POOLINGS}")
