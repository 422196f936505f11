"""GGUF export: an lmkit decoder of the Llama architecture as one llama.cpp GGUF file.

The inverse of `lmkit.convert.gguf`: the same tensor-name table, the Q/K rows permuted into
llama.cpp's interleaved rotary layout, the hyper-parameters as `llama.*` metadata and the
tokenizer (byte-level BPE) and chat template as `tokenizer.*` metadata. Whether GGUF's llama
architecture expresses a config is decided by reading the metadata back with the importer's
own `config_from_gguf`: what does not survive that round trip is refused by name, never
written wrong.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkit.checkpoint import refuse_int8
from lmkit.config import ModelConfig
from lmkit.convert.gguf import _PRE_SPLITS, _TABLE, config_from_gguf
from lmkit.convert.tables import expand, to_foreign_names
from lmkit.errors import CheckpointError, require, write_error
from lmkit.model import Model

log = logging.getLogger("lmkit")
# --dtype -> (the GGML type of 2-D weights, general.file_type as llama.cpp numbers it)
WEIGHT_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp token types
# Fields the round-trip check ignores: not part of the architecture (ids are written with the
# tokenizer, dtype by --dtype), meaningless at inference (dropout) or of task heads other than
# the LM head that GGUF holds.
_NOT_ARCHITECTURE = {"pad_id", "bos_id", "eos_id", "dtype", "dropout", "attention_dropout",
                     "activation_dropout", "label_names", "lora", "pooling", "classifier_hidden",
                     "classifier_activation", "classifier_norm", "classifier_bias",
                     "head_dense_bias", "mlm_transform"}


def save_gguf(model: Model, path: str | Path, dtype: str = "f16",
              name: str | None = None) -> Path:
    """Write `model` (a Llama-architecture decoder with an LM head) as a GGUF file at `path`.

    `dtype`: "f32", "f16", "bf16" or "q8_0" for the 2-D weights (norms stay f32, as
    llama.cpp keeps them; a weight whose rows are not a multiple of 32 falls back from q8_0
    to f16). The tokenizer (byte-level BPE) and its chat template go into the metadata. The
    file is written next to `path` and renamed into place, so a failure leaves no half file."""
    if dtype not in WEIGHT_TYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(WEIGHT_TYPES)}")
    refuse_int8(model)
    gguf = require("gguf", "gguf", "writing GGUF files")
    path = Path(path)
    cfg = model.config
    meta = _architecture(cfg, name or path.stem, WEIGHT_TYPES[dtype][1])
    _check_round_trip(cfg, meta)
    meta.update(_tokenizer_metadata(model.tokenizer, cfg.vocab_size))
    tensors = _gguf_tensors(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        writer = gguf.GGUFWriter(str(staging), "llama")
        for key, value in meta.items():
            if key != "general.architecture":  # the writer adds it
                _add(writer, gguf, key, value)
        fallback = [k for k, t in tensors.items() if not _add_tensor(writer, gguf, k, t, dtype)]
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(staging, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staging, path)
    except Exception as e:
        staging.unlink(missing_ok=True)
        err = write_error(e, path)
        if err is e:
            raise
        raise err from e
    if fallback:
        log.warning("%d weight(s) written as f16, not q8_0 (rows not a multiple of 32): %s",
                    len(fallback), ", ".join(fallback[:4]) + (" ..." if len(fallback) > 4 else ""))
    return path


def _architecture(cfg: ModelConfig, name: str, file_type: int) -> dict[str, Any]:
    """The `general.*` and `llama.*` metadata of `cfg` (keys as llama.cpp writes them)."""
    if cfg.family != "decoder" or cfg.head != "lm":
        raise CheckpointError(f"GGUF export writes decoders with an LM head; this is a "
                              f"{cfg.family} with head {cfg.head!r}: export it to a Hugging "
                              "Face folder instead (--to hf)")
    head_dim = cfg.dim_per_head
    return {"general.architecture": "llama", "general.name": name,
            "general.file_type": file_type,
            "llama.block_count": cfg.decoder_layers, "llama.context_length": cfg.max_positions,
            "llama.embedding_length": cfg.hidden_size,
            "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count": cfg.num_heads,
            "llama.attention.head_count_kv": cfg.kv_heads,
            "llama.attention.key_length": head_dim, "llama.attention.value_length": head_dim,
            "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
            "llama.rope.freq_base": float(cfg.rope_theta),
            "llama.rope.dimension_count": round(head_dim * cfg.rotary_fraction),
            "llama.vocab_size": cfg.vocab_size}


def _check_round_trip(cfg: ModelConfig, meta: dict[str, Any]) -> None:
    """Refuse a config that GGUF's llama metadata would read back as a different model."""
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.hidden_size)}
    if not cfg.tied_output:
        shapes["output.weight"] = (cfg.vocab_size, cfg.hidden_size)
    back = config_from_gguf(meta, shapes, cfg.dtype)
    diff = [f"{f.name}={getattr(cfg, f.name)!r} (GGUF llama: {getattr(back, f.name)!r})"
            for f in fields(ModelConfig) if f.name not in _NOT_ARCHITECTURE
            and getattr(cfg, f.name) != getattr(back, f.name)]
    if diff:
        raise CheckpointError("GGUF's llama architecture cannot express this model: "
                              + "; ".join(diff) + ". Export it to a Hugging Face folder "
                              "instead (--to hf)")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row permutation of Q/K weights (half-split rotary -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def _gguf_tensors(model: Model) -> dict[str, torch.Tensor]:
    """The model's tensors (tied copies once) under GGUF names, as float32, Q/K permuted."""
    cfg = model.config
    tied = model.tied_names()
    out = {}
    for k, v in model.state_dict().items():
        if k in tied:
            continue
        w = v.detach().to("cpu", torch.float32)
        if k.endswith("attn.q.weight"):
            w = _permute(w, cfg.num_heads)
        elif k.endswith("attn.k.weight"):
            w = _permute(w, cfg.kv_heads)
        out[k] = w
    return to_foreign_names(out, expand(_TABLE, cfg))


def _add_tensor(writer: Any, gguf: Any, name: str, t: torch.Tensor, dtype: str) -> bool:
    """Add one tensor in the asked type (1-D tensors as f32). False if q8_0 fell back."""
    qtype = getattr(gguf.GGMLQuantizationType, WEIGHT_TYPES[dtype][0])
    arr = t.numpy()
    kept = True
    if t.dim() < 2:
        qtype = gguf.GGMLQuantizationType.F32
    elif dtype == "q8_0" and arr.shape[-1] % 32:
        qtype, kept = gguf.GGMLQuantizationType.F16, False
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, arr)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    return kept


def _add(writer: Any, gguf: Any, key: str, value: Any) -> None:
    """One metadata field, typed as llama.cpp types it (counts and ids uint32)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"GGUF metadata {key}: cannot write a {type(value).__name__}")


def _tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.ggml.*` (and the chat template) for a byte-level BPE tokenizer; nothing,
    with a warning, for tokenizers the GGUF importers could not rebuild the same."""
    if tokenizer is None:
        log.warning("the model has no tokenizer: the GGUF file will have none")
        return {}
    spec = json.loads(tokenizer.backend.to_str())
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if spec["model"].get("type") != "BPE" or pre is None:
        log.warning("GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM "
                    "style); this one is not: the GGUF file will have no tokenizer")
        return {}
    vocab = spec["model"]["vocab"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size:
            tokens[i], types[i] = token, _NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = _CONTROL if added["special"] else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                            "tokenizer.ggml.merges": merges}
    for role, key in [("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id"), ("unk", "unknown_token_id")]:
        token = tokenizer.roles.get(role)
        if token is not None:
            meta[f"tokenizer.ggml.{key}"] = tokenizer.token_to_id(token)
    bos = tokenizer.roles.get("bos")
    meta["tokenizer.ggml.add_bos_token"] = bool(bos) and tokenizer.encode("a")[:1] == [
        tokenizer.token_to_id(bos)]
    if getattr(tokenizer, "chat_template", None):
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer (the inverse of the importer's
    `_PRE_SPLITS`), or None when it is not one of those."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    digits = kinds[:1] == ["Digits"]
    if digits:
        steps, kinds = steps[1:], kinds[1:]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "smollm" if digits else "gpt2"
    if kinds == ["Split", "ByteLevel"] and not digits:
        regex = steps[0].get("pattern", {}).get("Regex")
        return next((name for name, split in _PRE_SPLITS.items()
                     if split is not None and split == regex), None)
    return None
