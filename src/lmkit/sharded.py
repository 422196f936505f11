"""Sharded checkpoints: tensors written by every process of a run with
torch.distributed.checkpoint (DCP), read back by the processes of a run or whole into one.

A sharded folder holds DCP's files, `.metadata` (the index: every tensor's name, shape,
dtype and where its pieces are) and `__R_0.distcp` (the pieces rank R held), next to the
files of a checkpoint folder (config.json, tokenizer.json; `lmkit.train.state` adds the
trainer state and the manifest). Entries are named `<group>.<name>`: `model.tokens.weight`,
`optim.tokens.weight.exp_avg`.

Reading runs no pickled code: the index (a pickle) is read with an allowlist of DCP's own
metadata classes, tensors with torch.load(weights_only=True) (DCP's reader), and only tensor
entries are ever written or asked for (DCP unpickles other entries without that guard).
torch.distributed.checkpoint is imported when used: it takes seconds to import.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmkit.checkpoint import SHARDED_INDEX
from lmkit.errors import CheckpointError, storage_error

# (module, name) of every class DCP's index may name (torch 2.x); torch dtypes are allowed too
_INDEX_CLASSES = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def is_sharded(folder: str | Path) -> bool:
    """Whether `folder` holds a sharded (DCP) checkpoint."""
    return (Path(folder) / SHARDED_INDEX).is_file()


def read_index(folder: str | Path) -> Any:
    """The DCP index of a sharded folder (a `Metadata`), read without running code."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = Path(folder) / SHARDED_INDEX
    try:
        with open(file, "rb") as f:
            index = _IndexUnpickler(f).load()
    except Exception as e:  # bad bytes raise many kinds; only allowlisted classes ran
        if isinstance(e, OSError) and e.errno is not None:
            raise storage_error(e, "read", file) from e
        index = e
    if not isinstance(index, Metadata):
        raise CheckpointError(f"{file} is not a readable checkpoint index "
                              f"({str(index)[:200]}): the sharded checkpoint is damaged; "
                              "resume or load another one")
    return index


def _reader(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = read_index(folder)
            if getattr(index, "storage_meta", None) is None:  # as FileSystemReader does
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader(folder)


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield


def write(tensors: dict[str, dict[str, torch.Tensor]], folder: str | Path) -> None:
    """Write `{group: {name: tensor}}` (DTensor shards or whole tensors) into `folder`.
    Collective: every process of the group calls it with its own shards."""
    import torch.distributed.checkpoint as dcp

    with _one_process_is_fine():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(folder))


def read_into(tensors: dict[str, dict[str, torch.Tensor]], folder: str | Path,
              alone: bool = False) -> None:
    """Fill `{group: {name: tensor}}` in place from `folder`; each tensor (a DTensor shard or
    a whole tensor) receives its part. Collective unless `alone` (one process reads)."""
    import torch.distributed.checkpoint as dcp

    try:
        with _one_process_is_fine():
            dcp.load(tensors, storage_reader=_reader(Path(folder)), no_dist=alone)
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps what went wrong on any rank in its own errors
        raise CheckpointError(f"{folder}: the sharded checkpoint does not fit "
                              f"({type(e).__name__}: {str(e).strip()[:500]})") from None


def read_whole(folder: str | Path, group: str = "model") -> dict[str, torch.Tensor]:
    """The tensors of `group`, whole, in this process (no process group needed): what
    `lmkit.load` reads from a sharded training checkpoint."""
    folder = Path(folder)
    index = read_index(folder)
    entries = {key.removeprefix(f"{group}."): meta
               for key, meta in index.state_dict_metadata.items()
               if key.startswith(f"{group}.") and hasattr(meta, "chunks")}
    if not entries:
        raise CheckpointError(f"{folder / SHARDED_INDEX} lists no {group} tensors: it is not "
                              "a model checkpoint")
    on_disk = sum(f.stat().st_size for f in folder.glob("*.distcp"))
    claimed = 0
    for name, meta in entries.items():
        numel = meta.size.numel()
        covered = sum(c.sizes.numel() for c in meta.chunks)
        claimed += numel * meta.properties.dtype.itemsize
        if covered != numel:  # pieces missing: part of the tensor would be left unread
            raise CheckpointError(f"{folder / SHARDED_INDEX}: the pieces of {name} cover "
                                  f"{covered} of its {numel} values: the index is damaged")
    if claimed > on_disk:
        raise CheckpointError(f"{folder / SHARDED_INDEX} describes {claimed:,} bytes of tensors "
                              f"but its shard files hold {on_disk:,}: files are missing")
    tensors = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
               for name, meta in entries.items()}
    read_into({group: tensors}, folder, alone=True)
    return tensors
