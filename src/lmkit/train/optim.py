"""AdamW with the usual parameter groups, a warmup + decay schedule, gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")


def lr_scales(model: nn.Module, decay: float | None) -> dict[str, float]:
    """Per-parameter multipliers of the base learning rate (all 1.0 without decay): the
    head and final norms keep the base rate, each depth below (`Model.depth_groups`: blocks,
    then embeddings) gets `decay` times the rate of the one above."""
    depths = model.parameter_depths()
    top = len(model.depth_groups()) - 1
    return {name: 1.0 if not decay else decay ** (top - depth)
            for name, depth in depths.items()}


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 layer_decay: float = 0.0) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases and embeddings do not (each shared
    parameter, a tied embedding say, is counted once). With `layer_decay` in (0, 1) the
    groups are split further by depth, each with its own learning rate (`lr_scales`)."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    scales = lr_scales(model, layer_decay) if hasattr(model, "config") else {}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():  # shared parameters appear once
        if not p.requires_grad:
            continue
        decays = p.ndim >= 2 and id(p) not in no_decay
        groups.setdefault((decays, scales.get(name, 1.0)), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr": lr * scale}
            for (decays, scale), params in sorted(groups.items(), key=lambda kv: kv[0],
                                                  reverse=True)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    layer_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay, lr, layer_decay)`. The fused kernel
    (one pass over each tensor instead of a dozen) is used on CPU and CUDA: on a 2-core CPU
    it is 4x faster than the default for-loop AdamW, which matters for small-batch
    fine-tuning, where the update of a large embedding matrix costs as much as the forward
    and backward passes."""
    groups = param_groups(model, weight_decay, lr, layer_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_factor(schedule: str, warmup_steps: int, total_steps: int,
              min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at optimizer step `k` (0-based): linear
    warmup over `warmup_steps` (step 0 already gets 1/warmup of the peak), then cosine or
    linear decay to `min_lr_ratio` at `total_steps`, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; choose one of {SCHEDULES}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (k - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                    total_steps: int, min_lr_ratio: float = 0.1
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step (see `lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(schedule, warmup_steps, total_steps, min_lr_ratio))


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (0 = no clipping); returns the norm
    before clipping (inf or nan when a gradient is)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    # FSDP: the norm of sharded gradients is a DTensor, reduced over the ranks' shards
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
