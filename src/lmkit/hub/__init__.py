"""Sharing checkpoints: a registry of named, immutable revisions (`store`), model names
(`names`) and the local Hugging Face cache (`hfcache`).

    lmkit.push("runs/sst2", "me/minilm-sst2", tag="v1")     # -> Pushed(revision=...)
    lmkit.pull("me/minilm-sst2@v1")                         # -> Pulled(path=...)
    lmkit.load("me/minilm-sst2@v1")                         # pulled into the cache, loaded

The registry is any fsspec URL: a local folder (default ~/.cache/lmkit/registry, or
$LMKIT_REGISTRY), file://, memory://, or s3://, gs://, hf:// when their fsspec packages
(s3fs, gcsfs, huggingface_hub) are installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmkit.hub.hfcache import Cached, hf_cache, lookup
from lmkit.hub.names import DEFAULT_TAG, Ref, parse
from lmkit.hub.store import (
    Pulled,
    Pushed,
    Registry,
    card_summary,
    default_cache,
    default_registry,
    lineage,
    read_small,
)

__all__ = ["DEFAULT_TAG", "Cached", "Pulled", "Pushed", "Ref", "Registry", "card_summary",
           "default_cache", "default_registry", "hf_cache", "info", "lineage", "list_models",
           "lookup", "parse", "pull", "push", "read_small", "resolve"]


def push(path: str | Path, name: str, *, tag: str = DEFAULT_TAG, message: str = "",
         registry: str | os.PathLike | None = None) -> Pushed:
    """Publish the checkpoint folder (or file) `path` as a new revision of `name`
    (``owner/name``) and point `tag` at it; the same files as `tag`'s revision (for a new
    tag: `main`'s) make no new revision, they are tagged."""
    return Registry(registry).push(path, name, tag=tag, message=message)


def pull(name: str, dest: str | Path | None = None, *,
         registry: str | os.PathLike | None = None) -> Pulled:
    """Fetch ``owner/name[@tag|@revision]`` into `dest`, or the local cache (default
    ~/.cache/lmkit/models, or $LMKIT_CACHE); every file's sha256 is verified."""
    return Registry(registry).pull(name, dest)


def list_models(pattern: str = "*", *, registry: str | os.PathLike | None = None
                ) -> list[dict]:
    """The registry's models matching the glob `pattern` (``owner/*``, say)."""
    return Registry(registry).list_models(pattern)


def info(name: str, *, registry: str | os.PathLike | None = None) -> dict:
    """Card summary, revisions (dates, sizes, tags), parent chain and lineage of `name`."""
    return Registry(registry).info(name)


def resolve(ref: Ref, registry: str | os.PathLike | None = None) -> Pulled | None:
    """`ref` pulled into the local cache, or None when the registry has no model of that
    name (a missing tag or revision of a model it has is an error)."""
    store = Registry(registry)
    return store.pull(str(ref)) if store.has(ref) else None
