"""Cross-entropy over a vocabulary without the (tokens, vocab) logits in memory.

A language model's last projection and its loss, fused and taken a chunk of rows at a time:
each chunk's logits exist only while its loss and its gradients (for the hidden states, the
weight and the bias) are computed, in the forward pass. Backward then only scales the stored
gradients. The FLOPs are those of the plain projection + loss + backward (nothing is
recomputed); the memory is one chunk of logits instead of all of them (GPT-2, batch 4 x 256:
206 MB of fp32 logits and as much again for their gradient, vs 64 MB).

A chunk must not be small: every chunk reads the whole (vocab, d) weight twice and
accumulates into its gradient, so memory traffic grows with the number of chunks (GPT-2 on a
2-core CPU: 13 chunks of 83 rows made the head 1.5x slower than the plain loss; 4 of 333 rows
match it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in fp32): rows = this // vocab
# At most this many logits (4 MB in fp32; nanoGPT's character model: 768 x 65) cost less as
# the plain projection + cross-entropy over every row: no chunk loop, no selection of rows.
SMALL_LOGITS = 1 << 20


def small_logits(rows: int, vocab: int) -> bool:
    """Whether `rows` x `vocab` logits are few enough for the plain loss (SMALL_LOGITS)."""
    return rows * vocab <= SMALL_LOGITS


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(h @ weight.T + bias, targets), gradients computed in
    forward chunk by chunk (and only those the autograd graph asks for)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = (torch.get_autocast_dtype(h.device.type)
                 if torch.is_autocast_enabled(h.device.type) else h.dtype)
        w = weight.to(dtype)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], rows):
                hc, tc = h[start:start + rows].to(dtype), targets[start:start + rows]
                logits = (hc @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(tc), device=h.device), tc] -= 1.0
                if need_b:
                    grad_b += grad.sum(0)
                grad = grad.to(dtype)
                if need_h:
                    grad_h[start:start + rows] = (grad @ w).to(h.dtype)
                if need_w and dtype == torch.float32:  # in place: no (vocab, d) temporary
                    grad_w.addmm_(grad.T, hc)
                elif need_w:
                    grad_w += (grad.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_out).to(w_dtype) if grad_w is not None else None,
                (grad_b * grad_out).to(b_dtype) if grad_b is not None else None,
                None)


def linear_cross_entropy(h: torch.Tensor, proj: torch.nn.Linear, targets: torch.Tensor
                         ) -> torch.Tensor:
    """Summed cross-entropy of `proj(h)` (rows of `h`: (N, d)) against `targets` (N,), every
    target a real class id (drop ignored positions first)."""
    if h.shape[0] == 0:
        return h.new_zeros((), dtype=torch.float32) + 0.0 * proj.weight.sum()
    return LinearCrossEntropy.apply(h, proj.weight, proj.bias, targets)


def plain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore: int
                        ) -> torch.Tensor:
    """The reference the fused loss equals: summed cross-entropy over materialised logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore, reduction="sum")
