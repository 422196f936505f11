"""Small parts every block uses: norms, activations, the MLP, sinusoidal positions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.config import ModelConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose scale is `offset + weight` (Gemma's (1 + w); offset 0 is plain RMSNorm)."""

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__(size, eps=eps)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset:
            return super().forward(x)
        # Gemma normalises and scales in float32, then casts back
        y = F.rms_norm(x.float(), self.normalized_shape, self.weight.float() + self.offset,
                       self.eps)
        return y.to(x.dtype)


def make_norm(cfg: ModelConfig, size: int | None = None, kind: str | None = None) -> nn.Module:
    """LayerNorm (with a bias unless `cfg.norm_bias` is off) or RMSNorm (scale only, as in T5
    and Llama) over `size` features (default the hidden size; a head's dims for query/key
    norms); `kind` overrides `cfg.norm` (heads whose norm is always a LayerNorm)."""
    size = size or cfg.hidden_size
    if (kind or cfg.norm) == "rmsnorm":
        return RMSNorm(size, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(size, eps=cfg.norm_eps, bias=cfg.norm_bias)


def fuse(linears: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight (and bias) for linear layers that read the same input, their outputs
    concatenated: one matmul instead of several. None when one of them is not a plain
    nn.Linear (LoRA), which must run as it is."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                          for m in linears])
    return torch.cat([m.weight for m in linears]), bias


class MLP(nn.Module):
    """Position-wise feed-forward: down(act(up x)), or gated: down(act(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.up = nn.Linear(d, f, bias=bias)
        self.gate = nn.Linear(d, f, bias=bias) if cfg.gated_mlp else None
        self.down = nn.Linear(f, d, bias=bias)
        self.act = ACTIVATIONS[cfg.activation]
        drop = cfg.dropout if cfg.activation_dropout is None else cfg.activation_dropout
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(self.drop(h) if self.training else h)


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The 2017 paper's fixed position encoding, laid out [sin | cos] (fairseq, Marian).

    Computed on the fly from position ids, so it needs no buffer and follows packed or
    left-padded positions like every other scheme."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) * 2 / dim)
    angles = positions[..., None].float() * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
