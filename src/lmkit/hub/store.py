"""The registry: a content-addressed store of checkpoint folders on any fsspec file system.

Layout under the registry URL (a local folder, file://, memory://, s3://, gs://, hf://...):

    blobs/sha256/<2 hex>/<sha256>                 file contents, stored once
    models/<owner>/<name>/revisions/<id>.json     immutable manifests; id = sha256 of the bytes
    models/<owner>/<name>/tags/<tag>              movable pointer: a revision id
    models/<owner>/<name>/.lock                   (local file systems) serialises tag updates

A push writes the blobs, then the manifest, then the tag, each under a temporary name moved
into place, so a reader never sees a revision whose blobs are missing nor a tag naming a
missing manifest: an interrupted push leaves only unreferenced temporary files. On a local file
system the manifest and tag are written under an exclusive `flock` of the model's lock file
(released by the kernel if the process dies), so concurrent pushers are serialised: each
revision's parent is the one the tag named just before it. Other file systems have no lock:
each object is still written then moved (a single atomic PUT on object stores), so nothing is
half-visible, but two pushers racing on one tag both succeed and the last one wins the tag.

A pull verifies every file's size and sha256 while writing it into a staging folder, which is
renamed into place only when complete: a corrupt or truncated blob raises a CheckpointError and
nothing is left to load.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fsspec
import yaml

from lmkit.errors import CheckpointError, RegistryError, storage
from lmkit.hub.names import DEFAULT_TAG, Ref, check_file_path, check_tag, is_revision_prefix, parse
from lmkit.textfiles import split_card

REGISTRY_ENV, CACHE_ENV = "LMKIT_REGISTRY", "LMKIT_CACHE"
FORMAT = "lmkit-revision/1"
CHUNK = 1 << 20
SKIP = ("checkpoints",)  # top-level folders a push leaves out (see `scan`)
SMALL = 1 << 20  # README.md / config.json read for a card: at most this
# What a card summary keeps of a README's front matter and of config.json.
CARD_KEYS = ("license", "language", "library_name", "library", "pipeline_tag", "task",
             "base_model", "tags", "datasets")
CONFIG_KEYS = ("model_type", "architectures", "family", "head", "hidden_size", "num_layers",
               "num_hidden_layers", "vocab_size")


def default_registry() -> str:
    """The registry URL: $LMKIT_REGISTRY, else ~/.cache/lmkit/registry."""
    return os.environ.get(REGISTRY_ENV) or str(Path.home() / ".cache" / "lmkit" / "registry")


def default_cache() -> Path:
    """Where pulled revisions are kept: $LMKIT_CACHE, else ~/.cache/lmkit/models."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmkit" / "models")


def canonical(manifest: dict) -> bytes:
    """The bytes a manifest is stored as, and hashed for its id: one spelling per content."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _lmkit_version() -> str:
    try:
        return version("lmkit")
    except PackageNotFoundError:
        return "unknown"


def _hash(file: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with storage("read", file), open(file, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _chunks_checked(file: Path, sha: str) -> Iterator[bytes]:
    """The bytes of `file`, failing at the end if they are not the ones hashed before (the
    file changed during the push): the blob is then never moved into place."""
    h = hashlib.sha256()
    with storage("read", file), open(file, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            yield chunk
    if h.hexdigest() != sha:
        raise RegistryError(f"{file} changed while it was being pushed: push again")


def scan(path: str | Path) -> dict[str, Path]:
    """The files a push stores: `path` itself (a .gguf file, say) or every file under the
    folder `path`, by relative POSIX path. Left out: hidden files and folders (staging
    leftovers, .git) and a run's `checkpoints/` (training states for resuming the run, not
    part of the model)."""
    path = Path(path)
    if path.is_file():
        return {path.name: path}
    if not path.is_dir():
        raise RegistryError(f"nothing to push at {path}: give a checkpoint folder or file")
    files = {}
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path)
        if file.is_file() and rel.parts[0] not in SKIP and \
                not any(p.startswith(".") for p in rel.parts):
            files[check_file_path(rel.as_posix(), str(path))] = file
    if not files:
        raise RegistryError(f"{path} holds no files to push")
    return files


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card (README.md), or {} if it has none or it does not
    parse: a card is informative, never a reason to refuse a checkpoint."""
    try:
        return split_card(text)[0]
    except yaml.YAMLError:
        return {}


def _small(value: Any) -> Any:
    """A card value cut to a summary's size: lists to 10 items, strings to 200 characters."""
    if isinstance(value, list):
        return [_small(v) for v in value[:10]]
    if isinstance(value, str):
        return value[:200]
    return value if isinstance(value, (int, float, bool)) or value is None else str(value)[:200]


def card_summary(read: Any) -> dict:
    """A few fields of a checkpoint's README.md front matter and config.json; `read(name)`
    returns a small file's text or None."""
    card = {}
    if (text := read("README.md")) is not None:
        matter = front_matter(text)
        card.update({k: _small(matter[k]) for k in CARD_KEYS if k in matter})
    if (text := read("config.json")) is not None:
        with contextlib.suppress(ValueError):
            config = json.loads(text)
            if isinstance(config, dict):
                card.update({k: _small(config[k]) for k in CONFIG_KEYS if k in config})
    return card


def read_small(folder: str | Path) -> Any:
    """`read(name)` for `card_summary` / `lineage`: the text of a small file in `folder`."""
    def read(name: str) -> str | None:
        file = Path(folder) / name
        if not file.is_file() or file.stat().st_size > SMALL:
            return None
        return file.read_text(errors="replace")
    return read


@dataclass(frozen=True)
class Pushed:
    """What a push made: the revision id the tag now names, and whether it is new (the same
    files already under that tag make no new revision)."""

    name: str
    revision: str
    tag: str
    new: bool
    registry: str


@dataclass(frozen=True)
class Pulled:
    """A pulled revision: the local folder holding its verified files."""

    path: Path
    name: str
    revision: str
    registry: str


class Registry:
    """One registry at `url` (default: `default_registry()`), any fsspec URL."""

    def __init__(self, url: str | os.PathLike | None = None):
        url = str(url or default_registry())
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") or "/"
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))
        self.url = self.root if self.local and "://" not in url else url  # absolute

    # paths
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def blob(self, sha: str) -> str:
        return self._path("blobs", "sha256", sha[:2], sha)

    def _model(self, ref: Ref, *parts: str) -> str:
        return self._path("models", ref.owner, ref.name, *parts)

    # storage primitives
    def _put(self, dest: str, chunks: Iterable[bytes]) -> None:
        """Write `chunks` to `dest` under a temporary name, then move it into place in one step
        (os.replace locally, the file system's move elsewhere): `dest` is whole or absent."""
        folder, name = dest.rsplit("/", 1)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        with storage("write", dest):
            try:
                if self.local:
                    os.makedirs(folder, exist_ok=True)
                    with open(tmp, "wb") as f:
                        for chunk in chunks:
                            f.write(chunk)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, dest)
                else:
                    with self.fs.open(tmp, "wb") as f:
                        for chunk in chunks:
                            f.write(chunk)
                    self.fs.mv(tmp, dest)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(tmp)
                raise

    def _cat(self, path: str) -> bytes:
        with storage("read", path):
            return self.fs.cat_file(path)

    def _names(self, folder: str) -> list[str]:
        """Names in `folder` (none if it does not exist), hidden ones left out."""
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if not n.startswith("."))

    @contextlib.contextmanager
    def _locked(self, ref: Ref) -> Iterator[None]:
        """Exclusive access to a model's tags (local file systems: flock on its lock file,
        dropped by the kernel when the holder dies; elsewhere no lock, see the module doc)."""
        if not self.local:
            yield
            return
        import fcntl

        lock = self._model(ref, ".lock")
        with storage("write", lock):
            os.makedirs(os.path.dirname(lock), exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # reading
    def has(self, ref: Ref) -> bool:
        """True when the registry holds any revision of `ref`'s model."""
        return bool(self._names(self._model(ref, "revisions")))

    def tags(self, ref: Ref) -> dict[str, str]:
        """Tag -> revision id."""
        folder = self._model(ref, "tags")
        return {t: self._cat(f"{folder}/{t}").decode().strip() for t in self._names(folder)}

    def revisions(self, ref: Ref) -> list[str]:
        return [n[:-5] for n in self._names(self._model(ref, "revisions")) if n.endswith(".json")]

    def manifest(self, ref: Ref, revision: str) -> dict:
        """The manifest of `revision`, checked against its id (the sha256 of its bytes)."""
        path = self._model(ref, "revisions", f"{revision}.json")
        try:
            data = self._cat(path)
        except FileNotFoundError:
            raise RegistryError(f"{ref.repo} has no revision {revision} in {self.url}") from None
        if hashlib.sha256(data).hexdigest() != revision:
            raise CheckpointError(f"{self.url}: the manifest of {ref.repo}@{revision[:12]} "
                                  f"({path}) does not match its id: it is corrupted; push the "
                                  "checkpoint again")
        where = f"{ref.repo}@{revision[:12]} ({path})"
        try:
            manifest = json.loads(data)
            files = manifest["files"]
            ok = isinstance(manifest["card"], dict) and all(
                isinstance(e["size"], int) and is_revision_prefix(e["sha256"])
                and len(e["sha256"]) == 64 for e in files.values())
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise CheckpointError(f"{where} is not an lmkit revision manifest ({FORMAT}): push "
                                  "the checkpoint again")
        for rel in files:
            check_file_path(rel, where)
        return manifest

    def resolve(self, ref: Ref) -> str:
        """The revision id `ref` names: its tag (default `main`), else a unique id prefix."""
        wanted = ref.revision or DEFAULT_TAG
        if not self.has(ref):
            raise RegistryError(f"the registry {self.url} has no model {ref.repo}: publish it "
                                f"with `lmkit push FOLDER {ref.repo}` (see `lmkit list`)")
        tags = self.tags(ref)
        if wanted in tags:
            return tags[wanted]
        matches = [r for r in self.revisions(ref) if r.startswith(wanted)] \
            if is_revision_prefix(wanted) else []
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise RegistryError(f"{ref} is ambiguous: {len(matches)} revisions start with "
                                f"{wanted!r} ({', '.join(m[:12] for m in matches[:5])}): give "
                                "more characters of the id")
        known = ", ".join(sorted(tags)) or "none"
        raise RegistryError(f"{ref.repo} in {self.url} has no tag or revision {wanted!r} (tags: "
                            f"{known}): see `lmkit info {ref.repo}`")

    def read_file(self, ref: Ref, manifest: dict, rel: str, limit: int = SMALL) -> bytes | None:
        """A small file of a revision (verified), or None if it has no such file or it is
        larger than `limit`."""
        entry = manifest["files"].get(rel)
        if entry is None or entry["size"] > limit:
            return None
        data = self._cat(self.blob(entry["sha256"]))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(self._corrupt(ref, rel, entry, "its contents differ"))
        return data

    def _corrupt(self, ref: Ref, rel: str, entry: dict, what: str) -> str:
        return (f"{ref.repo}: {rel} is corrupted in the registry {self.url} ({what}; expected "
                f"{entry['size']:,} bytes with sha256 {entry['sha256']}): it was not loaded; "
                "push the checkpoint again")

    # writing
    def push(self, path: str | Path, name: str, tag: str = DEFAULT_TAG, message: str = ""
             ) -> Pushed:
        """Store the folder (or file) `path` as a new revision of `name` and point `tag` at
        it (and `main` too if the model has no `main` yet); its parent is the revision `tag`
        named (for a new tag: the one `main` names). The same files as that parent make no
        new revision: `tag` is pointed at the parent."""
        ref = parse(name)
        if ref.revision:
            raise RegistryError(f"push {ref.repo} without '@{ref.revision}': a revision id "
                                "comes from the files; choose the tag with --tag")
        check_tag(tag)
        files = scan(path)
        entries = {}
        for rel, file in files.items():
            sha, size = _hash(file)
            entries[rel] = {"sha256": sha, "size": size}
            if not self._has_blob(sha, size):
                self._put(self.blob(sha), _chunks_checked(file, sha))
        card = card_summary(read_small(path) if Path(path).is_dir() else lambda _: None)
        with self._locked(ref):
            tags = self.tags(ref)
            parent = tags.get(tag) or tags.get(DEFAULT_TAG)  # a new tag starts from main
            if parent is not None and self.manifest(ref, parent)["files"] == entries:
                if tags.get(tag) != parent:  # the same files under a new tag: tag them
                    self._set_tag(ref, tag, parent)
                return Pushed(ref.repo, parent, tag, False, self.url)
            manifest = {"format": FORMAT, "name": ref.repo, "parent": parent,
                        "created": datetime.now(UTC).isoformat(timespec="microseconds"),
                        "lmkit": _lmkit_version(), "message": message, "card": card,
                        "files": entries}
            data = canonical(manifest)
            revision = hashlib.sha256(data).hexdigest()
            self._put(self._model(ref, "revisions", f"{revision}.json"), [data])
            self._set_tag(ref, tag, revision)
            if DEFAULT_TAG not in tags:  # a model's first push also makes its default tag
                self._set_tag(ref, DEFAULT_TAG, revision)
        return Pushed(ref.repo, revision, tag, True, self.url)

    def _set_tag(self, ref: Ref, tag: str, revision: str) -> None:
        """Point `tag` at `revision` (whose manifest is written): one atomic replace."""
        self._put(self._model(ref, "tags", tag), [f"{revision}\n".encode()])

    def _has_blob(self, sha: str, size: int) -> bool:
        try:
            return self.fs.size(self.blob(sha)) == size  # a wrong size is rewritten
        except FileNotFoundError:
            return False

    def pull(self, name: str, dest: str | Path | None = None) -> Pulled:
        """The files of `name` (``owner/name[@rev]``), verified, in a local folder: `dest`
        (which must not exist), or the cache folder of the revision (reused once complete)."""
        ref = parse(name)
        revision = self.resolve(ref)
        manifest = self.manifest(ref, revision)
        if dest is None:
            target = default_cache() / ref.owner / ref.name / revision
            if target.is_dir():  # complete: a cache folder appears only in one rename
                return Pulled(target, ref.repo, revision, self.url)
        else:
            target = Path(dest)
            if target.exists():
                raise RegistryError(f"{target} already exists: choose another destination or "
                                    "delete it first")
        self._materialise(ref, manifest, target)
        return Pulled(target, ref.repo, revision, self.url)

    def _materialise(self, ref: Ref, manifest: dict, target: Path) -> None:
        """Write the revision's files into a staging folder next to `target`, verifying each,
        then rename it to `target` in one step."""
        with storage("write", target):
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
        try:
            for rel, entry in sorted(manifest["files"].items()):
                self._copy_blob(ref, rel, entry, staging / rel)
            with storage("write", target):
                try:
                    staging.rename(target)
                except OSError:
                    if not target.is_dir():  # else another pull got there first: same files
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _copy_blob(self, ref: Ref, rel: str, entry: dict, out: Path) -> None:
        h, size = hashlib.sha256(), 0
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            src = self.fs.open(self.blob(entry["sha256"]), "rb")
        except FileNotFoundError:
            raise CheckpointError(self._corrupt(ref, rel, entry, "its blob is missing")) from None
        with src, storage("write", out), open(out, "wb") as f:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "too long"
            raise CheckpointError(self._corrupt(ref, rel, entry, f"{what}: {size:,} bytes"))
        if h.hexdigest() != entry["sha256"]:
            raise CheckpointError(self._corrupt(ref, rel, entry,
                                                f"its sha256 is {h.hexdigest()}"))

    # listing
    def list_models(self, pattern: str = "*") -> list[dict]:
        """The models whose ``owner/name`` matches the glob `pattern`: name, tags, revisions."""
        out = []
        for owner in self._names(self._path("models")):
            for name in self._names(self._path("models", owner)):
                ref = Ref(owner, name)
                if fnmatch.fnmatchcase(ref.repo, pattern) and self.has(ref):
                    out.append({"name": ref.repo, "tags": self.tags(ref),
                                "revisions": len(self.revisions(ref))})
        return out

    def info(self, name: str) -> dict:
        """What the registry knows of `name`: the revision it resolves to (manifest, card,
        lineage record if the checkpoint has one), every revision with its date, size and tags,
        and the chain of parents back to the first push."""
        ref = parse(name)
        revision = self.resolve(ref)
        manifest = self.manifest(ref, revision)
        by_revision: dict[str, list[str]] = {}
        for tag, rev in self.tags(ref).items():
            by_revision.setdefault(rev, []).append(tag)
        manifests = {r: self.manifest(ref, r) for r in self.revisions(ref)}
        revisions = sorted(({"id": r, "created": m["created"], "message": m["message"],
                             "parent": m["parent"], "tags": by_revision.get(r, []),
                             "files": len(m["files"]),
                             "size": sum(e["size"] for e in m["files"].values())}
                            for r, m in manifests.items()), key=lambda r: r["created"])
        chain, parent = [], manifest["parent"]
        while parent and parent in manifests and parent not in chain:
            chain.append(parent)
            parent = manifests[parent]["parent"]
        return {"name": ref.repo, "registry": self.url, "revision": revision,
                "manifest": manifest, "revisions": revisions, "parents": chain,
                "lineage": self._lineage(ref, manifest)}

    def _lineage(self, ref: Ref, manifest: dict) -> Any:
        def read(rel: str) -> str | None:
            data = self.read_file(ref, manifest, rel)
            return None if data is None else data.decode(errors="replace")
        return lineage(read)


def lineage(read: Any) -> Any:
    """A checkpoint's lineage record (the `lineage` key of its model card's front matter), if
    it has one; `read(name)` returns a small file's text or None."""
    text = read("README.md")
    return front_matter(text).get("lineage") if text is not None else None
