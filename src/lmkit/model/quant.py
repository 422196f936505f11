"""Weight-only int8 for inference (`dtype="int8"`): the weight of every linear layer of the
body and the head held as int8, one scale per output row (symmetric: w ~ scale * q, q in
[-127, 127]); activations, norms and embeddings stay in floating point.

Decoding one sequence reads every weight once per token, so its speed is bounded by the
memory bandwidth over the weight bytes: int8 reads a quarter of fp32's. On the CPU a call of
a few rows (a decoding step) runs ATen's int8 weight-only kernel (`torch._weight_int8pack_mm`,
bf16 activations in, fp32 out); many rows (a prompt, a batch) run a matmul over the int8
values as floats (exact), in bf16 where the CPU computes it natively, then scale the outputs.
Elsewhere (CUDA) that second way always: correct, but it saves memory, not time.

int8 is for running a model, never for training or saving it: `lmkit.checkpoint.save`
refuses int8 tensors and the training loop refuses a model holding them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.device import cpu_native_bf16, warn_int8

# Up to this many rows (tokens) a call, ATen's int8 kernel reads the weight fastest; with
# more it falls behind even fp32 (2-3x slower at 128 rows, measured), and a matmul over the
# int8 values as floats is faster (docs/ARCHITECTURE.md, "int8 weights").
KERNEL_ROWS = 8


def cpu_plan() -> tuple[bool, bool]:
    """How Int8Linear computes on this CPU: (ATen's int8 kernel for a few rows: wherever torch
    has it, fed bf16 activations, which it reads fast even on AVX2 kernels; fp32 activations
    make it 3-30x slower), (a bf16 matmul for many rows: where bf16 is native)."""
    return hasattr(torch, "_weight_int8pack_mm"), cpu_native_bf16()


class Int8Linear(nn.Module):
    """y = x (scales * weight)^T + bias, with `weight` int8 (out, in) and one bf16 scale per
    output row (the dtype the CPU kernel takes; exact in any wider float). Buffers, not
    parameters: nothing trains them."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None, plan: tuple[bool, bool] = (False, False)):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.plan = plan  # on the CPU: `cpu_plan()` when quantised

    @classmethod
    def quantize(cls, linear: nn.Linear, plan: tuple[bool, bool] = (False, False)
                 ) -> Int8Linear:
        """The int8 copy of `linear` (its weight is left as it is: a tied embedding keeps
        its table)."""
        w = linear.weight.detach().float()
        scales = (w.abs().amax(1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        # a scale rounded down to bf16 may put the largest entry a hair past 127: clamped
        q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias, plan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        kernel, bf16 = self.plan if x.is_cpu else (False, False)
        if kernel and rows <= KERNEL_ROWS:  # ATen's int8 kernel, scales applied inside
            y = torch._weight_int8pack_mm(x.reshape(rows, self.in_features).to(torch.bfloat16),
                                          self.weight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        else:  # int8 values are exact in any float: matmul, then scale each output column
            dtype = torch.bfloat16 if bf16 else x.dtype
            y = F.linear(x.to(dtype), self.weight.to(dtype)) * self.scales.to(dtype)
        return (y if self.bias is None else y + self.bias).to(x.dtype)  # fp32 bias: one op

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of an lmkit Model (body and head, also a head tied to the
    token embeddings, which keep their table for lookups) by its Int8Linear, in place. A
    model with LoRA adapters (`config.lora`) is refused: merge them first
    (`lmkit.model.lora.merge_lora`)."""
    if model.config.lora:
        raise ValueError("int8 quantisation of a model with LoRA adapters: merge them first "
                         "(lmkit.model.lora.merge_lora(model)), or load with dtype int8, "
                         "which merges them")
    plan = cpu_plan()
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear:
            warn_int8(m.weight.device)
            model.set_submodule(name, Int8Linear.quantize(m, plan))
    return model

