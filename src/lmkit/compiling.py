"""torch.compile with an eager fallback, for the training step (train/compiled.py) and the
decode step (generate.py): what a failed compilation raises, and the one warning it gives."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("lmkit")


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises: dynamo's and inductor's errors (a missing or
    failing C++ compiler is an InductorError), and the compiler's process failing to start."""
    import torch._dynamo.exc

    return (torch._dynamo.exc.TorchDynamoException, OSError)


def warn_failed(e: BaseException, work: str) -> None:
    """The one warning when compiling fails and `work` ("training") goes on eagerly."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    log.warning("compile: torch.compile could not compile the model (%s: %s); %s goes on "
                "without compiling (eager, the same results, slower). On CPU it needs a C++ "
                "compiler (g++ or clang)", type(e).__name__, first[:300], work)


def compiled_or_eager(compiled: Callable[..., Any], eager: Callable[..., Any], args: tuple,
                      work: str, fall_back: Callable[[], bool]) -> Any:
    """compiled(*args); if compiling fails, `fall_back()` undoes what the attempt left and
    makes the caller's later calls eager (or returns False where going on is unsafe: the
    error is raised), then one warning that `work` goes on eagerly, and eager(*args)."""
    try:
        return compiled(*args)
    except compile_errors() as e:
        if not fall_back():
            raise
        warn_failed(e, work)
        return eager(*args)
