"""`compile: true`: the training forward and backward through torch.compile (inductor: C++
on CPU, Triton on CUDA), falling back to eager, with one warning, when compiling fails.

torch.compile wraps the module; only the training step goes through the wrapper. The loop
keeps the original module for everything else (evaluation, which would otherwise compile
again for eval mode, checkpoints, whose tensor names stay those of the model). Compiling
takes time at the first step (and again if a batch shape is new): a short run can be slower
in all than an eager one, a long one faster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger("lmkit")


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises: dynamo's and inductor's errors (a missing or
    failing C++ compiler is an InductorError), and the compiler's process failing to start."""
    import torch._dynamo.exc

    return (torch._dynamo.exc.TorchDynamoException, OSError)


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
        try:
            return step(self.net, *args)
        except compile_errors() as e:
            if not fresh:  # gradients of earlier micro-batches: a retry would count twice
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("compile: torch.compile could not compile the model (%s: %s); "
                        "training goes on without compiling (eager, the same results, "
                        "slower). On CPU it needs a C++ compiler (g++ or clang)",
                        type(e).__name__, first[:300])
            self.net = self.eager
            self.eager.zero_grad(set_to_none=True)
            return step(self.eager, *args)
