"""Text generation: greedy, sampling (temperature, top-k, top-p) and beam search, for
decoder-only and encoder-decoder models, with a KV cache.

Decoder-only prompts of different lengths are left-padded so every row's next token is in the
last column; position ids restart after the padding, so a padded prompt generates exactly what
it would alone. Encoder-decoder sources are encoded once; their cross-attention keys and values
are computed at the first step and reused.

Defaults come from the model's `generation_config` (a checkpoint's generation_config.json),
then from `DEFAULTS`; explicit arguments win. The logits processors lmkit applies (forced
BOS / EOS, no-repeat n-grams, repetition penalty) run where transformers runs them: on the
raw logits for greedy search and sampling, on the log-probabilities for beam search.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmkit.compiling import compiled_or_eager
from lmkit.config import eos_tuple
from lmkit.errors import ConfigError
from lmkit.generation_config import GenerationConfig
from lmkit.model import Model, eval_mode
from lmkit.model.attention import FixedStep, KVCache
from lmkit.model.layers import lay_out, packed_linears
from lmkit.model.transformer import check_length

# The range of each option of `generate` (checked there and by the CLI at parse time).
OPTION_RANGES = {
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 1, "at least 1 (leave it out for no top-k filter)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = no top-p filter)"),
    "num_beams": (lambda v: v >= 1, "at least 1 (1 = no beam search)"),
    "length_penalty": (lambda v: True, "a number"),
    "num_return_sequences": (lambda v: v >= 1, "at least 1"),
    "no_repeat_ngram_size": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1 = off)"),
}
# What `generate` does for an option that neither the call nor the model's
# generation_config sets.
DEFAULTS = dict(max_new_tokens=32, do_sample=False, temperature=1.0, top_k=None, top_p=None,
                num_beams=1, length_penalty=1.0, early_stopping=True, num_return_sequences=1,
                no_repeat_ngram_size=0, repetition_penalty=1.0, forced_bos_token_id=None,
                forced_eos_token_id=None)


def check_option(name: str, value: float | None) -> None:
    """Raise ConfigError when a `generate` option is outside its range (None = not set)."""
    if value is None:
        return
    ok, rule = OPTION_RANGES[name]
    if not (math.isfinite(value) and ok(value)):
        raise ConfigError(f"{name} must be {rule}, got {value}")


@dataclass
class Generation:
    """What `generate` returns: new tokens per prompt (prompt not included, EOS removed), their
    scores (sum of log-probabilities; for beam search, length-penalised), and the decoded
    texts when the model has a tokenizer. With `num_return_sequences` = n, each prompt has n
    consecutive entries: the n best beams (best first), or n independent samples."""

    sequences: list[list[int]]
    scores: list[float]
    texts: list[str] = field(default_factory=list)


def _step(model: Model, new_ids: torch.Tensor, cache: KVCache, context: torch.Tensor | None,
          context_segments: torch.Tensor | None) -> torch.Tensor:
    """A fixed-shape decode step (`cache.fixed`): the logits (float32) of the next token."""
    h = model.decode(new_ids, context=context, context_segment_ids=context_segments,
                     cache=cache)
    return model.head(h[:, -1]).float()


# "step": torch.compile(_step), made at the first use (its graphs serve later calls), or
# _step itself once compiling has failed in this process (one warning).
_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled_step() -> Callable[..., torch.Tensor]:
    if "step" not in _COMPILED:  # freezing measured faster (CPU, Llama shape): 1.2-1.3x eager
        _COMPILED["step"] = torch.compile(_step, dynamic=False, options={"freezing": True})
    return _COMPILED["step"]


def _eager_from_now() -> bool:
    """After a failed compilation: this process's later decode steps run eagerly."""
    _COMPILED["step"] = _step
    return True


class _Decoder:
    """Runs the decoder one step at a time over a KV cache, for both families. `fixed`: the
    steps after the prompt's have fixed shapes (`FixedStep`; not T5's relative positions,
    whose bias needs every key's), `compile`: and run through torch.compile (eagerly, after
    one warning, if compiling fails)."""

    def __init__(self, model: Model, ids: torch.Tensor, mask: torch.Tensor | None,
                 start_id: int | None = None, max_new: int = 0, fixed: bool = False,
                 compile: bool = False):
        cfg = model.config
        self.model = model
        encdec = cfg.family == "encoder-decoder"
        # Every position the generation will hold, so the cache is allocated once; a fixed
        # step's capacity rounded up to a power of two, so calls share compiled graphs.
        capacity = (1 if encdec else ids.shape[1]) + max_new
        self.fixed = fixed and cfg.position != "relative"
        self.compile = compile and self.fixed
        if self.fixed:
            capacity = max(64, 1 << (capacity - 1).bit_length())
        self.cache = model.new_cache(capacity)
        if encdec:
            self.context = model.encode(ids, mask)  # (B, S, d), encoded once
            self.context_mask = mask  # (B, S) or None
            self.mask = None  # the decoder's own tokens are never padded
            start = cfg.decoder_start_id if start_id is None else start_id
            self.prefix = ids.new_full((ids.shape[0], 1), start)  # (B, 1)
        else:
            self.context = None
            self.context_mask = None
            self.mask = mask  # (B, T) left padding of the prompts, or None
            self.prefix = ids  # (B, T) the prompts

    def reorder(self, index: torch.Tensor, within_prompts: bool = False) -> None:
        """Keep the rows named by `index`. `within_prompts`: each row moves only among the
        rows of its own prompt (beam search's steps), which share the prompt, its padding,
        the source and its cross-attention keys: only the self-attention cache moves."""
        self.cache.reorder(index, cross=not within_prompts)
        if within_prompts:
            return
        if self.cache.fixed is not None:
            self.cache.fixed.reorder(index)
        self.prefix = self.prefix.index_select(0, index)
        for name in ("mask", "context", "context_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))

    def logits(self, new_ids: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of the token after `new_ids`, which follow the cache."""
        # eager steps of several rows on MKL-packed weights (compiling packs its own)
        packing = (contextlib.nullcontext() if self.compile
                   else packed_linears(new_ids.shape[0], new_ids.device))
        with packing:
            return self._logits(new_ids)

    def _logits(self, new_ids: torch.Tensor) -> torch.Tensor:
        if self.cache.fixed is not None:
            return self._fixed_logits(new_ids)
        if self.mask is not None and len(self.cache):
            self.mask = torch.cat([self.mask, self.mask.new_ones(new_ids.shape)], dim=1)
        h = self.model.decode(new_ids, self.mask, context=self.context,
                              context_mask=self.context_mask, cache=self.cache)
        if self.fixed:  # the later steps: fixed shapes
            sliding = self.model.config.sliding_window
            FixedStep(self.cache, self.mask, sliding - 1 if sliding else None)
        return self.model.head(h[:, -1]).float()

    def _fixed_logits(self, new_ids: torch.Tensor) -> torch.Tensor:
        check_length(self.model.config, len(self.cache) + new_ids.shape[1])
        fixed = self.cache.fixed
        fixed.prepare()
        args = (self.model, new_ids, self.cache, self.context, self.context_mask)
        if self.compile:
            out = compiled_or_eager(_compiled_step(), _step, args, "generation",
                                    _eager_from_now)
        else:
            out = _step(*args)
        fixed.advance()
        return out


@dataclass
class _Processors:
    """The logits processors of one `generate` call (transformers' semantics). `history` is
    every row's tokens so far (prompt or decoder start, then the new tokens); `last` says
    whether the token being chosen is the last one the length limit allows."""

    forced_bos: int | None = None
    forced_eos: int | None = None
    no_repeat_ngram: int = 0
    repetition_penalty: float = 1.0

    def __call__(self, scores: torch.Tensor, history: torch.Tensor, last: bool) -> torch.Tensor:
        if self.repetition_penalty != 1.0:  # seen tokens: positive scores / p, negative * p
            seen = scores.gather(1, history)
            seen = torch.where(seen < 0, seen * self.repetition_penalty,
                               seen / self.repetition_penalty)
            scores = scores.scatter(1, history, seen)
        if self._bans(history):
            scores = scores.masked_fill(self._banned(history, scores.shape), float("-inf"))
        forced = self._forced(history, last)
        if forced is not None:
            only = torch.full_like(scores, float("-inf"))
            scores = only.index_fill(1, torch.tensor([forced], device=scores.device), 0.0)
        return scores

    def idle(self, history: torch.Tensor, last: bool) -> bool:
        """Whether this step's scores pass unchanged."""
        return (self.repetition_penalty == 1.0 and not self._bans(history)
                and self._forced(history, last) is None)

    def _bans(self, history: torch.Tensor) -> bool:
        return bool(self.no_repeat_ngram) and history.shape[1] + 1 >= self.no_repeat_ngram

    def _forced(self, history: torch.Tensor, last: bool) -> int | None:
        forced = self.forced_bos if history.shape[1] == 1 else None
        return self.forced_eos if last and self.forced_eos is not None else forced

    def _banned(self, history: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(rows, V) True for tokens that would repeat an n-gram already in the row."""
        n, banned = self.no_repeat_ngram, torch.zeros(shape, dtype=torch.bool)
        for row, tokens in enumerate(history.tolist()):
            tail = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
            for i in range(len(tokens) - n + 1):
                if tuple(tokens[i:i + n - 1]) == tail:
                    banned[row, tokens[i + n - 1]] = True
        return banned.to(history.device)


def _pad_prompts(prompts: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor,
                                                                            torch.Tensor | None]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        span = slice(width - len(p), width) if left else slice(0, len(p))
        ids[i, span], mask[i, span] = torch.tensor(p), 1
    return ids, (mask if not bool(mask.all()) else None)


def _filter(logp: torch.Tensor, temperature: float, top_p: float | None) -> torch.Tensor:
    """Scale by temperature and keep the smallest set of tokens whose probability reaches
    top-p; the rest get -inf."""
    logits = logp / temperature
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep tokens until the mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _draw(logp: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          gen: torch.Generator | None) -> torch.Tensor:
    """One sampled token per row of `logp` (rows, V). With top-k the draw runs over the k
    best tokens only (one over the whole vocabulary costs a good part of a small model's
    step); a tie at the k-th score keeps k tokens."""
    ids = None
    if top_k and top_k < logp.shape[-1]:
        logp, ids = logp.topk(top_k)  # (rows, k), best first
    probs = _filter(logp, temperature, top_p).softmax(-1)
    pick = torch.multinomial(probs, 1, generator=gen)  # (rows, 1)
    return (pick if ids is None else ids.gather(-1, pick)).squeeze(-1)


def _sample(dec: _Decoder, max_new: int, eos: tuple[int, ...], pad: int, greedy: bool,
            temperature: float, top_k: int | None, top_p: float | None,
            gen: torch.Generator | None, process: _Processors,
            stream: Callable[[torch.Tensor], None] | None) -> tuple[list[list[int]], list[float]]:
    batch, dev = dec.prefix.shape[0], dec.prefix.device
    done = torch.zeros(batch, dtype=torch.bool, device=dev)
    scores = torch.zeros(batch, device=dev)
    stops = torch.tensor(eos, dtype=torch.long, device=dev)
    steps: list[torch.Tensor] = []
    history = dec.prefix
    logits = dec.logits(dec.prefix)
    for step in range(max_new):
        logp = torch.log_softmax(process(logits, history, step == max_new - 1), dim=-1)
        if greedy:
            nxt = logp.argmax(-1)
        else:
            nxt = _draw(logp, temperature, top_k, top_p, gen)
        scores += torch.where(done, 0.0, logp.gather(-1, nxt[:, None]).squeeze(-1))
        nxt = nxt.masked_fill(done, pad)
        steps.append(nxt)
        if stream is not None:
            stream(nxt.masked_fill(done, -1))  # -1: this row had already finished
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        history = torch.cat([history, nxt[:, None]], dim=1)
        logits = dec.logits(nxt[:, None])
    tokens = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(batch)]
    return [_until_eos(t, eos) for t in tokens], scores.tolist()


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:end]


def _beam(dec: _Decoder, max_new: int, eos: tuple[int, ...], width: int,
          length_penalty: float, early_stopping: bool, n_best: int,
          process: _Processors) -> tuple[list[list[int]], list[float]]:
    """Beam search; finished hypotheses are scored sum(log p) / length ** length_penalty.

    Shapes: B prompts, W = width beams each, V = vocabulary. The decoder holds B * W rows
    (prompt b's beams are rows b * W .. b * W + W - 1); the per-step bookkeeping runs on the
    CPU."""
    batch, dev = dec.prefix.shape[0], dec.prefix.device
    dec.reorder(torch.arange(batch, device=dev).repeat_interleave(width))  # B -> B * W rows
    beam_scores = torch.full((batch, width), float("-inf"), device=dev)  # (B, W) sum of log p
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.zeros(batch * width, 0, dtype=torch.long, device=dev)  # (B * W, step - 1)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    logits = dec.logits(dec.prefix)  # (B * W, V)
    for step in range(1, max_new + 1):
        history = torch.cat([dec.prefix, tokens], dim=1)  # (B * W, prefix + step - 1)
        vocab, k, last = logits.shape[-1], min(2 * width, logits.shape[-1]), step == max_new
        # A prompt's 2W best continuations (even if W of them end in EOS, W open beams
        # remain) are among its beams' own 2W best: those first, then the best of the W * 2W.
        if process.idle(history, last):  # log p = logit - logsumexp: normalise the 2W only
            beam_best, beam_tok = logits.topk(k, dim=1)  # (B * W, k)
            beam_best = beam_best - logits.logsumexp(-1, keepdim=True)
        else:
            logp = process(torch.log_softmax(logits, dim=-1), history, last)
            beam_best, beam_tok = logp.topk(k, dim=1)
        cand = (beam_scores.view(-1, 1) + beam_best).view(batch, width * k)
        top_scores, pos = cand.topk(k, dim=1)  # (B, k) of index beam * k + rank
        token = beam_tok.view(batch, -1).gather(1, pos)
        top_idx = pos.div(k, rounding_mode="floor") * vocab + token  # beam * V + token
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()  # Python from here
        next_scores = [[float("-inf")] * width for _ in range(batch)]  # (B, W)
        next_tok = [[0] * width for _ in range(batch)]  # (B, W)
        # (B, W) row each new beam continues; a prompt with no open beam keeps its first row
        next_src = [[b * width] * width for b in range(batch)]
        for b in range(batch):
            kept = 0
            for rank in range(k):
                score = top_scores[b][rank]
                src, tok = divmod(top_idx[b][rank], vocab)  # beam, token
                if done[b] or score == float("-inf"):
                    break
                if tok in eos:  # a finished hypothesis, if it ranks among the W best
                    if rank < width:
                        seq = tokens[b * width + src].tolist()
                        finished[b].append((score / step ** length_penalty, seq))
                    continue
                next_scores[b][kept] = score
                next_tok[b][kept] = tok
                next_src[b][kept] = b * width + src
                kept += 1
                if kept == width:
                    break
            if not done[b] and len(finished[b]) >= width:
                # Done when no open beam can beat the W-th best finished one any more.
                best_open = max(next_scores[b]) / step ** length_penalty
                worst_done = sorted(s for s, _ in finished[b])[-width]
                done[b] = early_stopping or worst_done >= best_open
        if all(done):
            break
        src = torch.tensor(next_src, device=dev).view(-1)  # (B * W,)
        next_tok = torch.tensor(next_tok, device=dev).view(-1, 1)  # (B * W, 1)
        dec.reorder(src, within_prompts=True)
        tokens = torch.cat([tokens.index_select(0, src), next_tok], dim=1)  # (B * W, step)
        beam_scores = torch.tensor(next_scores, device=dev)
        if step < max_new:
            logits = dec.logits(next_tok)
    for b in range(batch):  # open beams compete with finished ones at the length limit
        if not done[b]:
            for k in range(width):
                if beam_scores[b, k] > float("-inf"):
                    score = beam_scores[b, k].item() / tokens.shape[1] ** length_penalty
                    finished[b].append((score, tokens[b * width + k].tolist()))
    out_seqs, out_scores = [], []
    for hyps in finished:
        for score, seq in sorted(hyps, key=lambda h: -h[0])[:n_best]:
            out_seqs.append(seq)
            out_scores.append(score)
    return out_seqs, out_scores


def _settings(model: Model, explicit: dict) -> tuple[dict, GenerationConfig]:
    """Each option from the call, else the model's generation_config, else DEFAULTS."""
    stored = model.generation_config or GenerationConfig()
    out = {name: next((v for v in (explicit.get(name), getattr(stored, name)) if v is not None),
                      default) for name, default in DEFAULTS.items()}
    for name, value in out.items():
        if name in OPTION_RANGES:
            check_option(name, value)
    return out, stored


def _prompts_of(model: Model, prompts: object, messages: list | None) -> object:
    """Token ids for text prompts or chat messages (through the tokenizer's chat template)."""
    if messages is not None:
        if prompts is not None:
            raise ValueError("give either prompts or messages, not both")
        if model.tokenizer is None:
            raise ValueError("messages need a tokenizer with a chat template: load a "
                             "checkpoint that has one")
        chats = messages if messages and isinstance(messages[0], list) else [messages]
        return [model.tokenizer.encode(model.tokenizer.apply_chat_template(m),
                                       add_special_tokens=False) for m in chats]
    texts = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                         and isinstance(prompts[0], str))
    if not texts:
        return prompts
    if model.tokenizer is None:
        raise ValueError("text prompts need a tokenizer: load the model from a checkpoint "
                         "that has tokenizer.json, or pass token ids")
    return model.tokenizer.encode_batch([prompts] if isinstance(prompts, str) else prompts)


@torch.inference_mode()
def generate(model: Model, prompts: str | list[str] | list[list[int]] | torch.Tensor | None = None,
             *, messages: list[dict] | list[list[dict]] | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int | None = None,
             do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             num_beams: int | None = None, length_penalty: float | None = None,
             early_stopping: bool | None = None, num_return_sequences: int | None = None,
             no_repeat_ngram_size: int | None = None, repetition_penalty: float | None = None,
             eos_id: int | list[int] | None = None,
             stream: Callable[[torch.Tensor], None] | None = None,
             compile: bool = False) -> Generation:
    """Continue each prompt (decoder-only) or translate each source (encoder-decoder).

    prompts: text (encoded with the model's tokenizer), lists of token ids of any lengths, or
    a padded tensor with `attention_mask`. messages: a chat (``[{"role": "user", "content":
    ...}]``) or a list of chats, rendered by the tokenizer's chat template with the prompt for
    the assistant's turn. Stops at any end-of-sequence id (`eos_id`: one or a list; default
    the generation config's, else the model config's) or after `max_new_tokens`.
    `num_beams` > 1 runs beam search and may return the n best; with `do_sample`,
    `num_return_sequences` samples are drawn per prompt. `temperature=0` means greedy
    decoding, also with `do_sample` (the usual convention). Options left None take the
    model's `generation_config` value, else `DEFAULTS`. `stream(tokens)` is called with each
    step's new token per row (-1 for a finished row); not with beam search.

    `compile`: the decode steps after the prompt's run through torch.compile, with shapes
    that do not change from one step to the next (the whole cache attended under a mask):
    faster steps once compiled, at the price of compiling at the first call of a process (a
    minute or more for a 135M-parameter model on a 2-core CPU), and again for a new batch size
    or capacity (prompt + new tokens, rounded up to a power of two); the same tokens. If
    compiling fails, one warning and eager steps. T5's relative positions decode eagerly.

    On the CPU, the first call lays the model's linear weights out for decoding
    (`lmkit.model.layers.lay_out`: transposed in memory, the same values and shapes); training
    lays them back out. Eager steps of several rows (a batch, beams) multiply by copies of
    the weights packed by MKL for that many rows (`lmkit.model.layers.packed_linears`); they
    and the fused q/k/v projections are kept for later calls until a weight changes (its
    version or storage: a write through `.data` is not seen, as by torch.compile's freezing;
    `lay_out(model, decoding=False)`, which training runs, drops them)."""
    explicit = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                    length_penalty=length_penalty, early_stopping=early_stopping,
                    num_return_sequences=num_return_sequences,
                    no_repeat_ngram_size=no_repeat_ngram_size,
                    repetition_penalty=repetition_penalty)
    o, stored = _settings(model, explicit)
    do_sample = o["do_sample"] and o["temperature"] > 0
    num_beams, n_best = o["num_beams"], o["num_return_sequences"]
    cfg = model.config
    if cfg.head != "lm":
        raise ValueError(f"generation needs an LM head; this model has head={cfg.head!r}")
    if do_sample and num_beams > 1:
        raise ValueError("sampling does not combine with beam search here: drop num_beams "
                         "(or do_sample)")
    if n_best > max(num_beams, 1) and not do_sample:
        raise ValueError("num_return_sequences must be <= num_beams (the n best beams), or "
                         "sample with do_sample=True for n samples per prompt")
    if stream is not None and num_beams > 1:
        raise ValueError("streaming needs greedy search or sampling, not beam search")
    prompts = _prompts_of(model, prompts, messages)
    eos = eos_tuple(eos_id) or tuple(stored.eos_token_id or ()) or cfg.eos_ids
    pad = cfg.fill_id(eos[0] if eos else None)
    if isinstance(prompts, torch.Tensor):
        ids, mask = prompts, attention_mask
    else:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (add a BOS token)")
        ids, mask = _pad_prompts(prompts, pad, left=cfg.family == "decoder")
    max_new = o["max_new_tokens"]
    if max_new_tokens is None and stored.max_new_tokens is None and stored.max_length:
        # transformers' max_length counts the prompt (decoder-only) or the start token
        used = ids.shape[1] if cfg.family == "decoder" else 1
        max_new = stored.max_length - used
        if max_new < 1:
            raise ValueError(f"the prompt ({used} tokens) leaves no room under the "
                             f"checkpoint's max_length={stored.max_length}: pass "
                             "max_new_tokens")
    process = _Processors(o["forced_bos_token_id"], o["forced_eos_token_id"],
                          o["no_repeat_ngram_size"], o["repetition_penalty"])
    device = next(model.parameters()).device
    lay_out(model, decoding=True)  # once: later calls find the weights laid out
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    with eval_mode(model):
        dec = _Decoder(model, ids, mask, stored.decoder_start_token_id, max_new,
                       fixed=compile, compile=compile)
        if num_beams > 1:
            seqs, scores = _beam(dec, max_new, eos, num_beams, o["length_penalty"],
                                 o["early_stopping"], n_best, process)
        else:
            if n_best > 1:  # n rows per prompt, sampled independently
                dec.reorder(torch.arange(ids.shape[0], device=device)
                            .repeat_interleave(n_best))
            gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
            seqs, scores = _sample(dec, max_new, eos, pad, not do_sample, o["temperature"],
                                   o["top_k"], o["top_p"], gen, process, stream)
    out = Generation(seqs, scores)
    if model.tokenizer is not None:
        out.texts = [model.tokenizer.decode(s) for s in seqs]
    return out
