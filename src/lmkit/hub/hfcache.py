"""The local Hugging Face cache (``models--owner--name/snapshots/<commit>/``), read with
huggingface_hub's own functions and local files only: nothing is ever downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmkit.hub.names import Ref


@dataclass(frozen=True)
class Cached:
    """A snapshot in the Hugging Face cache: its folder, repo id and commit."""

    path: Path
    repo: str
    commit: str


def hf_cache() -> Path:
    """The cache huggingface_hub uses, read from the environment now (its own constant is
    fixed at import): $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or
                                             Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def lookup(ref: Ref) -> Cached | None:
    """The snapshot of `ref` (its revision: a branch, tag or commit; default main) in the local
    Hugging Face cache, or None if it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache()
    if not (cache / f"models--{ref.owner}--{ref.name}").is_dir():
        return None  # not cached: no need to ask huggingface_hub
    try:
        folder = Path(snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache,
                                        local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    return Cached(folder, ref.repo, folder.name)
