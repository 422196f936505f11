"""Training checkpoints: `out_dir/checkpoints/step-N/` holds the model as a checkpoint folder
(config.json + model.safetensors + tokenizer.json, loadable by `lmkit.load`) and
`trainer_state.pt`: optimizer, scheduler, step, compute totals and, per process, the random
states (torch, CUDA, numpy, python) and the data position (with the objective's generator).

A checkpoint is written under a temporary name and renamed into place, so `step-N` folders
are always complete; only the last `keep` are kept. `trainer_state.pt` holds tensors and
plain Python values only and is read with `torch.load(weights_only=True)`."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmkit.checkpoint import atomic_folder, check_tensors, read_tensors, save
from lmkit.errors import CheckpointError, reading
from lmkit.train.distributed import DistEnv, barrier, gather_objects

CHECKPOINTS, STATE = "checkpoints", "trainer_state.pt"
STEP_DIR = re.compile(r"step-(\d+)")


def rng_state() -> dict[str, Any]:
    """This process's random states (torch, CUDA, numpy, python) as plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = Path(out_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_DIR.fullmatch(p.name)) and (p / STATE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, data: Any,
                    env: DistEnv, keep: int = 3, extra: dict[str, Any] | None = None
                    ) -> Path:
    """Write `out_dir/checkpoints/step-{step}` atomically (rank 0; every rank must call it,
    since each contributes its random and data state). Keeps the last `keep` checkpoints
    (0 = all)."""
    mine = {"rng": rng_state(),
            "data": data.state_dict() if hasattr(data, "state_dict") else None}
    ranks = gather_objects(mine, env)
    folder = Path(out_dir) / CHECKPOINTS
    final = folder / f"step-{step}"
    if env.is_main:
        with atomic_folder(final, swap=True) as staging:  # the same step again: swapped
            save(model, staging)
            state = {"step": step, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "world_size": env.world_size,
                     "ranks": ranks, **(extra or {})}
            torch.save(state, staging / STATE)
        if keep > 0:
            for stale in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    barrier(env)
    return final


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy a checkpoint folder's weights into `model` in place (its parameters stay the
    same objects)."""
    tensors, _ = read_tensors(Path(folder) / "model.safetensors")
    check_tensors(model, tensors)
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, data: Any, env: DistEnv) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote into the given objects; returns the raw
    trainer state (step, compute totals, ...)."""
    folder = Path(folder)
    if not (folder / STATE).exists():
        raise CheckpointError(f"{folder} is not a training checkpoint (no {STATE}): give a "
                              "checkpoints/step-N folder or the run folder")
    with _reading(folder / STATE):
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        if state["world_size"] != env.world_size:
            raise ValueError(
                f"{folder} was written by {state['world_size']} process(es) but this run has "
                f"{env.world_size}: resume with the same number of processes (torchrun "
                f"--nproc_per_node {state['world_size']}) so every data shard continues "
                "exactly")
    load_weights(model, folder)
    with _reading(folder / STATE):
        return _restore(state, optimizer, scheduler, data, env)


def _reading(file: Path) -> contextlib.AbstractContextManager:
    """torch.load's errors (a damaged zip, a refused pickle) and a state of the wrong
    structure (KeyError, TypeError, ...) become a CheckpointError naming the file."""
    return reading(file, CheckpointError, "training state", "it is damaged or was not "
                   "written by lmkit: resume from an earlier checkpoints/step-N folder "
                   "(delete this one)")


def _restore(state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
             data: Any, env: DistEnv) -> dict[str, Any]:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    mine = state["ranks"][env.rank]
    set_rng_state(mine["rng"])
    if mine["data"] is not None:
        if not hasattr(data, "load_state_dict"):
            raise ValueError("the checkpoint holds a data position but the batches given have "
                             "no load_state_dict(): pass a resumable stream (BatchStream)")
        data.load_state_dict(mine["data"])
    return state
