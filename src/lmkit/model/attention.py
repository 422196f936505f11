"""Attention: one mask builder (padding, causal, packed segments), rotary and relative
position schemes, grouped-query heads, and the key/value cache. Scores go through
`F.scaled_dot_product_attention`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.config import ModelConfig
from lmkit.model.layers import make_norm


# ---- masks -------------------------------------------------------------------------------
def segments_from(attention_mask: torch.Tensor | None,
                  segment_ids: torch.Tensor | None) -> torch.Tensor | None:
    """One tensor for padding and packing: 0 = padding, 1..n = the sequence a token is in.

    An `attention_mask` of 1/0 is the special case of one sequence per row. Returns None when
    every token is real and alone in its row, so attention can take the fast unmasked path."""
    if segment_ids is not None:
        return segment_ids.long()
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.long()


def positions_from(segments: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at the start of every segment (and after left padding),
    so a sequence gets the same positions packed, padded or alone."""
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def build_mask(q_segments: torch.Tensor | None, k_segments: torch.Tensor | None,
               q_len: int, k_len: int, causal: bool, device: torch.device,
               window: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """The single attention mask: (B or 1, 1, q_len, k_len) bool, True = may attend.

    A query sees a key when both are in the same segment, the key is not padding, (if
    causal) the key is not in the future and (with a `window`) the key is at most `window`
    positions away (a decoder's sliding window W is window W - 1; ModernBERT's local blocks
    look both ways). Queries are the last q_len of the k_len positions (a KV cache holds the
    earlier ones). Returns (mask, is_causal): (None, True/False) when SDPA's built-in causal
    flag or no mask at all says the same thing faster."""
    windowed = window is not None and window < k_len - 1  # else every key is near enough
    if q_segments is None and k_segments is None and not windowed:
        if not causal or q_len == 1:
            return None, False
        if q_len == k_len:
            return None, True
    offset = k_len - q_len
    allowed = torch.ones(1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(offset)[None]
    if windowed:  # distances within a segment are column distances
        q_idx = torch.arange(offset, k_len, device=device)
        near = (q_idx[:, None] - torch.arange(k_len, device=device)[None]).abs() <= window
        allowed = allowed & near[None]
    if k_segments is not None:
        qs = q_segments if q_segments is not None else torch.ones_like(k_segments[:, -q_len:])
        allowed = allowed & (qs[:, :, None] == k_segments[:, None, :]) & \
            (k_segments[:, None, :] > 0)
    # A padding query may see nothing; let it see everything instead, because SDPA turns a
    # fully masked row into NaN, which would then leak into real tokens through the values.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None], False


def add_bias(mask: torch.Tensor | None, bias: torch.Tensor, q_len: int, k_len: int,
             causal: bool) -> torch.Tensor:
    """Fold a position bias (B or 1, H, q, k) into a float mask (-inf where not allowed)."""
    if mask is None and causal:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=bias.device).tril(k_len - q_len)
    if mask is None:
        return bias
    return bias.masked_fill(~mask, float("-inf"))


# ---- positions ---------------------------------------------------------------------------
def rotary(positions: torch.Tensor, cfg: ModelConfig,
           theta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (B or 1, 1, T, rotated dims) for rotary embeddings (Llama layout:
    the rotated half is the second half of the rotated dims, not interleaved pairs); `theta`
    overrides cfg.rope_theta (ModernBERT's local blocks)."""
    rot = int(cfg.dim_per_head * cfg.rotary_fraction)
    inv_freq = inverse_frequencies(cfg, rot, positions, theta)
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    scale = (cfg.rope_scaling or {}).get("attention_factor", 1.0)  # YaRN's, else 1
    return angles.cos() * scale, angles.sin() * scale


def inverse_frequencies(cfg: ModelConfig, rot: int, positions: torch.Tensor,
                        theta: float | None = None) -> torch.Tensor:
    """The rotary frequencies, scaled as `cfg.rope_scaling` says (as transformers computes
    them): linear divides them by the factor; dynamic NTK raises the base once the sequence
    (the largest position + 1 in this call) outgrows the original length; llama3 divides the
    low frequencies by the factor, keeps the high ones and blends the band between; YaRN
    blends interpolated (divided) and original frequencies along a linear ramp over the
    dimensions between the beta_fast and beta_slow rotation counts (its attention factor
    scales cos and sin in `rotary`)."""
    scaling = cfg.rope_scaling or {"type": "none"}
    exponents = torch.arange(0, rot, 2, dtype=torch.int64, device=positions.device).float() / rot
    base = torch.tensor(theta or cfg.rope_theta, device=positions.device)
    if scaling["type"] == "dynamic":
        factor, original = scaling["factor"], scaling["original_max_positions"]
        length = torch.clamp(positions.max() + 1, min=original)
        base = base * ((factor * length / original) - (factor - 1)) ** (rot / (rot - 2))
    inv_freq = 1.0 / base ** exponents
    if scaling["type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling["type"] == "llama3":
        factor, original = scaling["factor"], scaling["original_max_positions"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(medium, blended, scaled)
    elif scaling["type"] == "yarn":
        inv_freq = _yarn(inv_freq, scaling, rot, float(base))
    return inv_freq


def _yarn(inv_freq: torch.Tensor, scaling: dict, rot: int, base: float) -> torch.Tensor:
    """YaRN's frequencies: dimensions that turn fewer than beta_slow times over the original
    length are interpolated (divided by the factor), those turning more than beta_fast times
    kept, a linear ramp between."""
    original = scaling["original_max_positions"]

    def dim_of(turns: float) -> float:  # the dimension that turns `turns` times over `original`
        return rot * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(scaling["beta_fast"]), dim_of(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    high = high + 0.001 if low == high else high  # no division by zero
    ramp = ((torch.arange(rot // 2, device=inv_freq.device).float() - low) / (high - low))
    keep = 1 - ramp.clamp(0, 1)  # 1: original frequency, 0: interpolated
    return inv_freq / scaling["factor"] * (1 - keep) + inv_freq * keep


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    if rot == x.shape[-1]:  # every dim rotated: fewer ops (each step of decoding runs this)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = x * cos + torch.cat([-x2, x1], dim=-1) * sin
        return rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


class RelativeBias(nn.Module):
    """T5's learned bias per head for each bucket of relative distance (log-spaced buckets
    beyond `buckets // 2`), computed once per stack and added to every layer's scores."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bias = nn.Embedding(cfg.relative_buckets, cfg.num_heads)
        self.buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.bidirectional = bidirectional

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        n, out = self.buckets, torch.zeros_like(relative)
        if self.bidirectional:
            n //= 2
            out = out + (relative > 0).long() * n
            relative = relative.abs()
        else:
            relative = -relative.clamp(max=0)
        exact = n // 2
        large = exact + (torch.log(relative.float() / exact) / math.log(self.max_distance / exact)
                         * (n - exact)).long()
        large = large.clamp(max=n - 1)
        return out + torch.where(relative < exact, relative, large)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        relative = k_pos[:, None, :] - q_pos[:, :, None]
        return self.bias(self.bucket(relative)).permute(0, 3, 1, 2)


# ---- the cache -----------------------------------------------------------------------------
class KVSlot:
    """Keys and values of one attention layer, kept across generation steps.

    Each lives in a buffer (B, K, capacity, D) allocated once for the whole generation
    (grown by doubling if a call outruns `capacity`) and written in place: a step copies only
    its own keys and values, and attention reads the filled prefix as a view. `qkv` holds the
    layer's query/key/value projections fused for this generation (Attention.fused_qkv)."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def k(self) -> torch.Tensor | None:
        return self._filled(self.keys)

    @property
    def v(self) -> torch.Tensor | None:
        return self._filled(self.values)

    def _filled(self, buf: torch.Tensor | None) -> torch.Tensor | None:
        if buf is None or buf.shape[2] == self.length:  # full (cross-attention): no view
            return buf
        return buf.narrow(2, 0, self.length)

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, K, T, D) keys and values; return all of them so far (views)."""
        start, t = self.length, k.shape[2]
        if self.keys is None or start + t > self.keys.shape[2]:
            held = 0 if self.keys is None else self.keys.shape[2]
            size = max(start + t, self.capacity, 2 * held)
            self.keys, self.values = (self._grown(old, new, size)
                                      for old, new in ((self.keys, k), (self.values, v)))
        self.keys.narrow(2, start, t).copy_(k)
        self.values.narrow(2, start, t).copy_(v)
        self.length = start + t
        return self.keys.narrow(2, 0, self.length), self.values.narrow(2, 0, self.length)

    def _grown(self, old: torch.Tensor | None, new: torch.Tensor, size: int) -> torch.Tensor:
        buf = new.new_empty(new.shape[0], new.shape[1], size, new.shape[3])
        if self.length:
            buf.narrow(2, 0, self.length).copy_(old.narrow(2, 0, self.length))
        return buf

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows named by `index`, in place when the number of rows stays."""
        if self.keys is None:
            return
        for name in ("keys", "values"):
            buf = getattr(self, name)
            kept = buf.narrow(2, 0, self.length).index_select(0, index)
            if len(index) != buf.shape[0]:  # a new number of rows: a new buffer
                buf = buf.new_empty(len(index), *buf.shape[1:])
                setattr(self, name, buf)
            buf.narrow(2, 0, self.length).copy_(kept)


class KVCache:
    """Self-attention slots grow by one step at a time; cross-attention slots are filled once
    per source sentence and reused at every step. `capacity`: the most positions a
    generation will hold (prompt + new tokens), so the buffers are allocated once."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.self_attn = [KVSlot(capacity) for _ in range(num_layers)]
        self.cross_attn = [KVSlot() for _ in range(num_layers)]

    def __len__(self) -> int:
        return self.self_attn[0].length

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep the rows named by `index` (beam search picks which hypotheses continue);
        `cross=False` leaves the cross-attention slots (rows of the same source)."""
        for slot in self.self_attn + (self.cross_attn if cross else []):
            slot.reorder(index)


# ---- attention -----------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention, self or cross."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd, bias = cfg.hidden_size, cfg.dim_per_head, cfg.attention_bias
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, hd
        self.q = nn.Linear(d, cfg.num_heads * hd, bias=bias)
        self.k = nn.Linear(d, cfg.kv_heads * hd, bias=bias)
        self.v = nn.Linear(d, cfg.kv_heads * hd, bias=bias)
        self.o = nn.Linear(cfg.num_heads * hd, d, bias=cfg.out_bias)
        # Qwen3: queries and keys normalised per head (over head_dim) before rotary
        self.q_norm = make_norm(cfg, hd) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, hd) if cfg.qk_norm else None
        self.scale = 1 / math.sqrt(hd) if cfg.scale_attention else 1.0
        self.dropout = cfg.attention_dropout

    def fused_qkv(self, slot: KVSlot) -> bool:
        """Put the q, k and v projections, concatenated, in `slot.qkv` (once per generation:
        the weights do not change while it runs); False when they cannot be fused (LoRA)."""
        if slot.qkv is None:
            parts = (self.q, self.k, self.v)
            if any(type(m) is not nn.Linear for m in parts):
                return False
            bias = None
            if any(m.bias is not None for m in parts):
                bias = torch.cat([m.bias if m.bias is not None else
                                  m.weight.new_zeros(m.out_features) for m in parts])
            slot.qkv = (torch.cat([m.weight for m in parts]), bias)
        return True

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, T, heads * head_dim) -> (B, heads, T, head_dim)."""
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                slot: KVSlot | None = None) -> torch.Tensor:
        """x: (B, T, hidden). context: the encoder output for cross-attention, else None.
        mask: bool (True = attend) or float (added to scores).

        Shapes: H = num_heads, K = kv_heads (H for MHA, fewer for GQA, 1 for MQA), D =
        head_dim, S = key positions (T for self-attention without a cache, past + T with one,
        the source length for cross-attention)."""
        h, k_heads = self.num_heads, self.kv_heads
        fused = context is None and slot is not None and self.fused_qkv(slot)
        if fused:  # generation: one matmul for queries, keys and values (B, H + 2K, T, D)
            heads = self._split(F.linear(x, *slot.qkv), h + 2 * k_heads)
            qk, v = heads.narrow(1, 0, h + k_heads), heads.narrow(1, h + k_heads, k_heads)
            if rope is not None and self.q_norm is None:  # one rotation for both
                qk, rope = apply_rotary(qk, *rope), None
            q, k = qk.narrow(1, 0, h), qk.narrow(1, h, k_heads)
        else:
            q = self._split(self.q(x), h)  # (B, H, T, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if context is not None and slot is not None and slot.length:
            k, v = slot.k, slot.v  # cross-attention keys/values: computed once per source
        else:
            if not fused:
                source = x if context is None else context  # (B, S, hidden)
                k = self._split(self.k(source), k_heads)  # (B, K, S, D)
                v = self._split(self.v(source), k_heads)  # (B, K, S, D)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if rope is not None:  # cos, sin: (B or 1, 1, T, rotated dims)
                q = apply_rotary(q, *rope)
                k = apply_rotary(k, *rope)
            if slot is not None:  # prepend the cached keys/values: S = past + T
                k, v = slot.extend(k, v)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # a position bias: (B or 1, H, T, S)
        # SDPA repeats each of the K key/value heads for H / K query heads (enable_gqa).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.kv_heads != self.num_heads)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, T, H * D)
        return self.o(y)  # (B, T, hidden)
