"""Compute accounting from an architecture alone: parameter counts and training FLOPs per token.

Counts come from a model built on the meta device (no memory, no init), so they are always
the model's own numbers, never a second formula that could drift from it.
"""

from __future__ import annotations

import torch

from lmkit.config import ModelConfig
from lmkit.model import Model


def _meta_model(config: ModelConfig) -> Model:
    with torch.device("meta"):
        return Model(config)


def num_parameters(config: ModelConfig, include_embeddings: bool = True) -> int:
    """Parameter count, computed from the config alone (no model needed)."""
    return _meta_model(config).num_parameters(include_embeddings)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of full training, Kaplan/Chinchilla style: 6 x non-embedding
    parameters + attention scores and values (`Model.flops_per_token`, which also counts
    partial schemes: a frozen body, LoRA)."""
    return _meta_model(config).flops_per_token(seq_len)
