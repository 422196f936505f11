"""LoRA: low-rank adapters on chosen linear layers (Hu et al., 2021).

A LoRALinear keeps the frozen base weight under its original name (`...q.weight`) and adds
`lora_a` (rank x in) and `lora_b` (out x rank, zero-initialised so training starts from the
pretrained function). The adapters are part of the architecture (`config.lora`), so a model
with adapters saves, loads and resumes like any other; `merge_lora` folds B @ A * alpha / rank
into the weights and clears `config.lora`, giving back a plain model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmkit.model.layers import Dropout

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Names of the linear layers inside each block: q k v o (attention, also cross-attention)
    # and up gate down (MLP).
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        known = {"q", "k", "v", "o", "up", "gate", "down"}
        if unknown := set(self.targets) - known:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {sorted(known)}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")


class LoRALinear(nn.Linear):
    """y = x W^T + b + dropout(x) A^T B^T * alpha / rank, with W and b frozen."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)  # adopt the base layer's tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=dev,
                                               dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=dev,
                                               dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = cfg.alpha / cfg.rank
        self.lora_dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + (self.lora_b @ self.lora_a) * self.scaling)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The names of the target linear layers inside the model's blocks."""
    return [f"{prefix}.{name}" for prefix, block in model.blocks()
            for name, m in block.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.targets]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA matrices of every adapted layer (what the LoRA scheme trains)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear)
            for p in (m.lora_a, m.lora_b)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), child, new)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Put adapters on the target layers of every block and record them in `model.config`.
    Freezes the base weights of those layers only; which other parameters train is the
    scheme's choice. Returns the adapted layers' names."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first")
    names = _targets(model, cfg)
    if not names:
        raise ValueError(f"no linear layers named {cfg.targets} inside the model's blocks")
    for name in names:
        _swap(model, name, LoRALinear(model.get_submodule(name), cfg))
    model.config.lora = {**asdict(cfg), "targets": list(cfg.targets)}  # as JSON reads it
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place); the model is plain again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _swap(model, name, m.merged())
    model.config.lora = None
    return model


def save_adapter(model: nn.Module, path: str | Path, base: str = "",
                 extra: tuple[str, ...] = ("head.",)) -> Path:
    """Write only what fine-tuning changed: the LoRA tensors and the parameters under `extra`
    (the new task head), plus adapter_config.json naming the base checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if ".lora_" in k or k.startswith(extra)}
    save_file(tensors, path / ADAPTER_WEIGHTS)
    if not model.config.lora:
        raise ValueError("the model has no LoRA adapters to save")
    meta = {"lora": model.config.lora, "base": str(base), "extra": list(extra)}
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put a saved adapter onto `model` (its base checkpoint, with the same head)."""
    path = Path(path)
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    apply_lora(model, LoRAConfig(**meta["lora"]))
    tensors = load_file(path / ADAPTER_WEIGHTS)
    missing = [k for k in model.state_dict() if ".lora_" in k and k not in tensors]
    unknown = [k for k in tensors if k not in model.state_dict()]
    if missing or unknown:
        raise ValueError(f"adapter at {path} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unknown[:5]}; load the base checkpoint it was trained on")
    model.load_state_dict(tensors, strict=False)
    return model
