"""Tensor-name tables: the machinery every converter shares (Hugging Face families, GGUF).

A table maps lmkit names to foreign names. An entry names either a whole tensor or a module
(then its `.weight` / `.bias` follow), and a template with `{i}` stands for every layer of its
stack. An entry may give several foreign names for one tensor: the first is written, any is
read (tied copies such as `encoder.embed_tokens` beside `shared`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lmkit.config import ModelConfig
from lmkit.errors import CheckpointError

Table = list[tuple[str, str | tuple[str, ...]]]
Tensors = dict[str, torch.Tensor]


def expand(table: Table, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Table templates with `{i}` written out for every layer of their stack."""
    out: dict[str, tuple[str, ...]] = {}
    for lm, hf in table:
        alts = (hf,) if isinstance(hf, str) else tuple(hf)
        if "{i}" not in lm:
            out[lm] = alts
            continue
        n = cfg.encoder_layers if lm.startswith("encoder.") else cfg.decoder_layers
        for i in range(n):
            out[lm.format(i=i)] = tuple(a.format(i=i) for a in alts)
    return out


def layer_names(table: Table) -> dict[str, tuple[str, ...]]:
    """Per stack, the foreign names of a table's layer-indexed entries (with `{i}`), for
    `lmkit.checkpoint.check_layers`."""
    out: dict[str, tuple[str, ...]] = {"encoder": (), "decoder": ()}
    for lm, foreign in table:
        if "{i}" in lm:
            stack = "encoder" if lm.startswith("encoder.") else "decoder"
            out[stack] += (foreign,) if isinstance(foreign, str) else tuple(foreign)
    return out


def _lookup(name: str, mapping: dict[str, Any]) -> tuple[Any, str] | None:
    """The entry for a tensor name, whole or by its module (returning the leaf to append)."""
    if name in mapping:
        return mapping[name], ""
    module, _, leaf = name.rpartition(".")
    if module in mapping:
        return mapping[module], "." + leaf
    return None


def to_lmkit_names(tensors: Tensors, table: dict[str, tuple[str, ...]], ignore: tuple[str, ...],
                   tied: bool) -> Tensors:
    """Rename foreign (HF, GGUF) tensors to lmkit names. Tied copies and ignored tensors are
    dropped; tensors the table does not know keep their foreign name, so `check_tensors`
    reports them."""
    reverse = {alt: (lm, rank) for lm, alts in table.items() for rank, alt in enumerate(alts)}
    out: Tensors = {}
    rank_of: dict[str, int] = {}
    unknown: Tensors = {}
    for name in list(tensors):
        hit = _lookup(name, reverse)
        if hit is None:
            if not any(re.fullmatch(p, name) for p in ignore):
                unknown[name] = tensors[name]
            continue
        (lm, rank), leaf = hit
        target = lm + leaf
        if tied and target == "head.proj.weight":
            continue  # a stored copy of the tied embedding
        if target not in out or rank < rank_of[target]:  # prefer the first alternative
            out[target], rank_of[target] = tensors[name], rank
    return {**out, **unknown}


def to_foreign_names(tensors: Tensors, table: dict[str, tuple[str, ...]]) -> Tensors:
    """Rename lmkit tensors to foreign (HF, GGUF) names: the first alternative of each entry."""
    out: Tensors = {}
    for name, t in tensors.items():
        hit = _lookup(name, table)
        if hit is None:
            raise CheckpointError(f"lmkit tensor {name} has no name in this format's table "
                                  "for the family: the config cannot be exported to it")
        alts, leaf = hit
        out[alts[0] + leaf] = t
    return out


def split_rows(tensors: Tensors, parts: dict[str, tuple[str, ...]], cfg: ModelConfig) -> Tensors:
    """Split fused matrices by rows (Phi-3, ModernBERT, GGUF): a tensor of module `fused` (a key
    of `parts`, the module name's end) becomes one per name in `parts[fused]`, which are q, k, v
    (three parts: query and key/value sizes of `cfg`) or gate, up (two halves). Other tensors
    pass through."""
    q, kv = cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    sizes = {3: [q, kv, kv], 2: [cfg.intermediate_size] * 2}
    out: Tensors = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        fused = next((k for k in parts if module == k or module.endswith("." + k)), None)
        if fused is None:
            out[name] = t
            continue
        stem = module.removesuffix(fused)
        for part, rows in zip(parts[fused], t.split(sizes[len(parts[fused])])):
            out[f"{stem}{part}.{leaf}"] = rows
    return out


def join_rows(tensors: Tensors, parts: dict[str, tuple[str, ...]]) -> Tensors:
    """The inverse of `split_rows`: the tensors of `parts[fused]` concatenated by rows."""
    out = dict(tensors)
    for fused, names in parts.items():
        for name in tensors:
            module, _, leaf = name.rpartition(".")
            if module == names[0] or module.endswith("." + names[0]):
                stem = module.removesuffix(names[0])
                out[f"{stem}{fused}.{leaf}"] = torch.cat([out.pop(f"{stem}{p}.{leaf}")
                                                          for p in names])
    return out
