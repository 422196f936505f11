"""Model names: ``owner/name[@revision]``, checked before they become paths in a registry or a
cache, so that no name can reach outside them (``..``, absolute paths, backslashes, control
characters are refused)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmkit.errors import RegistryError

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HEX = re.compile(r"[0-9a-f]{1,64}")
DEFAULT_TAG = "main"


@dataclass(frozen=True)
class Ref:
    """A parsed reference: `owner/name` and the revision asked for (a tag or a revision id
    prefix; None: the default tag)."""

    owner: str
    name: str
    revision: str | None = None

    @property
    def repo(self) -> str:
        return f"{self.owner}/{self.name}"

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def _problem(text: str, what: str) -> str | None:
    """Why `text` cannot be one part (owner, name, tag) of a name, or None."""
    if not text:
        return f"the {what} is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return f"the {what} holds a control character"
    if "\\" in text:
        return f"the {what} holds a backslash"
    if text in (".", ".."):
        return f"the {what} is {text!r}, a path step"
    if not _PART.fullmatch(text):
        return (f"the {what} {text!r} must start with a letter or digit and hold only letters, "
                "digits, '.', '_' and '-' (at most 96)")
    return None


def parse(ref: str) -> Ref:
    """``owner/name[@revision]`` as a Ref; anything else raises a RegistryError saying why."""
    ref = str(ref)
    base, _, revision = ref.partition("@")
    reason = None
    if ref.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", ref):
        reason = "it is an absolute path"
    elif ".." in base.split("/"):
        reason = "it holds a '..' path step"
    elif base.count("/") != 1:
        reason = "it needs exactly one '/' between owner and name"
    else:
        owner, name = base.split("/")
        reason = _problem(owner, "owner") or _problem(name, "name") or \
            (_problem(revision, "revision") if "@" in ref else None)
    if reason:
        raise RegistryError(f"{ref!r} is not a model name ({reason}): write owner/name, "
                            "owner/name@tag or owner/name@<revision id prefix>")
    return Ref(owner, name, revision or None)


def check_tag(tag: str) -> str:
    """`tag` if it can name a tag (as a name part; not a hexadecimal string, which would read
    as a revision id), else a RegistryError."""
    reason = _problem(tag, "tag")
    if reason is None and _HEX.fullmatch(tag):
        reason = "a hexadecimal tag would read as a revision id"
    if reason:
        raise RegistryError(f"tag {tag!r} cannot be used ({reason}): choose a name such as "
                            "'main' or 'v1'")
    return tag


def is_revision_prefix(text: str) -> bool:
    """True when `text` can be (a prefix of) a revision id: lowercase hexadecimal."""
    return bool(_HEX.fullmatch(text))


def check_file_path(path: str, where: str) -> str:
    """`path` if it is a safe relative file path inside a revision (``a/b.json``), else a
    RegistryError naming `where` it came from: a manifest is untrusted input, and its paths
    must not reach outside the folder they are written into."""
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts) or \
            any(ord(c) < 32 or ord(c) == 127 for c in path) or re.match(r"[A-Za-z]:", path):
        raise RegistryError(f"{where}: unsafe file path {path!r} (absolute, '..', empty "
                            "parts, backslashes or control characters): refused")
    return path
