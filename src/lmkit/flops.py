"""Compute accounting from an architecture alone: parameter counts and training FLOPs per token.

Counts come from a model built on the meta device (no memory, no init), so they are always
the model's own numbers, never a second formula that could drift from it.
"""

from __future__ import annotations

import torch

from lmkit.config import ModelConfig
from lmkit.model import Model


def num_parameters(config: ModelConfig, include_embeddings: bool = True) -> int:
    """Parameter count, computed from the config alone (no model needed)."""
    with torch.device("meta"):
        model = Model(config)
    return model.num_parameters(include_embeddings)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), Kaplan/Chinchilla style:
    6 * non-embedding params + attention score and value terms."""
    d_attn = config.num_heads * config.dim_per_head
    layers = config.encoder_layers + config.decoder_layers
    attention = 2 * 2 * layers * seq_len * d_attn  # QK^T and AV, forward
    return 6 * num_parameters(config, include_embeddings=False) + 3 * attention + \
        6 * config.hidden_size * config.vocab_size * (config.head in ("lm", "mlm"))
