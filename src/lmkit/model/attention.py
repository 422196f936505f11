"""Attention: one mask builder (padding, causal, packed segments), rotary and relative
position schemes, grouped-query heads, and the key/value cache. Scores go through
`F.scaled_dot_product_attention`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.config import ModelConfig
from lmkit.model.layers import cheap_dropout, dropout, fuse, make_norm


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


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """`apply_rotary` in place, in fewer operations (each step of generation runs it): the
    rotated half, (-x2, x1), is x rolled by half the rotated dims with its first half negated."""
    rot = cos.shape[-1]
    x = x if rot == x.shape[-1] else x.narrow(-1, 0, rot)
    turned = x.roll(rot // 2, -1)
    turned.narrow(-1, 0, rot // 2).neg_()
    x.mul_(cos).addcmul_(turned, sin)


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

    They live in one buffer (B, 2K, capacity, D), keys in the first K heads, allocated once
    for the whole generation (grown by doubling if a call outruns `capacity`) and written in
    place: a step copies only its own keys and values, in one copy, and attention reads the
    filled prefix as views. `weights` holds the layer's fused projections for this
    generation (`fused`): `fuse` keeps them across generations and checks the weights they
    join at each call; within one generation the weights do not change, so each step looks
    them up here instead."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.kv: torch.Tensor | None = None
        self.length = 0
        self.weights: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {}
        self.at: torch.Tensor | None = None  # a fixed-shape step's write index (FixedStep)

    def fused(self, name: str, linears: tuple[nn.Module, ...]
              ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """`lmkit.model.layers.fuse(linears)`, asked for at the first step only."""
        if name not in self.weights:
            self.weights[name] = fuse(linears)
        return self.weights[name]

    @property
    def k(self) -> torch.Tensor | None:
        return self._filled(0)

    @property
    def v(self) -> torch.Tensor | None:
        return self._filled(1)

    def _filled(self, half: int) -> torch.Tensor | None:
        if self.kv is None:
            return None
        heads = self.kv.shape[1] // 2
        return self.kv.narrow(1, half * heads, heads).narrow(2, 0, self.length)

    def extend(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, 2K, T, D) keys then values (by head); return all keys and all values
        so far (views)."""
        if self.at is not None:  # a fixed-shape step: attention reads the whole buffer
            self.kv.index_copy_(2, self.at, kv)
            heads = kv.shape[1] // 2
            return self.kv.narrow(1, 0, heads), self.kv.narrow(1, heads, heads)
        start, t = self.length, kv.shape[2]
        if self.kv is None or start + t > self.kv.shape[2]:
            held = 0 if self.kv is None else self.kv.shape[2]
            buf = kv.new_empty(*kv.shape[:2], max(start + t, self.capacity, 2 * held),
                               kv.shape[3])
            if start:
                buf.narrow(2, 0, start).copy_(self.kv.narrow(2, 0, start))
            self.kv = buf
        self.kv.narrow(2, start, t).copy_(kv)
        self.length = start + t
        filled, heads = self.kv.narrow(2, 0, self.length), kv.shape[1] // 2
        return filled.narrow(1, 0, heads), filled.narrow(1, heads, heads)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows named by `index`, in place when the number of rows stays."""
        if self.kv is None:
            return
        kept = self.kv.narrow(2, 0, self.length).index_select(0, index)
        if len(index) != self.kv.shape[0]:  # a new number of rows: a new buffer
            self.kv = self.kv.new_empty(len(index), *self.kv.shape[1:])
        self.kv.narrow(2, 0, self.length).copy_(kept)


class KVCache:
    """Self-attention slots grow by one step at a time; cross-attention slots are filled once
    per source sentence and reused at every step. `capacity`: the most positions a
    generation will hold (prompt + new tokens), so the buffers are allocated once."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.capacity = capacity
        self.self_attn = [KVSlot(capacity) for _ in range(num_layers)]
        self.cross_attn = [KVSlot() for _ in range(num_layers)]
        self.tables: dict[float | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fixed: FixedStep | None = None  # set: each step has the same shapes

    def __len__(self) -> int:
        return self.self_attn[0].length

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep the rows named by `index` (beam search picks which hypotheses continue);
        `cross=False` leaves the cross-attention slots (rows of the same source)."""
        for slot in self.self_attn + (self.cross_attn if cross else []):
            slot.reorder(index)

    def rotary(self, positions: torch.Tensor, cfg: ModelConfig,
               theta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotary(positions, cfg, theta)` for the new positions (B or 1, T) of a step,
        looked up in cos and sin tables of every position the generation holds, computed
        once. Dynamic NTK scaling depends on the length so far: computed each call."""
        if (cfg.rope_scaling or {}).get("type") == "dynamic":
            return rotary(positions, cfg, theta)
        if self.fixed is not None:  # the tables were made for the capacity at the prompt
            return tuple(F.embedding(positions, t)[:, None] for t in self.tables[theta])
        length = len(self) + positions.shape[1]  # positions so far, these included
        table = self.tables.get(theta)
        held = 0 if table is None else table[0].shape[0]
        if held < length:  # grown by doubling, like the keys and values
            every = torch.arange(max(length, self.capacity, 2 * held),
                                 device=positions.device)[None]
            table = self.tables[theta] = tuple(t[0, 0] for t in rotary(every, cfg, theta))
        return tuple(F.embedding(positions, t)[:, None] for t in table)


class FixedStep:
    """A decode step whose tensors keep their shapes from one position to the next, so that
    torch.compile makes one graph for every step (gpt-fast's static cache): one new token per
    row, written at `index` of every self-attention buffer (allocated for the whole
    generation), and attention over the whole buffer, `mask` hiding the slots not yet written,
    padding and keys more than `window` slots back (a sliding window of W tokens: W - 1).

    Made after the prompt's step (`cache` holds it); `prepare` before each step, `advance`
    after it, both eager."""

    def __init__(self, cache: KVCache, segments: torch.Tensor | None,
                 window: int | None = None):
        kv = cache.self_attn[0].kv  # (B, 2K, capacity, D)
        length, capacity = len(cache), kv.shape[2]
        self.cache, self.window = cache, window
        self.index = torch.tensor([length], device=kv.device)  # the slot this step writes
        self.filled = torch.zeros(kv.shape[0], capacity, dtype=torch.bool, device=kv.device)
        self.filled[:, :length] = True if segments is None else segments > 0
        # Positions restart after left padding: the next one is the number of real tokens.
        self.positions = self.filled[:, :length].sum(-1, keepdim=True)  # (B, 1)
        if window is not None and length > window:
            self.filled[:, :length - window] = False
        self.mask = self.filled[:, None, None]  # (B, 1, 1, capacity): a view, kept current
        for slot in cache.self_attn:
            slot.kv.narrow(2, length, capacity - length).zero_()  # masked, but never NaN
            slot.at = self.index
        cache.fixed = self

    def prepare(self) -> None:
        length = len(self.cache)
        self.index.fill_(length)
        self.filled[:, length] = True
        if self.window is not None and length > self.window:  # one key leaves the window
            self.filled[:, length - self.window - 1] = False

    def advance(self) -> None:
        self.positions += 1
        for slot in self.cache.self_attn:
            slot.length += 1

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows named by `index` (their padding and positions)."""
        self.filled = self.filled.index_select(0, index)
        self.mask = self.filled[:, None, None]
        self.positions = self.positions.index_select(0, index)


# ---- attention -----------------------------------------------------------------------------
def attend_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None, is_causal: bool, scale: float,
                        p: float) -> torch.Tensor:
    """SDPA's math with `layers.dropout` on the probabilities: SDPA's CPU kernels cannot
    drop, so with dropout torch runs this same math, with bernoulli_ masks. q (B, H, T, D),
    k and v (B, K, S, D) -> (B, H, T, D). Masked scores get the dtype's lowest value, not
    -inf: a query with no key to attend to (padding) gets a finite output nothing reads."""
    if k.shape[1] != q.shape[1]:  # grouped queries: each key/value head serves H / K heads
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if is_causal:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:  # a float bias
        scores = scores + mask
    return torch.matmul(dropout(scores.softmax(-1), p), v)


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
        qkv = slot.fused("qkv", (self.q, self.k, self.v)) if (
            context is None and slot is not None) else None
        if qkv is not None:  # a generation step, over the fused projections
            q, k, v = self._generation_qkv(x, qkv, rope, slot)
        else:
            q, k, v = self._qkv(x, context, rope, slot)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # a position bias: (B or 1, H, T, S)
        b, t = x.shape[:2]
        grouped = k_heads != h
        if grouped and t == 1 and not is_causal:
            # One query position (a generation step): the H / K queries of a group are H / K
            # query rows for their key/value head, (B, K, H / K, D); no head is repeated.
            q = q.reshape(b, k_heads, -1, self.head_dim)
            if mask is not None and mask.shape[1] > 1:  # a bias per head (B or 1, H, 1, S)
                mask = mask.reshape(mask.shape[0], k_heads, -1, mask.shape[-1])
            grouped = False
        if self.training and self.dropout and cheap_dropout(q):
            y = attend_with_dropout(q, k, v, mask, is_causal, self.scale, self.dropout)
        else:  # SDPA repeats each of the K key/value heads for H / K query heads (enable_gqa)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=grouped)  # (B, H, T, D)
        # (B, T, H * D); with one position, (B, H, 1, D) is already in that order
        y = y.reshape(b, 1, -1) if t == 1 else y.transpose(1, 2).reshape(b, t, -1)
        return self.o(y)  # (B, T, hidden)

    def _qkv(self, x: torch.Tensor, context: torch.Tensor | None,
             rope: tuple[torch.Tensor, torch.Tensor] | None, slot: KVSlot | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, K, S, D) from the three projections."""
        h, k_heads = self.num_heads, self.kv_heads
        q = self._split(self.q(x), h)  # (B, H, T, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if context is not None and slot is not None and slot.length:
            return q, slot.k, slot.v  # cross-attention keys/values: computed once per source
        source = x if context is None else context  # (B, S, hidden)
        k = self._split(self.k(source), k_heads)  # (B, K, S, D)
        v = self._split(self.v(source), k_heads)  # (B, K, S, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if rope is not None:  # cos, sin: (B or 1, 1, T, rotated dims)
            q = apply_rotary(q, *rope)
            k = apply_rotary(k, *rope)
        if slot is not None:  # prepend the cached keys/values: S = past + T
            k, v = slot.extend(torch.cat([k, v], dim=1))
        return q, k, v

    def _generation_qkv(self, x: torch.Tensor, qkv: Callable[[torch.Tensor], torch.Tensor],
                        rope: tuple[torch.Tensor, torch.Tensor] | None, slot: KVSlot
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D) and every key and value so far (B, K, S, D) for a generation
        step: one matmul for the three projections (`qkv`, fused once per generation), queries
        and keys rotated together in place, and one copy of the new keys and values into the
        cache."""
        h, k_heads = self.num_heads, self.kv_heads
        heads = self._split(qkv(x), h + 2 * k_heads)  # (B, H + 2K, T, D)
        if self.q_norm is not None:  # Qwen3: per-head norms before rotary
            heads = torch.cat([self.q_norm(heads.narrow(1, 0, h)),
                               self.k_norm(heads.narrow(1, h, k_heads)),
                               heads.narrow(1, h + k_heads, k_heads)], dim=1)
        if rope is not None:
            rotate_(heads.narrow(1, 0, h + k_heads), *rope)
        k, v = slot.extend(heads.narrow(1, h, 2 * k_heads))
        return heads.narrow(1, 0, h), k, v
