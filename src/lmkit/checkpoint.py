"""Checkpoint folders: `config.json` + `model.safetensors` (+ `tokenizer.json`).

Saving is atomic: everything is written under a temporary name and renamed into place, so an
interrupted save never leaves a half-written checkpoint. Reading checks the file (and the
checksum lmkit wrote) and `check_tensors` every tensor's name, shape and dtype before anything
is used. This module knows files, not models: `lmkit.model.build` turns tensors into a Model
and `lmkit.loading` tells the checkpoint formats apart.

Integrity: the safetensors metadata holds a CRC32 of the tensor bytes and of every other file of
the save (config.json, tokenizer files); training checkpoints add a manifest of every file.
`check_layers` compares a config's layer counts with the tensor names before a model is built.
Pickles are read in one place, `read_pickle`: only with `weights_only=True`, and only where the
caller allows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmkit.errors import CheckpointError, StorageError, storage, storage_error, write_error
from lmkit.textfiles import read_json

if TYPE_CHECKING:  # hints only: the model layer imports this module to save itself
    from lmkit.config import ModelConfig
    from lmkit.model import Model

log = logging.getLogger("lmkit")

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index (lmkit.sharded)
# Tensors of a Hugging Face checkpoint that lmkit keeps without computing with them (BERT's
# pooler): their name prefix in model.safetensors, and the metadata key of their HF type.
CARRIED, CARRIED_FROM = "hf_carried:", "lmkit.hf_carried_from"
# Layer-indexed tensor names of lmkit models, per stack (converters pass their own).
LAYER_NAMES = {"encoder": ("encoder.layers.{i}.",), "decoder": ("decoder.layers.{i}.",)}


def _crc(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum over all tensor bytes, in name order, to detect corrupted data."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        crc = zlib.crc32(t.view(-1).view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


def file_crc(file: Path) -> str:
    """CRC32 of a file's bytes (as for tensors: it catches corruption, and is ~3x faster
    than SHA-256, which matters for multi-GB training states)."""
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def refuse_int8(model: Model) -> None:
    """A CheckpointError when `model` holds int8 weights (`lmkit.load(dtype="int8")`): they
    are for inference and never written, so nothing saved is a lossy copy."""
    if any(t.dtype == torch.int8 for t in model.state_dict().values()):
        raise CheckpointError("this model holds int8 weights (dtype int8), which are for "
                              "inference and never saved: load the checkpoint again without "
                              "dtype int8 to save, convert or train it")


def save(model: Model, path: str | Path, tokenizer: Any = None,
         extra_files: dict[str, str] | None = None,
         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as a checkpoint folder at `path` (created or replaced atomically).

    Tied weights are stored once. `tokenizer` (or the model's attached one) is saved as
    tokenizer.json, the model's generation_config as generation_config.json. Tensors carried
    from a Hugging Face checkpoint (`model.hf_carried`) are stored under `CARRIED` + their HF
    name, with the type they were read from in the metadata. `extra_files` maps file names
    to text (a model card, say). The weights' metadata holds the checksums of everything
    else `load` reads. `state_dict`: the model's tensors whole, where `model` holds only its
    shard of them (FSDP: gathered by lmkit.train.distributed.full_state_dict)."""
    refuse_int8(model)
    path = Path(path)
    tied = model.tied_names()
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items() if k not in tied}
    carried = getattr(model, "hf_carried", None) or {}
    dtype = model.tokens.weight.dtype
    tensors.update({CARRIED + k: v.to(dtype).contiguous() for k, v in carried.items()})
    with atomic_folder(path) as staging:
        write_model_files(model, staging, tokenizer)
        files = {f.name: file_crc(f) for f in sorted(staging.iterdir())}
        meta = {"format": "pt", "lmkit.crc32": _crc(tensors), "lmkit.files": json.dumps(files)}
        if carried:
            meta[CARRIED_FROM] = json.dumps([model.hf_model_type, model.hf_architecture])
        save_file(tensors, staging / WEIGHTS, metadata=meta)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return path


def write_model_files(model: Model, folder: Path, tokenizer: Any = None) -> None:
    """A checkpoint folder's files besides the weights: config.json, the tokenizer
    (`tokenizer` or the model's own) and generation_config.json."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    model.config.to_json(folder / CONFIG)
    if tokenizer is not None:
        tokenizer.save(folder)
    if model.generation_config is not None:
        model.generation_config.save(folder)


def _plain_name(name: str) -> bool:
    """A file directly in the checkpoint folder: no sub-path, no hidden or staging name
    (but the index of a sharded checkpoint)."""
    return "/" not in name and (not name.startswith(".") or name == SHARDED_INDEX)


def verify_files(folder: Path, meta: dict[str, str]) -> None:
    """Check the files listed in the weights' metadata (`lmkit.files`) against their CRC32."""
    if "lmkit.files" not in meta:  # written by another tool (or an older lmkit)
        return
    try:
        files = json.loads(meta["lmkit.files"])
    except json.JSONDecodeError:
        files = None
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and _plain_name(k) for k in files):
        raise CheckpointError(f"{folder / WEIGHTS} has damaged metadata (lmkit.files): copy "
                              "the checkpoint again or re-save it")
    for name, digest in files.items():
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} lacks {name}, which was saved with the weights: "
                                  "copy the whole folder again")
        if file_crc(folder / name) != digest:
            raise CheckpointError(
                f"{folder / name} is corrupted or was edited: it does not match the checksum "
                "saved with the weights; restore it from a copy or re-save the checkpoint")


def write_manifest(folder: Path) -> None:
    """Write manifest.json: the size and CRC32 of every other file in `folder`."""
    files = {f.name: {"bytes": f.stat().st_size, "crc32": file_crc(f)}
             for f in sorted(folder.iterdir()) if f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_manifest(folder: Path) -> None:
    """Check every file listed in `folder`'s manifest.json (sizes first, then CRC32)."""
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it was not written by this version "
                              "of lmkit or was altered, so its integrity cannot be checked")
    manifest = read_json(folder / MANIFEST, "manifest", CheckpointError)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) for v in files.values()):
        raise CheckpointError(f"{folder / MANIFEST} is damaged: it does not list files")
    for name, entry in files.items():
        file = folder / name
        if not _plain_name(name) or not file.is_file():
            raise CheckpointError(f"{folder} lacks {name}, listed in its {MANIFEST}")
        if file.stat().st_size != entry["bytes"] or file_crc(file) != entry.get("crc32"):
            raise CheckpointError(f"{file} is corrupted: it does not match the checksum in "
                                  f"{MANIFEST} written when the checkpoint was saved")


def read_pickle(file: Path, allow_pickle: bool) -> Any:
    """The one place lmkit reads a pickle: only when `allow_pickle` (the caller's policy for
    this file), and only with `torch.load(weights_only=True)`, which refuses to run code."""
    if not allow_pickle:
        raise CheckpointError(
            f"{file} is a pickle file; lmkit does not read pickles unless asked, because a "
            "pickle can run code. If you trust its source, pass allow_pickle=True (--allow-"
            "pickle; it is read with torch.load(weights_only=True)), or convert it to "
            "safetensors first.")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for bad pickles
        if isinstance(e, OSError) and e.errno is not None:  # the system's fault, not the file's
            raise storage_error(e, "read", file) from e
        raise CheckpointError(f"{file} could not be read as a weights-only PyTorch file "
                              f"({_diagnosis(e)}); it is damaged or holds more than tensors"
                              ) from None


def _diagnosis(error: Exception) -> str:
    """What torch found wrong in a pickle, without its advice (which is to load it with
    weights_only=False, i.e. to run whatever code it holds, or to allowlist that code)."""
    text = str(error)
    if m := re.search(r"WeightsUnpickler error: ([^\n]*)", text):
        return m.group(1).split(" was not an allowed")[0].split(". ")[0]
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    useful = [p for p in parts if not re.search(r"weights.only|https?://", p, re.I)]
    return useful[0].splitlines()[0] if useful else type(error).__name__


@contextlib.contextmanager
def atomic_folder(path: Path, swap: bool = False) -> Iterator[Path]:
    """Yield a staging folder next to `path`; once the block has written it, its files are
    flushed to disk and moved into place. An error leaves `path` as it was. An existing
    `path` keeps its other files (a run folder's logs), or with `swap` is replaced whole
    (a training checkpoint, which must never mix two saves). A failed write (permission,
    read-only or full disk) raises a StorageError naming `path`."""
    with storage("write", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    try:
        yield staging
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _move_into_place(staging, path, swap)
    except Exception as e:  # writers hide ENOSPC in their own exceptions
        err = write_error(e, path)
        if err is e:
            raise
        raise err from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, path: Path, swap: bool) -> None:
    """A new folder is renamed in one step; so is a swapped one (the old one is renamed
    aside first, then dropped). Otherwise each fully written file is renamed over the old."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder: choose another path")
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}" if swap else None
    if old is not None and path.exists():
        path.rename(old)
    if not path.exists():
        staging.rename(path)
    else:
        for f in sorted(staging.iterdir(), key=lambda f: f.name == CONFIG):  # config last
            os.replace(f, path / f.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_folder(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway leaves no half-deleted one: it is
    renamed to a hidden name first (removed by `clean_staging` if the kill comes then)."""
    doomed = path.parent / f".{path.name}.del-{uuid.uuid4().hex[:8]}"
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_staging(parent: Path, name: str | None = None) -> list[Path]:
    """Remove what a killed save left in `parent` (for folder `name` only, if given): staging
    folders, half-deleted folders, and the replaced copy of a swapped folder (put back when
    the kill came between the two renames). Returns what it removed."""
    pattern = re.compile(r"\.(.+)\.(tmp|old|del)-[0-9a-f]{8}")
    removed = []
    for p in sorted(parent.iterdir()) if parent.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or (name is not None and m.group(1) != name):
            continue
        target = parent / m.group(1)
        if m.group(2) == "old" and not target.exists():
            p.rename(target)  # the complete previous copy: the new one never arrived
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        log.warning("removed %d folder(s) left by an interrupted save: %s", len(removed),
                    ", ".join(str(p) for p in removed))
    return removed


def _open_error(file: Path, e: Exception) -> CheckpointError | StorageError:
    """A file that cannot be opened: the operating system's fault (permission, I/O) or the
    file's (truncated, corrupted)."""
    if isinstance(e, OSError) and e.errno is not None:
        return storage_error(e, "read", file)
    return CheckpointError(
        f"{file} is not a readable safetensors file ({e}); it is probably truncated or "
        "corrupted: copy or download it again, or re-save it from the source model")


def read_metadata(file: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (its header only; no tensor is read)."""
    file = Path(file)
    if not file.exists():
        raise CheckpointError(f"{file} does not exist: the checkpoint has no weights file")
    try:
        with safe_open(file, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _open_error(file, e) from e


def read_tensors(file: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a safetensors file and its metadata, with clear errors for truncated or
    corrupted files (and a checksum check for files lmkit wrote)."""
    file = Path(file)
    if not file.exists():
        raise CheckpointError(f"{file} does not exist: the checkpoint has no weights file")
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _open_error(file, e) from e
    if verify and "lmkit.crc32" in meta and _crc(tensors) != meta["lmkit.crc32"]:
        raise CheckpointError(
            f"{file} is corrupted: its tensor data does not match the checksum written when it "
            "was saved; copy it again or re-save it from the source model")
    return tensors, meta


def check_layers(config: ModelConfig, names: Any, where: Any,
                 templates: dict[str, tuple[str, ...]] = LAYER_NAMES) -> None:
    """The config's layer counts against the layer indices in the tensor names, before a
    model is built (a config claiming 10^9 layers must not make the loader build them).
    `templates` gives each stack's layer-indexed names with `{i}` for the index."""
    for stack, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        if not templates.get(stack):
            continue
        regex = re.compile("|".join(re.escape(t).replace(r"\{i\}", r"(\d+)")
                                    for t in templates[stack]))
        found = set()
        for name in names:
            if m := regex.match(name):
                found.add(int(next(g for g in m.groups() if g is not None)))
        if len(found) != layers or (found and max(found) != layers - 1):
            raise CheckpointError(
                f"{where}: the config gives the {stack} {layers} layers but the weights hold "
                f"{len(found)}: the config does not belong to these weights (or one of them "
                "is damaged); use the matching config.json")


def check_tensors(model: Model, tensors: dict[str, torch.Tensor], *,
                  new: tuple[str, ...] = ()) -> list[str]:
    """Compare names, shapes and dtypes with what `model` expects. Names under the prefixes
    `new` may be missing (a new head). Raises one CheckpointError listing every problem;
    returns the names that will be freshly initialised."""
    expected = {k: v for k, v in model.state_dict().items() if k not in model.tied_names()}
    is_new = lambda name: name.startswith(new) if new else False  # noqa: E731
    missing = [k for k in expected if k not in tensors and not is_new(k)]
    unexpected = [k for k in tensors if k not in expected and not is_new(k)]
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    dtypes = [f"{k}: {tensors[k].dtype}" for k in expected
              if k in tensors and not tensors[k].is_floating_point()]
    problems = [f"{title} ({len(items)}): {', '.join(items[:20])}" +
                (f" … and {len(items) - 20} more" if len(items) > 20 else "")
                for title, items in [("missing tensors", missing), ("unexpected tensors",
                                     unexpected), ("shape mismatches", shapes),
                                     ("non-float tensors", dtypes)] if items]
    if problems:
        raise CheckpointError(
            "the weights do not fit the architecture in config.json:\n  " + "\n  ".join(problems)
            + "\nCheck that config.json belongs to these weights; to put a new task head on a "
              "pretrained body, load with head=... (and label_names=...).")
    return sorted(k for k in expected if k not in tensors)
