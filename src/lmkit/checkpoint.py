"""Checkpoint folders: `config.json` + `model.safetensors` (+ `tokenizer.json`).

Saving is atomic: everything is written under a temporary name and renamed into place, so an
interrupted save never leaves a half-written checkpoint. Reading checks the file (and the
checksum lmkit wrote) and `check_tensors` every tensor's name, shape and dtype before anything
is used. This module knows files, not models: `lmkit.model.build` turns tensors into a Model
and `lmkit.loading` tells the checkpoint formats apart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:  # hints only: the model layer imports this module to save itself
    from lmkit.model import Model

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used as it is; the message says why and
    what to do."""


def _crc(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum over all tensor bytes, in name order, to detect corrupted data."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        crc = zlib.crc32(t.view(-1).view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


def save(model: Model, path: str | Path, tokenizer: Any = None,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as a checkpoint folder at `path` (created or replaced atomically).

    Tied weights are stored once. `tokenizer` (or the model's attached one) is saved as
    tokenizer.json. `extra_files` maps file names to text (a model card, say)."""
    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    tied = model.tied_names()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    with atomic_folder(path) as staging:
        meta = {"format": "pt", "lmkit.crc32": _crc(tensors)}
        save_file(tensors, staging / WEIGHTS, metadata=meta)
        model.config.to_json(staging / CONFIG)
        if tokenizer is not None:
            tokenizer.save(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return path


@contextlib.contextmanager
def atomic_folder(path: Path, swap: bool = False) -> Iterator[Path]:
    """Yield a staging folder next to `path`; once the block has written it, its files are
    flushed to disk and moved into place. An error leaves `path` as it was. An existing
    `path` keeps its other files (a run folder's logs), or with `swap` is replaced whole
    (a training checkpoint, which must never mix two saves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _move_into_place(staging, path, swap)
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
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({e}); it is probably truncated or "
            "corrupted: copy or download it again, or re-save it from the source model") from e
    if verify and "lmkit.crc32" in meta and _crc(tensors) != meta["lmkit.crc32"]:
        raise CheckpointError(
            f"{file} is corrupted: its tensor data does not match the checksum written when it "
            "was saved; copy it again or re-save it from the source model")
    return tensors, meta


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
