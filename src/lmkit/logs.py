"""lmkit's messages (warnings, the start-up summary) through the standard `logging` module.

Every module logs to the "lmkit" logger. `setup_logging` (called by the CLI and by the
training entry points) gives that logger a handler when the program has not configured
logging itself, so a plain `python script.py` shows the messages too; once the program
configures logging (a handler on the root logger, or pytest's capture), the handler stays
silent and the records go where the program sends them.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

log = logging.getLogger("lmkit")


class _Handler(logging.Handler):
    """Writes through `tqdm.write` (a progress bar stays intact), to the current stderr,
    only while the root logger has no handler of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # the program configured logging: it decides
            return
        try:
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            tqdm.write(f"[lmkit] {level}{self.format(record)}", file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging's own contract: never raise)
            self.handleError(record)


def setup_logging() -> None:
    """Show lmkit's INFO and WARNING messages on stderr as `[lmkit] ...` lines, unless the
    program has configured logging (then nothing changes). Idempotent."""
    if any(isinstance(h, _Handler) for h in log.handlers) or logging.getLogger().handlers:
        return
    log.addHandler(_Handler())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
