"""AdamW with the usual parameter groups, a warmup + decay schedule, gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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


class AdamW(torch.optim.AdamW):
    """torch's AdamW that also takes sparse gradients (a token embedding with `sparse=True`,
    see `sparse_embeddings`): only their rows in the batch are updated, lazily, as
    torch.optim.SparseAdam does (moments and weights of the other rows stay as they are;
    with every row in the batch this is AdamW exactly). Dense gradients go to torch's
    kernel; the state (step, exp_avg, exp_avg_sq) has AdamW's layout, so checkpoints are
    the same."""

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        sparse = [(group, p) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]
        for group, p in sparse:
            self._lazy_step(group, p)
        grads = [p.grad for _, p in sparse]
        for _, p in sparse:  # torch's kernel skips parameters without a gradient
            p.grad = None
        try:
            return super().step(closure)
        finally:
            for (_, p), grad in zip(sparse, grads):
                p.grad = grad

    def _lazy_step(self, group: dict, p: torch.Tensor) -> None:
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("sparse gradients take plain AdamW (no amsgrad, no maximize)")
        grad = p.grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        state = self.state[p]
        if not state:  # AdamW's layout (its step is a float tensor)
            state["step"] = torch.tensor(0.0, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        (b1, b2), lr, eps = group["betas"], float(group["lr"]), group["eps"]
        m = state["exp_avg"][rows].mul_(b1).add_(values, alpha=1 - b1)
        v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(values, values, value=1 - b2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
        weights = p[rows].mul_(1 - lr * group["weight_decay"])
        p[rows] = weights.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


def sparse_embeddings(model: nn.Module, on: bool = True) -> None:
    """Make the token embedding's gradient sparse (only the rows a batch uses), so that
    `AdamW` updates those rows alone: for a large vocabulary and small batches (fine-tuning)
    this skips most of the optimizer's work. Needs an embedding not tied to the output."""
    if on and model.config.tied_output:
        raise ValueError("sparse_embeddings needs token embeddings that are not tied to the "
                         "output projection (a language-model head uses every row)")
    model.tokens.sparse = on


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    layer_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay, lr, layer_decay)`. The fused kernel
    (one pass over each tensor instead of a dozen) is used on CPU and CUDA: on a 2-core CPU
    it is 4x faster than the default for-loop AdamW, which matters for small-batch
    fine-tuning, where the update of a large embedding matrix costs as much as the forward
    and backward passes (or see `sparse_embeddings`)."""
    groups = param_groups(model, weight_decay, lr, layer_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                for g in groups for p in g["params"])
    return AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


class OptimizerInBackward:
    """Step `optimizer` over each parameter as soon as backward has its gradient, then free
    that gradient: the whole set of gradients (4 bytes a parameter in fp32) never exists at
    once (torchtune's optimizer-in-backward). The one optimizer keeps every parameter's state
    and group, so the update, the learning-rate schedule (stepped as usual) and checkpoints
    are those of `optimizer.step()` after backward; but with no clipping by the global
    gradient norm, which does not exist yet when the first parameters step.

        hooks = OptimizerInBackward(optimizer)
        loss.backward()  # every parameter with a gradient has stepped
        norm = hooks.grad_norm()  # of the gradients it stepped with; the sum restarts
        scheduler.step()
        hooks.remove()  # plain backward again"""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.group_of = {p: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.squares: torch.Tensor | None = None  # sum of the squared gradients stepped with
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.group_of]

    @torch.no_grad()
    def _step(self, p: torch.Tensor) -> None:
        square = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        self.squares = square if self.squares is None else self.squares + square
        opt = self.optimizer
        groups = opt.param_groups  # looked up now: a resume's load_state_dict replaces them
        # its group over this one parameter: the step costs the same whatever the model size
        opt.param_groups = [{**groups[self.group_of[p]], "params": [p]}]
        try:
            opt.step()
        finally:
            opt.param_groups = groups
        p.grad = None

    def grad_norm(self) -> torch.Tensor:
        """The global norm of the gradients stepped with since the last call (0 if none)."""
        squares, self.squares = self.squares, None
        return torch.tensor(0.0) if squares is None else squares.sqrt()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


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
    before clipping (inf or nan when a gradient is). Sparse gradients count by their rows."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    max_norm = max_norm if max_norm > 0 else math.inf
    sparse = [p for p in params if p.grad.is_sparse]
    if not sparse:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # FSDP: the norm of sharded gradients is a DTensor, reduced over the ranks' shards
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    for p in sparse:  # repeated rows summed, so that the values are the gradient's
        p.grad = p.grad.coalesce()
    dense = [p.grad for p in params if not p.grad.is_sparse]
    values = [p.grad.values() for p in sparse]
    norms = [n.float() for n in torch._foreach_norm(dense + values)]  # one call, not one each
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if dense:
        torch._foreach_mul_(dense, scale)
    for v in values:  # a sparse gradient's values() share its storage: scaled in place
        v.mul_(scale.to(v.dtype))
    return total
