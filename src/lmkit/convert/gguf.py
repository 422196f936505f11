"""GGUF import (llama.cpp's single-file format): the llama, qwen2, qwen3, gemma and phi3
architectures (`ARCHITECTURES`: what each fixes in the config, one shared tensor table).

Quantized tensors are dequantized to float one at a time, straight into the dtype asked for,
so the weights are never in memory twice (the file itself is memory-mapped). llama.cpp stores
the query and key projections with rows permuted for its interleaved rotary layout; they are
permuted back to the half-split layout lmkit (and Hugging Face) use (the other architectures
are stored unpermuted). Gemma's norm weights are stored as 1 + w; Phi-3 keeps q/k/v and
gate/up fused. The tokenizer is rebuilt from the file's `tokenizer.ggml.*` metadata.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from lmkit.checkpoint import DTYPES, check_layers
from lmkit.config import ModelConfig
from lmkit.convert.hf import check_vocab, new_head_parts, retarget
from lmkit.convert.tables import Table, expand, layer_names, split_rows, to_lmkit_names
from lmkit.device import resolve_device, weight_dtype
from lmkit.errors import CheckpointError, reading, require
from lmkit.model import Model, build
from lmkit.tokenizer import Tokenizer

log = logging.getLogger("lmkit")


@dataclass(frozen=True)
class Arch:
    """What one llama.cpp architecture fixes: ModelConfig fields, whether Q/K rows are
    permuted (llama.cpp's LlamaModel converter), the offset added to stored norm weights
    (Gemma: 1) and whether q/k/v and gate/up are fused (Phi-3)."""

    fields: dict[str, Any] = field(default_factory=dict)
    permuted: bool = False
    norm_shift: float = 0.0
    fused: bool = False


ARCHITECTURES = {
    "llama": Arch(permuted=True),
    "qwen2": Arch(dict(attention_bias=True, attention_out_bias=False)),
    "qwen3": Arch(dict(qk_norm=True)),
    "gemma": Arch(dict(norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh"),
                  norm_shift=1.0),
    "phi3": Arch(fused=True),
}
# the fused tensors of Phi-3 under lmkit names, split after dequantizing
_FUSED = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.gate_up": ("mlp.gate", "mlp.up")}

_TABLE: Table = [  # llama's; the other architectures change a few rows (`_table`)
    ("tokens", "token_embd"), ("decoder.final_norm", "output_norm"), ("head.proj", "output"),
    ("decoder.layers.{i}.attn_norm", "blk.{i}.attn_norm"),
    ("decoder.layers.{i}.attn.q", "blk.{i}.attn_q"),
    ("decoder.layers.{i}.attn.k", "blk.{i}.attn_k"),
    ("decoder.layers.{i}.attn.v", "blk.{i}.attn_v"),
    ("decoder.layers.{i}.attn.o", "blk.{i}.attn_output"),
    ("decoder.layers.{i}.mlp_norm", "blk.{i}.ffn_norm"),
    ("decoder.layers.{i}.mlp.gate", "blk.{i}.ffn_gate"),
    ("decoder.layers.{i}.mlp.up", "blk.{i}.ffn_up"),
    ("decoder.layers.{i}.mlp.down", "blk.{i}.ffn_down"),
]
_UNFUSED = ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up")


def _table(cfg: ModelConfig, arch: Arch) -> Table:
    """The tensor table of one architecture: `_TABLE` with Phi-3's fused matrices in place of
    their parts, plus Qwen3's q/k norms."""
    table = list(_TABLE)
    if arch.fused:
        table = [e for e in table if not e[0].endswith(_UNFUSED)]
        table += [("decoder.layers.{i}.attn.qkv", "blk.{i}.attn_qkv"),
                  ("decoder.layers.{i}.mlp.gate_up", "blk.{i}.ffn_up")]
    if cfg.qk_norm:
        table += [("decoder.layers.{i}.attn.q_norm", "blk.{i}.attn_q_norm"),
                  ("decoder.layers.{i}.attn.k_norm", "blk.{i}.attn_k_norm")]
    return table
# llama.cpp's pre-tokenizer names -> the split regex its merges were learned with (None: the
# GPT-2 regex inside ByteLevel). "smollm" also isolates every digit.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 / Qwen3: Llama 3's split with single digits, after NFC normalisation
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_SPLITS = {"default": None, "gpt2": None, "gpt-2": None, "smollm": None,
               "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "qwen2": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def card_fields(path: str | Path) -> dict[str, Any]:
    """What a GGUF file says about its model that a model card holds (license, name,
    languages, from `general.*`), for the card of a conversion."""
    gguf = require("gguf", "gguf", "reading GGUF files")
    keys = {"general.license": "license", "general.name": "model_name",
            "general.languages": "language"}
    with _reading(Path(path)):
        fields = gguf.GGUFReader(path).fields
        return {card: fields[key].contents() for key, card in keys.items() if key in fields}


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value fields of an open GGUFReader as Python values."""
    return {name: f.contents() for name, f in reader.fields.items()}


def config_from_gguf(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                     dtype: str = "float32") -> ModelConfig:
    """A ModelConfig from GGUF metadata (`tensor_shapes` in PyTorch order, for the vocabulary
    size and whether the LM head is tied)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; lmkit reads: "
                              f"{', '.join(ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def count(key: str, default: Any = None) -> int:
        value = get(key, default)
        if isinstance(value, list):
            raise CheckpointError(f"per-layer values of {arch}.{key} are not supported")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"GGUF metadata {arch}.{key}={value!r} is not a positive "
                                  "integer: the file is damaged")
        return value

    scaling = get("rope.scaling.type", "none")
    if scaling not in (None, "none", "linear"):
        raise CheckpointError(f"rope scaling {scaling!r} is not supported (only unscaled or "
                              "linear rotary)")
    factor = get("rope.scaling.factor", 1.0)
    heads, hidden = count("attention.head_count"), count("embedding_length")
    kv_heads = count("attention.head_count_kv", heads)
    head_dim = count("attention.key_length", hidden // heads or 1)
    embedding = tensor_shapes.get("token_embd.weight")
    if embedding is None or len(embedding) != 2 or embedding[1] != hidden:
        raise CheckpointError(f"the token embedding {embedding} does not fit the metadata's "
                              f"embedding_length {hidden}: the file is damaged")
    tok = meta.get
    fields = dict(
        family="decoder", vocab_size=embedding[0], hidden_size=hidden,
        num_heads=heads, num_kv_heads=None if kv_heads == heads else kv_heads,
        head_dim=None if head_dim * heads == hidden else head_dim,
        decoder_layers=count("block_count"), intermediate_size=count("feed_forward_length"),
        activation="silu", gated_mlp=True, norm="rmsnorm",
        rope_scaling={"type": "linear", "factor": factor} if scaling == "linear" else None,
        sliding_window=get("attention.sliding_window"),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5), position="rotary",
        rope_theta=get("rope.freq_base", 10000.0),
        rotary_fraction=get("rope.dimension_count", head_dim) / head_dim,
        max_positions=get("context_length", 2048), attention_bias=False, mlp_bias=False,
        tie_embeddings="output.weight" not in tensor_shapes, dropout=0.0,
        pad_id=tok("tokenizer.ggml.padding_token_id"), bos_id=tok("tokenizer.ggml.bos_token_id"),
        eos_id=tok("tokenizer.ggml.eos_token_id"), dtype=dtype, head="lm",
        classifier_bias=False)  # as the HF translation of these families (their `score`)
    return ModelConfig(**{**fields, **ARCHITECTURES[arch].fields})


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of Q/K weights (interleaved rotary pairs -> halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def _dequantize(gguf: Any, t: Any) -> torch.Tensor:
    """One tensor as float32 in PyTorch (row-major, out x in) order, in memory of its own."""
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    if not arr.flags.writeable or arr.base is not None:  # a view of the mapped file
        arr = np.array(arr, dtype=np.float32)
    return torch.from_numpy(arr.astype(np.float32, copy=False)).reshape(
        tuple(int(n) for n in reversed(t.shape)))


def tokenizer_from_gguf(meta: dict[str, Any]) -> Any:
    """An lmkit Tokenizer from `tokenizer.ggml.*` metadata (byte-level BPE, model 'gpt2'), with
    control tokens as special tokens and bos/eos/pad/unk from their ids; None (with a warning)
    for tokenizer models lmkit cannot rebuild yet."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        log.warning("GGUF tokenizer model %r is not supported (only byte-level BPE 'gpt2'); "
                    "loading the model without a tokenizer", kind)
        return None
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                              merges=merges))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        log.warning("GGUF pre-tokenizer %r is unknown to lmkit; using GPT-2's split", pre)
    split = _PRE_SPLITS.get(pre)
    if split is not None:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])
    roles = {}
    for role, key in [("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id"), ("unk", "unknown_token_id")]:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= i < len(tokens):
            roles[role] = tokens[i]
    post = [processors.ByteLevel(trim_offsets=True)]
    if meta.get("tokenizer.ggml.add_bos_token", False) and "bos" in roles:
        post.append(processors.TemplateProcessing(
            single=f"{roles['bos']} $A", pair=f"{roles['bos']} $A {roles['bos']} $B:1",
            special_tokens=[(roles["bos"], tokens.index(roles["bos"]))]))
    backend.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    tokenizer = Tokenizer(backend, roles)
    tokenizer.chat_template = meta.get("tokenizer.chat_template")
    return tokenizer


def _read(path: Path, head: str | None, label_names: list[str] | None,
          dtype: torch.dtype) -> tuple[ModelConfig, ModelConfig, dict[str, torch.Tensor], dict]:
    """Config (the file's and the one asked for), float tensors with lmkit names, metadata.
    The reader (its memory-mapped file and per-field arrays, ~2.5x the file for SmolLM2) lives
    only inside this function, so it is gone before the model is built."""
    gguf = require("gguf", "gguf", "reading GGUF files")
    with _reading(path):
        return _read_file(gguf, path, head, label_names, dtype)


def _reading(path: Path) -> contextlib.AbstractContextManager:
    """The gguf reader's own errors on a malformed file (IndexError, ZeroDivisionError, ...)
    become a CheckpointError naming it."""
    return reading(path, CheckpointError, "GGUF file", "it is truncated or corrupted, or not "
                   "a GGUF file: copy it again or re-export it with llama.cpp's tools")


def _read_file(gguf: Any, path: Path, head: str | None, label_names: list[str] | None,
               dtype: torch.dtype) -> tuple[ModelConfig, ModelConfig, dict[str, torch.Tensor],
                                            dict]:
    reader = gguf.GGUFReader(path)
    meta = read_metadata(reader)
    reader.fields.clear()  # ~100k small arrays for the vocabulary; `meta` has the values
    gc.collect()
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    try:
        source = config_from_gguf(meta, shapes, dtype_name)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the GGUF metadata does not describe a valid model "
                              f"({e})") from None
    arch = ARCHITECTURES[meta["general.architecture"]]
    table = _table(source, arch)
    check_layers(source, shapes, path, layer_names(table))  # before anything per layer
    cfg = retarget(source, head, label_names)
    ignore = () if cfg is source else (r"output\.weight",)
    # Rename first (values are the lazy reader tensors), then dequantize one tensor at a time.
    lazy = to_lmkit_names({t.name: t for t in reader.tensors}, expand(table, cfg), ignore,
                          cfg.tied_output)
    tensors: dict[str, torch.Tensor] = {}
    for name in list(lazy):
        w = _dequantize(gguf, lazy.pop(name))
        if arch.permuted and name.endswith("attn.q.weight"):
            w = _unpermute(w, cfg.num_heads)
        elif arch.permuted and name.endswith("attn.k.weight"):
            w = _unpermute(w, cfg.kv_heads)
        elif arch.norm_shift and name.endswith("norm.weight"):
            w = w - arch.norm_shift
        tensors[name] = w.to(dtype)
    if arch.fused:
        tensors = split_rows(tensors, _FUSED, cfg)
    return source, cfg, tensors, meta


def load_gguf(path: str | Path, *, head: str | None = None,
              label_names: list[str] | None = None,
              dtype: torch.dtype | str | None = None,
              device: str | torch.device = "cpu") -> Model:
    """Load a GGUF file (llama, qwen2, qwen3, gemma or phi3 architecture) as an lmkit Model
    in eval mode, with the tokenizer its metadata describes. Quantized weights are
    dequantized to `dtype` (default float32)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}")
    dtype = weight_dtype(dtype, resolve_device(device), torch.float32)  # None, auto: fp32
    source, cfg, tensors, meta = _read(path, head, label_names, dtype)
    gc.collect()  # the reader's objects reference each other; free the mapping now
    new = new_head_parts(cfg, tensors) if cfg is not source else ()
    tensors = {k: v for k, v in tensors.items() if not k.startswith(new or ("\0",))}
    try:
        model = build(cfg, tensors, new=new, dtype=dtype, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"{path} (GGUF): {e}") from None
    del tensors
    with _reading(path):
        tokenizer = tokenizer_from_gguf(meta)
    if tokenizer is not None:
        check_vocab(tokenizer, cfg, path)
    model.tokenizer = tokenizer
    return model.eval()
