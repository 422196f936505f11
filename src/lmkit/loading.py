"""`lmkit.load`: a Model from any checkpoint format, and `convert` between formats.

The one place that tells the formats apart: an lmkit folder (config.json without a
"model_type", read here with `lmkit.checkpoint`), a Hugging Face folder (`lmkit.convert.hf`)
or a GGUF file (`lmkit.convert.gguf`). It sits above both `checkpoint` and `convert`, so
neither imports the other. `locate` turns what a user passes into a local path: a path, a
registry name (`lmkit.hub`) or a repo id in the local Hugging Face cache.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmkit.checkpoint import (
    CARRIED,
    CARRIED_FROM,
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    read_metadata,
    read_tensors,
    save,
    verify_files,
    verify_manifest,
)
from lmkit.config import ModelConfig
from lmkit.convert.gguf import card_fields, load_gguf
from lmkit.convert.hf import load_hf, retarget, save_hf
from lmkit.convert.peft import is_peft, load_peft, peft_head
from lmkit.device import INT8, as_dtype, check_dtype
from lmkit.errors import CheckpointError, RegistryError
from lmkit.generation_config import GENERATION_CONFIG, GenerationConfig
from lmkit.hub import default_registry, hf_cache, lookup, parse, resolve
from lmkit.lineage import write_conversion_card
from lmkit.model import Model, build
from lmkit.model.lora import ADAPTER_CONFIG, load_adapter, merge_lora
from lmkit.model.quant import quantize_int8
from lmkit.sharded import is_sharded, read_whole
from lmkit.textfiles import read_json
from lmkit.tokenizer import Tokenizer

log = logging.getLogger("lmkit")


@dataclass(frozen=True)
class Located:
    """What a checkpoint reference points to: the local file or folder to read, and where it
    came from (`origin`, recorded in a run's lineage): ``{"kind": "path", "path": ...}``."""

    path: Path
    origin: dict = field(default_factory=dict)


def locate(ref: str | Path, registry: str | None = None) -> Located:
    """Resolve a checkpoint reference (what a user passes to `load`, `finetune`, `pipeline`)
    to a local path and its origin. Every entry point resolves through here. In order:

    1. an existing file or folder: ``{"kind": "path", "path": ...}``;
    2. a model name ``owner/name[@tag|@revision]`` held by the registry (`registry`, default
       $LMKIT_REGISTRY or ~/.cache/lmkit/registry), pulled into the local cache and verified:
       ``{"kind": "registry", "name", "revision", "registry"}``;
    3. a repo id in the local Hugging Face cache (local files only, nothing downloaded):
       ``{"kind": "hf-cache", "repo", "commit"}``.
    A reference that is none of these raises a RegistryError saying where it looked."""
    path = Path(ref)
    if path.exists():
        return Located(path, {"kind": "path", "path": str(path.resolve())})
    try:
        name = parse(str(ref))
    except RegistryError:  # not a name either: the caller reports the missing path
        return Located(path, {"kind": "path", "path": str(path.resolve())})
    pulled = resolve(name, registry)
    if pulled is not None:
        return Located(_checkpoint_in(pulled.path), {
            "kind": "registry", "name": pulled.name, "revision": pulled.revision,
            "registry": pulled.registry})
    cached = lookup(name)
    if cached is not None:
        return Located(_checkpoint_in(cached.path), {
            "kind": "hf-cache", "repo": cached.repo, "commit": cached.commit})
    raise RegistryError(
        f"{ref} is not a file or folder, not a model in the registry "
        f"{registry or default_registry()} and not in the Hugging Face cache "
        f"{hf_cache()}: give an existing path, or publish the checkpoint with "
        f"`lmkit push FOLDER {name.repo}` (--registry URL or LMKIT_REGISTRY pick the registry)")


def _checkpoint_in(folder: Path) -> Path:
    """The folder, or the one .gguf file it holds when it has no config.json (a registry
    revision made by pushing a GGUF file)."""
    ggufs = sorted(folder.glob("*.gguf"))
    return ggufs[0] if not (folder / CONFIG).exists() and len(ggufs) == 1 else folder


def load(path: str | Path, *, head: str | None = None, label_names: list[str] | None = None,
         dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         allow_pickle: bool = False, adapter: str | Path | None = None) -> Model:
    """Load a checkpoint folder as a Model (with its tokenizer attached when it has one).

    Also reads Hugging Face folders (config.json with a "model_type") and GGUF files (a path
    ending in .gguf), translated by `lmkit.convert`. `allow_pickle` lets a Hugging Face folder
    that has only pytorch_model.bin be read (with torch.load(weights_only=True)).

    `head` / `label_names` put a new task head on the pretrained body: every body tensor must be in
    the checkpoint; the head's tensors are initialised and listed in `model.new_tensors`.

    `dtype`: None keeps the stored dtype; "auto" keeps it where `device` computes it natively,
    else fp32; "fp32" / "bf16" / "fp16" (GPU only) or a torch.dtype; "int8": the weights of
    every linear layer in int8 for inference (`lmkit.model.quant`; the rest as "auto", an
    adapter merged first; such a model cannot be trained or saved). `device`: "cpu", "auto"
    (the GPU if there is one), "cuda" or "cuda:N".

    `adapter`: a LoRA adapter folder to put on the model, in PEFT's layout
    (adapter_config.json + adapter_model.safetensors, trained on this base) or lmkit's
    (`lmkit.model.lora.save_adapter`). A PEFT adapter's task type picks the head unless
    `head` is given (a classifier also needs `label_names`)."""
    if check_dtype(dtype) == INT8:  # the model in floating point first, then int8
        model = load(path, head=head, label_names=label_names, dtype="auto", device=device,
                     allow_pickle=allow_pickle, adapter=adapter)
        return quantize_int8(merge_lora(model) if model.config.lora else model)
    if adapter is not None:
        return _with_adapter(path, locate(adapter).path, head=head, label_names=label_names,
                             dtype=dtype, device=device, allow_pickle=allow_pickle)
    path = locate(path).path
    if path.suffix.lower() == ".gguf":
        return load_gguf(path, head=head, label_names=label_names, dtype=dtype,
                         device=device)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}: give a folder holding "
                              f"{CONFIG} and {WEIGHTS}")
    if not (path / CONFIG).exists():
        raise CheckpointError(f"{path} has no {CONFIG}: it is not a checkpoint folder")
    if "model_type" in read_json(path / CONFIG):  # a Hugging Face folder: translated at the edge
        return load_hf(path, head=head, label_names=label_names, dtype=dtype, device=device,
                       allow_pickle=allow_pickle)
    return load_lmkit(path, head=head, label_names=label_names, dtype=dtype, device=device)


def _with_adapter(path: str | Path, adapter: Path, *, head: str | None, **kw) -> Model:
    """The base checkpoint at `path` with the LoRA adapter folder `adapter` on it."""
    if is_peft(adapter):
        model = load(path, head=head or peft_head(adapter), **kw)
        return load_peft(model, adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter} is not an adapter folder: it has no {ADAPTER_CONFIG}")
    return load_adapter(load(path, head=head, **kw), adapter).eval()


def load_lmkit(path: str | Path, *, head: str | None = None,
               label_names: list[str] | None = None,
               dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu") -> Model:
    """Load an lmkit checkpoint folder (`head` / `label_names` as in `load`); a sharded
    training checkpoint (written under FSDP) is read whole."""
    path = Path(path)
    shards = is_sharded(path) and not (path / WEIGHTS).exists()
    if shards:
        meta: dict[str, str] = {}
        verify_manifest(path)  # before anything else is trusted
    else:
        meta = read_metadata(path / WEIGHTS)
        verify_files(path, meta)
    source = ModelConfig.from_json(path / CONFIG)
    config = retarget(source, head, label_names)
    new = ("head.",) if config is not source else ()
    tensors = read_whole(path) if shards else read_tensors(path / WEIGHTS)[0]
    carried = {k.removeprefix(CARRIED): tensors.pop(k) for k in list(tensors)
               if k.startswith(CARRIED)}
    if new:  # the old head's tensors (and what was carried with it) have no place here
        tensors = {k: v for k, v in tensors.items() if not k.startswith(new)}
    model = build(config, tensors, new=new, dtype=dtype, device=device)
    if (path / TOKENIZER).exists():
        model.tokenizer = Tokenizer.from_dir(path)
    if (path / GENERATION_CONFIG).exists():
        model.generation_config = GenerationConfig.from_file(path / GENERATION_CONFIG)
    if carried and not new and CARRIED_FROM in meta:
        model.hf_model_type, model.hf_architecture = json.loads(meta[CARRIED_FROM])
        model.hf_carried = {k: v.to(model.tokens.weight.dtype) for k, v in carried.items()}
    return model


def convert(src: str | Path, dst: str | Path, to: str = "hf", *, model_type: str | None = None,
            allow_pickle: bool = False, dtype: str | torch.dtype | None = None,
            device: str = "cpu") -> Path:
    """Convert a checkpoint (lmkit folder, HF folder or .gguf file) to an HF folder
    (`to="hf"`), an lmkit folder (`to="lmkit"`) or a GGUF file (`to="gguf"`) at `dst`, read
    onto `device`. `dtype`: the format the weights are saved in ("fp32" / "bf16" / "fp16", on
    any device, and the config's dtype says so; GGUF also takes "q8_0"), "auto" (see `load`)
    or None (as stored). A folder gets a model card whose lineage names the source (and
    carries its ancestors); a GGUF file has no card. Returns `dst`.

    What the destination cannot hold (files of the source lmkit does not read, such as a
    sentence-transformers pooling config) is named in one warning."""
    if to not in ("hf", "lmkit", "gguf"):
        raise ValueError(f"to={to!r}: choose 'hf' (Hugging Face folder), 'lmkit' or 'gguf'")
    located = locate(src)
    lost = not_carried(located.path)
    if lost:
        log.warning("%s -> %s: not carried: %s", src, dst, "; ".join(lost))
    if to == "gguf":
        from lmkit.convert.gguf_export import save_gguf

        if dtype not in (None, "auto", *GGUF_DTYPES):
            raise ValueError(f"dtype={dtype!r} cannot be written to GGUF: choose fp32, fp16, "
                             "bf16 or q8_0")
        model = load(located.path, allow_pickle=allow_pickle, device=device)
        stored = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(model.tokens.weight.dtype)
        return save_gguf(model, dst, dtype=GGUF_DTYPES.get(dtype, stored or "f32"))
    if dtype == "q8_0":
        raise ValueError("dtype q8_0 is a GGUF weight type: use it with --to gguf")
    check_saved_dtype(dtype)
    saved = None if dtype in (None, "auto") else as_dtype(dtype)
    model = load(located.path, allow_pickle=allow_pickle,
                 dtype=dtype if saved is None else None, device=device)
    if saved is not None and model.tokens.weight.dtype != saved:
        model.to(saved)
        model.config = model.config.replace(dtype=str(saved).removeprefix("torch."))
    out = save_hf(model, dst, model_type=model_type) if to == "hf" else save(model, dst)
    gguf_source = located.path.suffix.lower() == ".gguf"
    write_conversion_card(out, located.path, located.origin,
                          {"to": to, "model_type": model_type, "dtype": str(dtype)},
                          card_fields(located.path) if gguf_source else None)
    return out


def check_saved_dtype(dtype: str | torch.dtype | None) -> None:
    """A ValueError unless `dtype` is a format a checkpoint can be written in (int8 is for
    inference only)."""
    if check_dtype(dtype) == INT8:
        raise ValueError("dtype int8 is for inference and is never written to a checkpoint: "
                         "convert with fp32, bf16 or fp16 (or --to gguf --dtype q8_0) and "
                         "run the result with --dtype int8")


# GGUF weight types by the names --dtype takes (llama.cpp's own names too)
GGUF_DTYPES = {"fp32": "f32", "f32": "f32", "fp16": "f16", "f16": "f16", "bf16": "bf16",
               "q8_0": "q8_0"}


# Files of a Hugging Face folder that lmkit reads (weights, configs, tokenizer sources):
# everything else in the folder is named by `not_carried`.
# README.md is carried by the conversion's card (lineage.write_conversion_card keeps its text)
_READ = re.compile(r"README\.md|config\.json|generation_config\.json|tokenizer(_config)?\.json|"
                   r"special_tokens_map\.json|chat_template\.jinja|vocab\.(txt|json)|"
                   r"merges\.txt|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
                   r"(\.index\.json)?")


def not_carried(src: Path) -> list[str]:
    """What a conversion of `src` leaves behind: files and folders of an HF folder that
    lmkit does not read (modules.json, 1_Pooling/, ...)."""
    if not (src / CONFIG).is_file() or "model_type" not in read_json(src / CONFIG):
        return []  # an lmkit folder carries everything it holds
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in src.iterdir()
                   if not p.name.startswith(".") and not _READ.fullmatch(p.name))
    return [f"files {', '.join(names)}"] if names else []
