"""lmkit's error types: one per failure class, each message naming the file (``file:line:``
where there is a line) and the fix.

Bad input (a config, a checkpoint, a data file, a tokenizer) raises a ``ValueError``
subclass; a failed read or write at the operating-system level (permission, read-only or full
disk) raises :class:`StorageError`, an ``OSError``. Third-party failures (tokenizers, gguf,
yaml, torch.load) are translated where lmkit reads the file, so the caller sees one of these
types, and `lmkit.cli.main` prints each as one line (`--debug` shows the traceback).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class LmkitError(Exception):
    """Base of lmkit's errors; the message says what is wrong, where, and what to do."""


class ConfigError(LmkitError, ValueError):
    """A model config (config.json, a foreign config), a run config (YAML, --set) or an
    option value that cannot be used."""


class CheckpointError(LmkitError, ValueError):
    """A checkpoint folder or file (weights, GGUF, training state) that cannot be used as it
    is."""


class TokenizerError(LmkitError, ValueError):
    """A tokenizer file that cannot be read, or a tokenizer that cannot be built as asked."""


class DataError(LmkitError, ValueError):
    """Bad data (a task file, a training corpus); the message starts with ``file:line:``
    (or ``file:`` alone)."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


class StorageError(LmkitError, OSError):
    """Reading or writing a file failed at the operating-system level (permission, read-only
    file system, no space left); the message names the path, the reason and the fix."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ..." layout
        return str(self.args[0]) if self.args else ""


class RegistryError(LmkitError, ValueError):
    """A model name (``owner/name[@revision]``) that is malformed or not found, or a registry
    that cannot be used as it is."""


class TrainingDiverged(LmkitError, RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the step was not applied."""


class MissingExtra(LmkitError, ImportError):
    """A feature needs an optional package that is not installed; the message names the
    extra that brings it (``pip install 'lmkit[extra]'``)."""


def require(module: str, extra: str, feature: str = ""):
    """Import an optional dependency, or raise :class:`MissingExtra` naming the extra to
    install. ``feature`` says what needed it (e.g. "MLflow tracking")."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = f"{feature} needs" if feature else "this needs"
        raise MissingExtra(
            f"{what} the optional package {module.split('.')[0]!r}, which is not installed: "
            f"pip install 'lmkit[{extra}]' (or 'lmkit[all]')"
        ) from e


class TrainingInterrupted(KeyboardInterrupt):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint (`.checkpoint`)."""

    def __init__(self, message: str, checkpoint: os.PathLike):
        super().__init__(message)
        self.checkpoint = checkpoint


# What to do about the common OS errors, by errno.
_FIXES = {
    errno.EACCES: "permission denied: check the permissions or choose another path",
    errno.EPERM: "operation not permitted: check the permissions or choose another path",
    errno.EROFS: "read-only file system: choose a writable folder",
    errno.ENOSPC: "no space left on device: free some space or choose another folder",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another folder",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "is a folder, not a file: give a file",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def storage_error(e: OSError, action: str, path: str | os.PathLike | None = None
                  ) -> StorageError:
    """A StorageError for the OSError `e` raised while `action` ("write", "read") `path`
    (the path the user gave, rather than a staging file inside it)."""
    if isinstance(e, StorageError):
        return e
    where = path if path is not None else e.filename
    reason = _FIXES.get(e.errno) or e.strerror or str(e)
    err = StorageError(f"cannot {action} {where}: {reason}" if where is not None
                       else f"{action} failed: {reason}")
    err.errno, err.filename = e.errno, where
    return err


def write_error(e: BaseException, path: str | os.PathLike) -> BaseException:
    """The error to raise for `e`, raised while writing under `path`: a StorageError for an
    OSError or a full disk (whatever the writer called it), else `e` itself."""
    if isinstance(e, OSError):
        return storage_error(e, "write", path)
    if isinstance(e, Exception) and disk_full(e, path):
        err = StorageError(f"cannot write {path}: {_FIXES[errno.ENOSPC]}")
        err.errno, err.filename = errno.ENOSPC, str(path)
        return err
    return e


@contextlib.contextmanager
def storage(action: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn OSErrors raised inside the block into a StorageError naming `path`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise storage_error(e, action, path) from e


@contextlib.contextmanager
def reading(path: str | os.PathLike, error: type[LmkitError], what: str,
            fix: str = "it is truncated or corrupted: copy it again or re-save it"
            ) -> Iterator[None]:
    """The boundary around a third-party reader of `path` (tokenizers, gguf):
    its own exceptions (a bare Exception, IndexError, KeyError, ...) become `error` naming
    the file, `what` it should be and the fix; OSErrors a StorageError; lmkit's errors pass,
    named after the file if they do not name it yet."""
    try:
        yield
    except LmkitError as e:
        if str(path) not in str(e) and len(e.args) == 1:
            e.args = (f"{path}: {e}",)
        raise
    except OSError as e:
        raise storage_error(e, "read", path) from e
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        reason = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        raise error(f"{path} is not a readable {what} ({reason}); {fix}") from e


def disk_full(e: BaseException, path: str | os.PathLike) -> bool:
    """True when `e` (from a writer that hides the OSError, such as torch.save or
    safetensors) happened because the file system holding `path` is full."""
    if os.strerror(errno.ENOSPC) in str(e):  # safetensors: "... (os error 28)"
        return True
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)  # `path` itself may not exist yet
    try:  # torch.save: "unexpected pos 576 vs 534"; the file system is (nearly) full
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20
