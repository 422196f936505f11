"""`compile: true`: the training forward and backward through torch.compile (inductor: C++
on CPU, Triton on CUDA), falling back to eager, with one warning, when compiling fails.

torch.compile wraps the module; only the training step goes through the wrapper. The loop
keeps the original module for everything else (evaluation, which would otherwise compile
again for eval mode, checkpoints, whose tensor names stay those of the model). Compiling
takes time at the first step (and again if a batch shape is new): a short run can be slower
in all than an eager one, a long one faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmkit.compiling import compiled_or_eager


class CompiledStep:
    """Runs `step(net, *args)` (forward and backward of a micro-batch) with `net` compiled; if
    compiling fails, warns once and runs this and every later step with the eager `net`
    (the failed attempt's partial gradients cleared first: when the micro-batch started
    with none, which is the case at the first step, where compilation happens)."""

    def __init__(self, net: nn.Module, on: bool):
        self.eager = net
        self.net = torch.compile(net) if on else net

    @property
    def compiled(self) -> bool:
        return self.net is not self.eager

    def __call__(self, step: Callable[..., Any], *args: Any) -> Any:
        if not self.compiled:
            return step(self.eager, *args)
        fresh = all(p.grad is None for p in self.eager.parameters())

        def fall_back() -> bool:
            if not fresh:  # gradients of earlier micro-batches: a retry would count twice
                return False
            self.net = self.eager
            self.eager.zero_grad(set_to_none=True)
            return True

        return compiled_or_eager(lambda *a: step(self.net, *a), lambda *a: step(self.eager, *a),
                                 args, "training", fall_back)
