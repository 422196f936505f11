"""Small parts every block uses: norms, activations, the MLP, sinusoidal positions."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from lmkit.config import ModelConfig
from lmkit.model.quant import Int8Linear

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


class _MaskedScale(torch.autograd.Function):
    """x * scale where `keep`, else 0; saves the bool mask (one byte per element) for
    backward, as F.dropout does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def cheap_dropout(x: torch.Tensor) -> bool:
    """Whether `dropout` draws its own mask for `x`: on the CPU, outside torch.compile (CUDA's
    and inductor's dropout kernels fuse the mask already)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with a cheaper mask on the CPU.

    bernoulli_ draws one number per element (15% of a MiniLM fine-tuning step on a 2-core
    CPU); here each 64-bit draw of the same generator gives four 16-bit lanes, one per
    element, and an element is dropped when its lane falls in the lowest round(p * 2^16)
    values: p is rounded to a multiple of 2^-16 (0.1 -> 0.100006) and the survivors are
    scaled by 1 / (1 - that p). Seeded runs stay reproducible (torch.manual_seed; activation
    checkpointing restores the generator, so recomputation redraws the same mask). Where
    `cheap_dropout` says no, F.dropout."""
    if not training or p == 0:
        return x
    if p >= 1 or not cheap_dropout(x):
        return F.dropout(x, p, True)
    dropped = round(p * 65536)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= dropped - 32768
    return _MaskedScale.apply(x, keep, 65536 / (65536 - dropped))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (the cheaper CPU mask); nothing at all outside training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


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


def lay_out(model: nn.Module, decoding: bool) -> None:
    """Lay out the weight of every linear layer on the CPU for the work at hand (the same
    values, shape and names; idempotent; saving writes row-major either way).

    `decoding`: each (out, in) weight is stored as its row-major transpose (in, out), so that
    `weight` is a transposed view and F.linear multiplies by a row-major matrix: MKL's
    matmuls of a few rows run faster so (measured on a 2-core Xeon, fp32: 16 rows x 512 ->
    2048 0.75 -> 0.32 ms, a 58k-word head 22 -> 16.5 ms; Marian-shaped beam search 1.18x
    faster).
    Otherwise row-major again: a training step is ~10% slower on the transposed layout, and
    a training loop whose evaluation decodes (seq2seq) lays the weights back out after it;
    the copies kept for decoding (`packed_linears`' packed weights, `fuse`'s fused
    projections), stale once training writes the weights, are dropped."""
    with torch.inference_mode(False):  # under generate's: the copies must stay trainable
        for m in model.modules():
            _lay_out(m, decoding)


def _lay_out(m: nn.Module, decoding: bool) -> None:
    w = m.weight if isinstance(m, nn.Linear) else None
    if w is None or w.device.type != "cpu" or type(w.data) is not torch.Tensor:
        return  # CUDA's matmuls do not care; sharded (DTensor) weights stay as they are
    if decoding and w.is_contiguous() and not w.t().is_contiguous():
        w.data = w.data.t().contiguous().t()
    elif not decoding and not w.is_contiguous():
        w.data = w.data.contiguous()
    if not decoding:  # stale once training changes the weight: free them now
        _PACKED.pop(w, None)
        _FUSED.pop(w, None)


# What decoding keeps between calls, weakly keyed by a weight (it goes with the model):
# weight -> ((rows, its `_stamp`), its MKL-packed copy) and, for layers fused, their first
# weight -> (the `_stamp`s of what they hold, the fused layer). See `_kept`.
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_FUSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _stamp(t: torch.Tensor | None) -> tuple[int, int] | None:
    """What changes when a tensor's values may have: its storage, or its version (in-place
    writes; an inference tensor has no counter, and nothing may write it)."""
    if t is None:
        return None
    return t.data_ptr(), 0 if t.is_inference() else t._version


def _kept(cache: WeakIdKeyDictionary, owner: torch.Tensor, stamp: object,
          build: Callable[[], object]) -> object:
    """cache[owner]'s value while it was built under `stamp`, else build() kept under it."""
    hit = cache.get(owner)
    if hit is None or hit[0] != stamp:
        hit = cache[owner] = (stamp, build())
    return hit[1]


_MKL_LINEAR = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class _PackedLinear(TorchFunctionMode):
    """F.linear over exactly `rows` rows, with a float32 CPU weight that is a Parameter,
    multiplies by an MKL-packed copy of the weight (`packed_linears`)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], kwargs.get("weight", args[1] if len(args) > 1 else None)
            bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
            if self._packs(x, weight):
                return torch.ops.mkl._mkl_linear(x, self._packed(weight), weight, bias,
                                                 self.rows)
        return func(*args, **kwargs)

    def _packs(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # Parameters only: a float copy made per call (an int8 layer's) would be packed per
        # call. No autograd through the packed op: inference only.
        return (isinstance(weight, nn.Parameter) and weight.device.type == "cpu"
                and weight.dtype == x.dtype == torch.float32 and weight.dim() == 2
                and x.numel() == self.rows * x.shape[-1] and not torch.is_grad_enabled())

    def _packed(self, weight: torch.Tensor) -> torch.Tensor:
        return _kept(_PACKED, weight, (self.rows, _stamp(weight)),
                     lambda: torch.ops.mkl._mkl_reorder_linear_weight(weight, self.rows))


def packed_linears(rows: int, device: torch.device) -> contextlib.AbstractContextManager:
    """Run a decoding step of `rows` sequences (2 or more, on the CPU) with MKL-packed
    weights: inside, F.linear over exactly `rows` rows with a float32 weight Parameter
    multiplies by a copy of the weight packed by MKL for that many rows (what inductor's
    freezing does), which is faster than any plain layout at a few rows (measured on a
    2-core Xeon, fp32: 16 rows through a 58k-word head 16.0 -> 11.3 ms, 4 rows x 768 -> 3072
    0.55 -> 0.35 ms; one row gains nothing). Other calls run as they are. Packing costs
    about what one short generation gains (Marian's decoder and head: 0.23 s), so the
    copies stay (~1.3x the weights they pack; one row count per weight) for later calls of
    the same batch size; training drops them (`lay_out`)."""
    if rows < 2 or device.type != "cpu" or not _MKL_LINEAR:
        return contextlib.nullcontext()
    return _PackedLinear(rows)


def fuse(linears: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One projection for linear layers that read the same input, their outputs concatenated:
    one matmul instead of several. None unless they are all plain nn.Linear or all int8
    (`Int8Linear`, fused as int8): LoRA layers must run as they are. Kept for the next call
    (the next generation) until one of the tensors it joins changes."""
    kinds = {type(m) for m in linears}
    if len(kinds) != 1 or not kinds <= {nn.Linear, Int8Linear}:
        return None
    stamp = tuple(_stamp(getattr(m, name, None)) for m in linears
                  for name in ("weight", "bias", "scales"))

    def build() -> Callable[[torch.Tensor], torch.Tensor]:
        # plain tensors, even under generate's inference mode: a later call may not be in it
        with torch.inference_mode(False), torch.no_grad():
            return _fused(linears, kinds == {Int8Linear})

    return _kept(_FUSED, linears[0].weight, stamp, build)


def _fused(linears: Sequence[nn.Module], int8: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    bias = None
    if any(m.bias is not None for m in linears):
        ref = next(m.bias for m in linears if m.bias is not None)
        bias = torch.cat([m.bias if m.bias is not None else ref.new_zeros(m.out_features)
                          for m in linears])
    if int8:
        return Int8Linear(torch.cat([m.weight for m in linears]),
                          torch.cat([m.scales for m in linears]), bias, linears[0].plan)
    # in the layout of the weights it fuses (`lay_out`): transposed ones stay transposed
    transposed = not linears[0].weight.is_contiguous()
    weight = (torch.cat([m.weight.t() for m in linears], dim=1).t() if transposed
              else torch.cat([m.weight for m in linears]))
    # a (frozen) Parameter, as the weights it joins: `packed_linears` packs weights
    return partial(F.linear, weight=nn.Parameter(weight, requires_grad=False), bias=bias)


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
        self.drop = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(self.drop(h))


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The 2017 paper's fixed position encoding, laid out [sin | cos] (fairseq, Marian).

    Computed on the fly from position ids, so it needs no buffer and follows packed or
    left-padded positions like every other scheme."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) * 2 / dim)
    angles = positions[..., None].float() * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
