"""Fine-tuning schemes: which parameters train, and at what learning rate.

    full      every parameter trains
    frozen    the pretrained body is frozen; only the task head trains
    top-k     the last k blocks, the final norm and the head train
    lora      low-rank adapters on chosen layers + the head train; the body is frozen

Layer-wise learning-rate decay (ELECTRA, BEiT) is independent of the scheme: the head keeps
the base rate and each layer below gets `decay` times the rate of the layer above it
(`layer_decay` in the training config; `lr_scales` in lmkit.train.optim).
"""

from __future__ import annotations

from torch import nn

from lmkit.model.lora import LoRAConfig, adapter_parameters, apply_lora
from lmkit.names import SCHEMES


def apply_scheme(model: nn.Module, scheme: str = "full", *, top_k: int = 1,
                 lora: LoRAConfig | None = None) -> dict[str, int]:
    """Set `requires_grad` for a scheme (and add LoRA adapters for 'lora'). Returns counts of
    trainable and total parameters."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown fine-tuning scheme {scheme!r}; choose one of {SCHEMES}")
    cfg = model.config
    if scheme == "lora" and not cfg.lora:  # a resumed LoRA model has its adapters already
        apply_lora(model, lora or LoRAConfig())
    total = cfg.encoder_layers + cfg.decoder_layers
    if scheme == "top-k" and not 0 < top_k <= total:
        raise ValueError(f"top_k={top_k} must be between 1 and the model's {total} blocks")
    depths = model.parameter_depths()
    trains = {id(p) for p in model.head_parameters()}  # every scheme trains the head
    if scheme == "lora":
        trains |= {id(p) for p in adapter_parameters(model)}
    for name, p in model.named_parameters():
        p.requires_grad_({"full": True,
                          "frozen": id(p) in trains,
                          "top-k": depths[name] > total - top_k,
                          "lora": id(p) in trains}[scheme])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}
