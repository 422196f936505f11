"""Generation speed: lmkit vs transformers' `generate()`, and vs this machine's memory-bandwidth
limit, side by side in one run (issue 8, item 2).

    python benchmarks/generate.py [--repeats 3] [--threads 2] [--cases gpt2,llama,marian,t5]
        [--new-tokens 128] [--dtype fp32] [--no-compile] [--quick] [--json out.json]

Work measured (random weights of the real shapes, built in-process from configs: no download;
the transformers model is saved and read back with `lmkit.load`, so both hold the same weights
and greedy and beam search must give the same tokens, which each row's note reports):

- one sequence, greedy, `--new-tokens` (128) after a 32-token prompt, on GPT-2-124M and on a
  Llama of SmolLM2-135M's shape: tokens/s vs transformers (target 2x), and vs the
  memory-bandwidth limit = bandwidth / weight bytes read per token (target 80%). The bandwidth
  is measured in the same run, interleaved with the decoding: the median rate at which
  `sum()` reads a tensor of 512 MiB (a read-only stream, like the weights' during decoding).
  With fp32 weights, the same for lmkit with int8 weights (`dtype: int8`, interleaved in the
  same run): vs transformers' fp32 generate() and vs the limit of its int8 weight bytes; int8
  changes the numerics, so its note says for how many of the tokens it agrees with fp32.
- the same with `generate(..., compile=True)` (the decode step through torch.compile): tokens/s
  after the first call, which compiles (its time from an empty inductor cache is in the note),
  vs transformers and vs eager lmkit (target 1.15x).
- a Marian-shaped encoder-decoder (opus-mt: 6 + 6 layers, 512 wide, 58k vocabulary) and a
  T5-shaped one (t5-small: 6 + 6 layers, 512 wide, relative positions, 32k vocabulary):
  batched sampling (8 sources, top-k 50, seeded) and beam search (4 sources x 4 beams), 32
  new tokens per row: output tokens/s vs transformers (target 1.5x).

No row stops at an end-of-sequence token (none is set), so every run makes the same number of
tokens. Timings are medians of `--repeats` interleaved runs (lmkit and transformers
alternate, and alternate which goes first); on a loaded machine treat the ratios as
indicative. For `make bench`, `rows(quick, threads)` returns the rows ({work, lmkit,
reference, unit, ratio, target, passed, note}); `main(argv)` prints them and returns them.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import table  # benchmarks/table.py: the row protocol and the machine line of `make bench`
import torch
import transformers as tf

import lmkit
from lmkit.model.quant import quantize_int8

PROMPT = 32  # prompt tokens of the one-sequence cases
SOURCE = 24  # source tokens of the encoder-decoder cases
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Configs of the shapes named in the issue (transformers' own classes and field names).
GPT2 = dict(attn_implementation="sdpa")  # GPT2Config's defaults are GPT-2-124M
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
MARIAN = dict(vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6,
              encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
              decoder_ffn_dim=2048, max_position_embeddings=512, scale_embedding=True,
              activation_function="swish", pad_token_id=58100, decoder_start_token_id=58100,
              eos_token_id=0, forced_eos_token_id=None, attn_implementation="sdpa")
T5 = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
          feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each fn's figure over `repeats` rounds; the order turns every round so that
    neither side always runs first (warm caches, load drift)."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(fns[name]())
    return {name: statistics.median(v) for name, v in runs.items()}


def rate(fn: Callable[[], int]) -> float:
    """Units per second of one call of `fn` (which returns how many units it made)."""
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def bandwidth_probe() -> Callable[[], float]:
    """GB/s at which this machine reads a 512 MiB float32 tensor (`sum`)."""
    big = torch.ones(2 ** 27)
    big.sum()  # touch every page first
    return lambda: big.numel() * big.element_size() / 1e9 * rate(lambda: (big.sum(), 1)[1])


def weight_bytes_per_token(model: lmkit.Model) -> int:
    """Bytes of weights one decoding step reads: every parameter (and int8 buffer) once,
    except embedding rows looked up (one row per token: nothing), unless the output projection
    is the embedding table itself (tied, and not given its own int8 copy)."""
    lookups = {id(s.positions.weight) for s in (model.encoder, model.decoder)
               if s is not None and s.positions is not None}
    if model.head.proj.weight is not model.tokens.weight:
        lookups.add(id(model.tokens.weight))
    if model.encoder is not None:  # an encoder runs once per source, not per token
        lookups |= {id(p) for p in [*model.encoder.parameters(), *model.encoder.buffers()]}
    tensors = {id(p): p for p in [*model.parameters(), *model.buffers()]}
    return sum(p.numel() * p.element_size() for i, p in tensors.items() if i not in lookups)


def pair(hf_cls: type, hf_cfg: tf.PretrainedConfig, dtype: torch.dtype
         ) -> tuple[Any, lmkit.Model]:
    """A random transformers model and the same weights in lmkit (saved and loaded)."""
    torch.manual_seed(0)
    ref = hf_cls(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = lmkit.load(d, dtype=dtype)
    return ref.to(dtype), ours


def hf_generate(ref: Any, ids: torch.Tensor, **settings: Any) -> torch.Tensor:
    config = tf.GenerationConfig(eos_token_id=None, pad_token_id=0, decoder_start_token_id=getattr(
        ref.config, "decoder_start_token_id", None), **settings)
    with torch.inference_mode():
        return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            generation_config=config)


def one_sequence(name: str, hf_cls: type, hf_cfg: tf.PretrainedConfig, new: int, repeats: int,
                 dtype: torch.dtype, probe: Callable[[], float], compile: bool = False
                 ) -> list[dict]:
    """Greedy decoding of one sequence: vs transformers and vs the bandwidth limit; from
    fp32 weights also lmkit's int8 weights (`dtype: int8`) against both; with `compile`,
    also `generate(..., compile=True)` vs transformers and vs eager lmkit."""
    ref, ours = pair(hf_cls, hf_cfg, dtype)
    int8 = quantize_int8(copy.deepcopy(ours)) if dtype == torch.float32 else None
    ids = torch.randint(100, 5000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    greedy = dict(do_sample=False, num_beams=1)

    def run_ours(model: lmkit.Model = ours, compiled: bool = False) -> list[int]:
        return lmkit.generate(model, ids, max_new_tokens=new, eos_id=-1, compile=compiled,
                              **greedy).sequences[0]

    def run_ref() -> list[int]:
        return hf_generate(ref, ids, max_new_tokens=new, **greedy)[0, PROMPT:].tolist()

    tokens = run_ours()
    same = tokens == run_ref()  # also the warm-up
    fns = {"lmkit": lambda: rate(lambda: len(run_ours())),
           "hf": lambda: rate(lambda: len(run_ref())), "bw": probe}
    if int8 is not None:
        fns["int8"] = lambda: rate(lambda: len(run_ours(int8)))
        agree = next((i for i, (a, b) in enumerate(zip(tokens, run_ours(int8))) if a != b), new)
    if compile:
        cold, compiled_tokens = compile_cold(lambda: run_ours(compiled=True))
        fns["compiled"] = lambda: rate(lambda: len(run_ours(compiled=True)))
    got = interleaved(fns, repeats)
    work = f"{name}: greedy, 1 x ({PROMPT} + {new}) tokens"
    same_note = f"same tokens as transformers: {'yes' if same else 'NO'}"
    rows = [table.row(f"{work} vs transformers", got["lmkit"], got["hf"], "tokens/s", 2.0,
                      same_note),
            bandwidth_row(work, got["lmkit"], ours, got["bw"])]
    if int8 is not None:
        int8_note = (f"int8 changes the numerics: its greedy tokens equal fp32's for the first "
                     f"{agree} of {new}")
        rows += [table.row(f"{work}, lmkit int8 weights vs transformers fp32", got["int8"],
                           got["hf"], "tokens/s", 2.0, int8_note),
                 bandwidth_row(f"{work}, lmkit int8 weights", got["int8"], int8, got["bw"])]
    if compile:
        note = (f"compile=True: the first call compiled in {cold:.0f} s (empty inductor "
                f"cache); same tokens as eager: {'yes' if compiled_tokens == tokens else 'NO'}")
        rows += [table.row(f"{work}, compiled vs transformers", got["compiled"], got["hf"],
                           "tokens/s", 2.0, note),
                 table.row(f"{work}, compiled vs eager lmkit", got["compiled"], got["lmkit"],
                           "tokens/s", 1.15, note)]
    return rows


def bandwidth_row(work: str, tokens_per_s: float, model: lmkit.Model, gb_per_s: float) -> dict:
    """Tokens/s against the memory-bandwidth limit: bandwidth / weight bytes per token."""
    weights = weight_bytes_per_token(model)
    return table.row(f"{work} vs memory-bandwidth limit", tokens_per_s, gb_per_s / (weights / 1e9),
                     "tokens/s", 0.8, f"{weights / 1e6:.0f} MB of weights per token at "
                     f"{gb_per_s:.1f} GB/s (sum of 512 MiB, same run)")


def compile_cold(first_call: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of `first_call()` (which compiles) from an empty inductor cache, and its
    result."""
    import torch._dynamo
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as d, temporary_cache_dir(d):
        start = time.perf_counter()
        result = first_call()
        return time.perf_counter() - start, result


def seq2seq(name: str, hf_cls: type, hf_cfg: tf.PretrainedConfig, new: int, repeats: int,
            dtype: torch.dtype) -> list[dict]:
    """An encoder-decoder of `name`'s shape: batched sampling and beam search vs
    transformers."""
    ref, ours = pair(hf_cls, hf_cfg, dtype)
    g = torch.Generator().manual_seed(0)
    return [seq2seq_row(ref, ours, f"{name}-shape: {label}",
                        torch.randint(100, 5000, (batch, SOURCE), generator=g),
                        settings, new, repeats)
            for label, batch, settings in (
                ("sampling (top-k 50)", 8, dict(do_sample=True, top_k=50, num_beams=1)),
                ("beam search (4 beams)", 4, dict(do_sample=False, num_beams=4,
                                                  length_penalty=1.0, early_stopping=True)))]


def seq2seq_row(ref: Any, ours: lmkit.Model, label: str, ids: torch.Tensor, settings: dict,
                new: int, repeats: int) -> dict:
    seed = 0 if settings["do_sample"] else None

    def run_ours() -> list[list[int]]:
        return lmkit.generate(ours, ids, max_new_tokens=new, eos_id=-1, seed=seed,
                              **settings).sequences

    def run_ref() -> list[list[int]]:
        torch.manual_seed(0)
        return hf_generate(ref, ids, max_new_tokens=new, **settings)[:, 1:].tolist()

    a, b = run_ours(), run_ref()  # also the warm-up
    assert all(len(s) == new for s in a + b), "a row stopped early"
    got = interleaved({"lmkit": lambda: rate(lambda: sum(map(len, run_ours()))),
                       "hf": lambda: rate(lambda: sum(map(len, run_ref())))}, repeats)
    note = ("seeded; tokens differ from transformers' (other random streams)"
            if settings["do_sample"] else
            f"same tokens as transformers: {'yes' if a == b else 'NO'}")
    return table.row(f"{label}, {len(ids)} x ({SOURCE} -> {new}) tokens",
               got["lmkit"], got["hf"], "tokens/s", 1.5, note)


def rows(quick: bool = False, threads: int | None = None, repeats: int | None = None,
         new_tokens: int | None = None,
         cases: tuple[str, ...] = ("gpt2", "llama", "marian", "t5"),
         dtype: str = "fp32", compile: bool | None = None) -> list[dict]:
    """Every row of this benchmark (`quick`: a smoke run, 1 repeat and fewer tokens; its
    figures are not the ones to report; `compile`: the compiled decoding rows, by default
    unless `quick`)."""
    compile = not quick if compile is None else compile
    if threads:
        torch.set_num_threads(threads)
    repeats = repeats or (1 if quick else 3)
    new = new_tokens or (16 if quick else 128)
    dt = DTYPES[dtype]
    out: list[dict] = []
    probe = bandwidth_probe()
    if "gpt2" in cases:
        out += one_sequence("GPT-2-124M", tf.GPT2LMHeadModel, tf.GPT2Config(**GPT2), new,
                            repeats, dt, probe, compile)
    if "llama" in cases:
        out += one_sequence("Llama (SmolLM2-135M shape)", tf.LlamaForCausalLM,
                            tf.LlamaConfig(**SMOLLM2), new, repeats, dt, probe, compile)
    if "marian" in cases:
        out += seq2seq("marian", tf.MarianMTModel, tf.MarianConfig(**MARIAN), min(new, 32),
                       repeats, dt)
    if "t5" in cases:
        out += seq2seq("t5", tf.T5ForConditionalGeneration, tf.T5Config(**T5), min(new, 32),
                       repeats, dt)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cases", default="gpt2,llama,marian,t5")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="weights of both models (the targets are for fp32)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 16 tokens: a smoke run")
    ap.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                    help="leave out the compiled decoding rows (each compiles for a minute "
                    "or more from an empty cache; left out with --quick)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = table.machine()
    print(f"{table.machine_line(info)}; {args.dtype}", flush=True)
    out = rows(args.quick, args.threads, 1 if args.quick else args.repeats,
               16 if args.quick else args.new_tokens, tuple(args.cases.split(",")),
               args.dtype, args.compile)
    print(f"{'work':72} {'lmkit':>8} {'ref':>8} {'ratio':>6} {'target':>7}")
    for r in out:
        print(f"{r['work']:72} {r['lmkit']:8.2f} {r['reference']:8.2f} {r['ratio']:6.2f} "
              f"{r['target']:>7} {'PASS' if r['passed'] else 'FAIL'}  ({r['note']})")
    print(f"load at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    table.emit(out, args.json)  # the last line: what `make bench` reads
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
