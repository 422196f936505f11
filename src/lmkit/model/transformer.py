"""The three families from one set of parts.

    Block  = self-attention (+ cross-attention) + MLP, each a residual branch with a norm
             before (pre) or after (post) it.
    Stack  = positions + embedding norm + Blocks + final norm: the encoder or the decoder.
    Model  = shared token embeddings + encoder and/or decoder + a task head.

What differs between BERT, GPT-2, Llama, BART, T5 or Marian is only the ModelConfig.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmkit.checkpoint import check_layers, check_tensors, save
from lmkit.config import IGNORE_INDEX, ModelConfig
from lmkit.device import resolve_device, weight_dtype
from lmkit.errors import CheckpointError
from lmkit.model import heads
from lmkit.model.attention import (
    Attention,
    KVCache,
    RelativeBias,
    add_bias,
    build_mask,
    positions_from,
    rotary,
    segments_from,
)
from lmkit.model.layers import MLP, Dropout, make_norm, sinusoidal
from lmkit.model.lora import LoRAConfig, apply_lora
from lmkit.model.loss import linear_cross_entropy, plain_cross_entropy, small_logits

log = logging.getLogger("lmkit")


def check_length(cfg: ModelConfig, length: int) -> None:
    """A ValueError when a model with a table of positions gets more than it holds."""
    if length > cfg.max_positions and cfg.position in ("learned", "sinusoidal"):
        raise ValueError(f"sequence of {length} tokens is longer than max_positions="
                         f"{cfg.max_positions}: truncate the input or use a longer model")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, cross: bool, first: bool = False):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.Identity() if first and not cfg.first_attn_norm else make_norm(cfg)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg) if cross else None
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)
        self.pre_norm = cfg.norm_position == "pre"
        self.drop = Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module,
                  branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        y = branch(norm(x) if self.pre_norm else x)
        y = self.drop(y)
        return x + y if self.pre_norm else norm(x + y)

    def forward(self, x: torch.Tensor, mask: Any, is_causal: bool, rope: Any = None,
                context: torch.Tensor | None = None, context_mask: Any = None,
                cache: KVCache | None = None, layer: int = 0,
                first_only: bool = False) -> torch.Tensor:
        """first_only: the output of the first position only (keys and values still from
        every position): all that a head pooling the first token reads of the last block."""
        self_slot = cache.self_attn[layer] if cache is not None else None
        if first_only:
            keys = self.attn_norm(x) if self.pre_norm else x
            x, mask = x[:, :1], mask[:, :, :1] if mask is not None else None
            x = self._residual(x, self.attn_norm, lambda h: self.attn(h, mask, context=keys))
        else:
            x = self._residual(x, self.attn_norm, lambda h: self.attn(
                h, mask, is_causal, rope=rope, slot=self_slot))
        if self.cross_attn is not None:
            cross_slot = cache.cross_attn[layer] if cache is not None else None
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, context_mask, context=context, slot=cross_slot))
        return self._residual(x, self.mlp_norm, self.mlp)


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention in
    encoder-decoder models), with its own position scheme."""

    def __init__(self, cfg: ModelConfig, num_layers: int, causal: bool, cross: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        d = cfg.hidden_size
        self.positions = (nn.Embedding(cfg.max_positions + cfg.position_offset, d)
                          if cfg.position == "learned" else None)
        self.types = nn.Embedding(cfg.type_vocab_size, d) if cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.relative_bias = (RelativeBias(cfg, bidirectional=not causal)
                              if cfg.position == "relative" else None)
        self.layers = nn.ModuleList(Block(cfg, cross, first=i == 0) for i in range(num_layers))
        self.final_norm = make_norm(cfg) if cfg.final_norm else None
        self.drop = Dropout(cfg.dropout)
        self.checkpointing = False  # activation checkpointing (Model.activation_checkpointing)

    def forward(self, x: torch.Tensor, segments: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_segments: torch.Tensor | None = None,
                cache: KVCache | None = None, first_only: bool = False) -> torch.Tensor:
        """x: token embeddings (B, T, d) of the new positions. segments: (B, past + T) for all
        keys, 0 = padding (None = no padding, no packing). context: the encoder output
        (B, S, d) for cross-attention, context_segments its (B, S) segments. first_only: the
        last block computes the first position only (see Block.forward): (B, 1, d)."""
        cfg = self.cfg
        b, t, _ = x.shape
        fixed = cache.fixed if cache is not None else None
        if fixed is not None:  # a fixed-shape decode step: positions and mask are its own
            q_pos = fixed.positions  # (B, 1)
        else:
            past = len(cache) if cache is not None else 0  # positions already in the cache
            # Positions restart in every packed sequence and after left padding.
            if segments is None:
                k_pos = torch.arange(past + t, device=x.device)[None]  # (1, past + T)
            else:
                k_pos = positions_from(segments)  # (B, past + T)
            q_pos = k_pos[:, past:]  # (B or 1, T): the new positions only
            check_length(cfg, past + t)
        if self.positions is not None:
            x = x + self.positions(q_pos + cfg.position_offset)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal(q_pos, cfg.hidden_size).to(x.dtype)
        if self.types is not None:
            if token_types is None:
                token_types = torch.zeros_like(q_pos).expand(b, t)
            x = x + self.types(token_types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)  # (B, T, d)

        q_seg = segments[:, past:] if segments is not None else None  # (B, T)
        if fixed is not None:  # (B, 1, 1, capacity), sliding window included
            mask, is_causal, local = fixed.mask, False, None
        else:
            # mask: (B or 1, 1, T, past + T) bool, or None when SDPA's causal flag says it
            # A decoder's sliding window of W tokens reaches W - 1 positions back.
            window = cfg.sliding_window - 1 if cfg.sliding_window else None
            mask, is_causal = build_mask(q_seg, segments, t, past + t, self.causal, x.device,
                                         window)
            # Local blocks (ModernBERT): the mask cut to the window, their own rotary base.
            local = (build_mask(q_seg, segments, t, past + t, self.causal, x.device,
                                cfg.window) if cfg.window is not None else None)
        if self.relative_bias is not None:  # T5: a float mask (B or 1, H, T, past + T)
            bias = self.relative_bias(q_pos, k_pos)
            mask = add_bias(mask, bias, t, past + t, is_causal)
            is_causal = False
            local = (add_bias(local[0], bias, t, past + t, False), False) if local else None
        # Generation looks cos and sin up in tables computed once (KVCache.rotary).
        cos_sin = rotary if cache is None else cache.rotary
        rope = cos_sin(q_pos, cfg) if cfg.position == "rotary" else None
        local_rope = (cos_sin(q_pos, cfg, cfg.local_rope_theta)
                      if rope is not None and cfg.local_rope_theta is not None else rope)
        context_mask = None  # (B, 1, T, S): which source tokens each target token may see
        if context is not None and (q_seg is not None or context_segments is not None):
            if q_seg is None:
                q_seg = torch.ones(b, t, dtype=torch.long, device=x.device)
            context_mask, _ = build_mask(q_seg, context_segments, t, context.shape[1], False,
                                         x.device)
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            # Local blocks (ModernBERT) take the windowed mask and their own rotary base.
            attend = (*local, local_rope) if cfg.layer_type(i) == "local" else (
                mask, is_causal, rope)
            if recompute:  # keep only the block's input; rerun it in backward (same RNG)
                x = checkpoint(layer, x, *attend, context, context_mask, None, i,
                               use_reentrant=False)
            else:
                x = layer(x, *attend, context, context_mask, cache, i,
                          first_only and i == len(self.layers) - 1)
        return self.final_norm(x) if self.final_norm is not None else x


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # mean per target: loss_sum / num_targets
    hidden_states: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # summed over the targets (0, in the graph, if none)
    num_targets: torch.Tensor | None = None  # labels that count (not IGNORE_INDEX)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: the targets moved one step right behind a start
    token, with ignored (IGNORE_INDEX) targets turned into padding."""
    out = labels.new_full(labels.shape, start_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, pad_id)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with `model` in eval mode (no dropout), then restore its previous mode:
    every evaluation and prediction goes through here."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Model(nn.Module):
    """A Transformer of any family with a task head. Build from a config; `lmkit.load`
    builds one from a checkpoint folder and `model.save(dir)` writes one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = (Stack(cfg, cfg.encoder_layers, causal=False, cross=False)
                        if cfg.has_encoder else None)
        self.decoder = (Stack(cfg, cfg.decoder_layers, causal=True,
                              cross=cfg.family == "encoder-decoder")
                        if cfg.has_decoder else None)
        module = cfg.head_spec.module
        self.head = getattr(heads, module)(cfg) if module is not None else None
        self.tokenizer: Any = None  # attached by lmkit.load / the trainers; saved with the model
        self.generation_config: Any = None  # generation defaults, saved with the model too
        self.reset_parameters()
        if cfg.lora:
            apply_lora(self, LoRAConfig(**cfg.lora))

    # ---- module roles -------------------------------------------------------------------------
    def blocks(self) -> list[tuple[str, Block]]:
        """(name, block) of every block, bottom to top: the encoder's, then the decoder's.
        Block i of this list has depth i + 1 (see `depth_groups`)."""
        return [(f"{where}.layers.{i}", block)
                for where, stack in (("encoder", self.encoder), ("decoder", self.decoder))
                if stack is not None for i, block in enumerate(stack.layers)]

    def depth_groups(self) -> list[list[nn.Module]]:
        """The modules by depth: [embeddings (tokens, positions, token types, embedding
        norms, relative position biases)], [block 1], ..., [block L], [final norms + head].
        Layer-wise LR decay, the top-k scheme and FLOP accounting read depths from here."""
        stacks = [s for s in (self.encoder, self.decoder) if s is not None]
        embeddings = [self.tokens] + [m for s in stacks for m in (
            s.positions, s.types, s.embed_norm, s.relative_bias) if m is not None]
        top = [s.final_norm for s in stacks if s.final_norm is not None]
        return [embeddings, *([b] for _, b in self.blocks()),
                top + ([self.head] if self.head is not None else [])]

    def parameter_depths(self) -> dict[str, int]:
        """Depth (index in `depth_groups`) of every named parameter."""
        depth_of: dict[int, int] = {}
        for d, group in enumerate(self.depth_groups()):  # a tied weight is an embedding
            for p in (p for m in group for p in m.parameters()):
                depth_of.setdefault(id(p), d)
        return {name: depth_of[id(p)] for name, p in self.named_parameters()}

    def head_parameters(self) -> list[nn.Parameter]:
        """The task head's own parameters (a tied output projection is the embeddings')."""
        tied = {id(self.tokens.weight)} if self.config.tied_output else set()
        return [p for p in self.head.parameters() if id(p) not in tied] \
            if self.head is not None else []

    def residual_projections(self) -> list[nn.Linear]:
        """The linear layers that write into the residual stream (attention and MLP output
        projections): GPT-2 initialises them smaller, by depth."""
        return [m for _, b in self.blocks() for m in (
            b.attn.o, b.cross_attn.o if b.cross_attn is not None else None, b.mlp.down)
            if m is not None]

    # ---- weights ----------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share the output projection with the token embeddings (when the config says so)."""
        if self.config.tied_output:
            self.head.proj.weight = self.tokens.weight

    def tied_names(self) -> set[str]:
        """Parameter names that are views of another (left out of a saved checkpoint)."""
        return {"head.proj.weight"} if self.config.tied_output else set()

    def reset_parameters(self, module: nn.Module | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by depth."""
        depth = 2 * max(1, self.config.encoder_layers + self.config.decoder_layers)
        residual = {id(m) for m in self.residual_projections()}
        for m in (module or self).modules():
            if isinstance(m, nn.Linear):
                std = 0.02 / depth ** 0.5 if id(m) in residual else 0.02
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):  # a scale of 1 (Gemma: 1 + 0)
                nn.init.constant_(m.weight, 1.0 - getattr(m, "offset", 0.0))
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.tie_weights()

    def num_parameters(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.tokens.weight.numel()
            for stack in (self.encoder, self.decoder):
                if stack is not None and stack.positions is not None:
                    n -= stack.positions.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token as the parameters are set to train (`requires_grad`).

        Per depth group (`depth_groups`), with P its parameters (embedding lookups left out;
        a tied output projection counted in the head): the forward pass costs 2P, the
        gradients of the activations 2P wherever backpropagation must reach a trainable
        parameter at that depth or below, the gradients of the weights 2 per trainable
        parameter. Attention scores and values add 4 x seq_len x width per block forward
        (a sliding window caps seq_len), twice that backward. Full training gives Kaplan's
        6N; a frozen body about 2N, LoRA about 4N."""
        lookups = {id(self.tokens.weight)} | {
            id(s.positions.weight) for s in (self.encoder, self.decoder)
            if s is not None and s.positions is not None}
        span = min(seq_len, self.config.sliding_window or seq_len)  # keys a query scores
        attention = 2 * 2 * span * self.config.num_heads * self.config.dim_per_head
        groups = self.depth_groups()
        total, backprop = 0.0, False
        for depth, group in enumerate(groups):
            params = list({id(p): p for m in group for p in m.parameters()}.values())
            backprop = backprop or any(p.requires_grad for p in params)
            if depth == 0:  # a lookup costs nothing; a tied projection is counted in the head
                params = [p for p in params if id(p) not in lookups]
            matmuls = 2 * sum(p.numel() for p in params)
            scores = attention if 0 < depth < len(groups) - 1 else 0  # a block
            weight_grads = 2 * sum(p.numel() for p in params if p.requires_grad)
            total += matmuls + scores + weight_grads
            if backprop:  # activation gradients: the matmuls again, the scores twice
                total += matmuls + 2 * scores
        return total

    # ---- the forward pass --------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids)
        return x * self.config.hidden_size ** 0.5 if self.config.scale_embeddings else x

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None,
               first_only: bool = False) -> torch.Tensor:
        """Encoder hidden states (B, T, d); (B, 1, d) of the first position with
        `first_only` (whose last block computes nothing else)."""
        segments = segments_from(attention_mask, segment_ids)
        return self.encoder(self.embed(input_ids), segments, token_type_ids,
                            first_only=first_only)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None, context: torch.Tensor | None = None,
               context_mask: torch.Tensor | None = None,
               context_segment_ids: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Decoder hidden states for the new tokens `input_ids`. With a cache, the masks cover
        the cached positions plus the new ones."""
        segments = segments_from(attention_mask, segment_ids)
        context_segments = segments_from(context_mask, context_segment_ids)
        return self.decoder(self.embed(input_ids), segments, context=context,
                            context_segments=context_segments, cache=cache)

    def new_cache(self, capacity: int = 0) -> KVCache:
        """A KV cache for generation, its buffers sized for `capacity` positions (0: the
        first call's, grown as needed)."""
        return KVCache(self.config.decoder_layers, capacity)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                decoder_segment_ids: torch.Tensor | None = None,
                return_logits: bool = True, pooled_only: bool = False) -> ModelOutput:
        """Run the model; with `labels`, also the loss (label -100 = ignored). With
        `return_logits=False` a head over the vocabulary computes the loss without the
        logits (the training loop's way: `lmkit.model.loss`); `logits` is then None.

        Labels by head: `lm` on a decoder-only model takes the input ids themselves (the
        model shifts them); `lm` on an encoder-decoder takes the target ids (decoder inputs
        are the targets shifted right unless given); `mlm` and `token-classification` one
        label per input token; `classification` one label per row.

        `pooled_only`: where the head pools the first token of an encoder (BERT), the last
        block computes that position alone (about 1/6 less work for a 6-layer model, the same
        logits); `hidden_states` then holds only it."""
        cfg = self.config
        enc = dec = None
        if cfg.has_encoder:
            enc = self.encode(input_ids, attention_mask, segment_ids, token_type_ids,
                              pooled_only and self.first_only_pools)
        if cfg.family == "decoder":
            dec = self.decode(input_ids, attention_mask, segment_ids)
        elif cfg.family == "encoder-decoder":
            if decoder_input_ids is None:
                # a pooled head's decoder reads the input text; an LM's, its targets
                source = input_ids if cfg.head_spec.pooled else labels
                if source is None:
                    raise ValueError("an encoder-decoder model needs decoder_input_ids or labels")
                decoder_input_ids = shift_right(source, cfg.decoder_start_id, cfg.fill_id())
            dec = self.decode(decoder_input_ids, decoder_attention_mask, decoder_segment_ids,
                              context=enc, context_mask=attention_mask,
                              context_segment_ids=segment_ids)
        hidden = dec if dec is not None else enc
        out = ModelOutput(hidden_states=hidden, encoder_hidden_states=enc)
        if self.head is None:
            return out
        if cfg.head_spec.pooled:
            ids = decoder_input_ids if cfg.family == "encoder-decoder" else input_ids
            if cfg.pooling == "eos" and cfg.family == "encoder-decoder":
                ids = input_ids  # BART: the decoder reads the same text; pool at its last EOS
            segs = segments_from(attention_mask, segment_ids)
            hidden = heads.pool(hidden, cfg.pooling, segs, ids, cfg.eos_ids)
        if labels is not None and not return_logits and cfg.head_spec.tied_output:
            out.loss_sum, out.num_targets = self.vocab_loss(hidden, labels)  # a vocabulary head
        else:
            out.logits = self.head(hidden)
            if labels is not None:
                out.loss_sum, out.num_targets = self.loss(out.logits, labels)
        if labels is not None:
            out.loss = out.loss_sum / out.num_targets
        return out

    @property
    def first_only_pools(self) -> bool:
        """The head reads only the encoder's first position and the last block can compute
        it alone (no rotary or local blocks, whose queries and keys must line up)."""
        cfg = self.config
        return (cfg.family == "encoder" and cfg.head_spec.pooled and cfg.pooling == "first"
                and cfg.position != "rotary" and cfg.window is None)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels aligned with the logits: a decoder-only LM's are shifted left (position
        t predicts token t + 1; the last position predicts nothing)."""
        if self.config.shifts_labels:
            # Shift the labels, not the logits: slicing (B, T, vocab) logits would copy them.
            return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return labels

    def num_targets(self, labels: torch.Tensor) -> int:
        """How many labels the loss counts (known before the forward pass, for the loop's
        normalisation over micro-batches and processes)."""
        return int((self.targets(labels) != IGNORE_INDEX).sum())

    def loss(self, logits: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, number of targets): labels of IGNORE_INDEX are skipped."""
        targets = self.targets(labels)
        return plain_cross_entropy(logits, targets, IGNORE_INDEX), (targets != IGNORE_INDEX).sum()

    def vocab_loss(self, hidden: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """`loss` for a head over the vocabulary, from the hidden states: only positions with
        a target are projected, chunk by chunk, with no (B, T, vocab) logits in memory (when
        the logits of every position are small, `loss` over them is cheaper)."""
        targets = self.targets(labels).reshape(-1)
        keep = targets != IGNORE_INDEX
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if small_logits(len(targets), self.config.vocab_size):
            return plain_cross_entropy(self.head(hidden), targets, IGNORE_INDEX), keep.sum()
        h = self.head.features(hidden[keep])
        return linear_cross_entropy(h, self.head.proj, targets[keep]), keep.sum()

    def activation_checkpointing(self, on: bool = True) -> None:
        """Keep only each block's input during training and recompute the block in backward:
        activation memory of one block instead of all, for about a third more compute."""
        for stack in (self.encoder, self.decoder):
            if stack is not None:
                stack.checkpointing = on

    # ---- conveniences ------------------------------------------------------------------------
    def save(self, path: Any, tokenizer: Any = None) -> None:
        """Write a checkpoint folder: config.json + model.safetensors (+ tokenizer.json)."""
        save(self, path, tokenizer=tokenizer)


def build(config: ModelConfig, tensors: dict[str, torch.Tensor], *, new: tuple[str, ...] = (),
          dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> Model:
    """A model of `config` holding `tensors` (adopted, not copied); parameters named under
    `new` are initialised fresh. Shared by checkpoint folders and foreign-format importers.
    `dtype` and `device` as `lmkit.load` takes them (lmkit.device.weight_dtype and
    resolve_device)."""
    device = resolve_device(device)
    dtype = weight_dtype(dtype, device, config.dtype)
    if str(dtype) != f"torch.{config.dtype}":  # the config describes the weights as held
        config = config.replace(dtype=str(dtype).removeprefix("torch."))
    check_layers(config, tensors, "the checkpoint")
    try:
        with torch.device("meta"):
            model = Model(config)
    except RuntimeError as e:  # sizes too large for torch even to describe (10^9 x 4*10^9)
        raise CheckpointError(f"the config's sizes cannot be built ({e}): the config does not "
                              "belong to these weights, or it is damaged") from None
    fresh = check_tensors(model, tensors, new=new)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()},
                          strict=False, assign=True)
    for prefix in new if fresh else ():  # materialise and initialise the new modules
        module = model.get_submodule(prefix.rstrip("."))
        module.to_empty(device=device)
        model.reset_parameters(module)
        module.to(dtype)
    model.tie_weights()
    if fresh:
        log.info("initialised new tensors (not in the checkpoint): %s", ", ".join(fresh))
    model.new_tensors = fresh
    return model.eval()  # like from_pretrained: no dropout until a trainer says so
