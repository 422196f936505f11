"""Training checkpoints: `out_dir/checkpoints/step-N/` holds the model as a checkpoint folder
(config.json + model.safetensors + tokenizer.json, loadable by `lmkit.load`),
`trainer_state.pt`: optimizer, scheduler, step, micro-batches drawn, compute totals and, per
process, the random states (torch, CUDA, numpy, python) and the data position (with the
objective's generator), and `manifest.json`: the size and CRC32 of every other file.

Under FSDP (`parallelism: fsdp`) the checkpoint is sharded: instead of model.safetensors,
every rank writes its shards of the weights and of the optimizer tensors with
torch.distributed.checkpoint (`lmkit.sharded`), and trainer_state.pt keeps the rest (the
optimizer's parameter groups, ...). `lmkit.load` reads such a folder whole into one process.

A checkpoint is written under a temporary name and renamed into place, so `step-N` folders
are always complete (a sharded one too: all ranks write into rank 0's staging folder, which
it renames once they are done); only the last `keep` are kept. Before a resume uses one,
its manifest is checked, `trainer_state.pt` is read with `torch.load(weights_only=True)` and
its structure is checked against the live objects (every optimizer tensor has its
parameter's shape and dtype, step and data position are in range and agree with the folder
name): nothing reaches the optimizer unchecked. A damaged latest checkpoint makes the resume
fall back, with a warning, to the newest intact one."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmkit import sharded
from lmkit.checkpoint import (
    CONFIG,
    TOKENIZER,
    atomic_folder,
    check_tensors,
    read_pickle,
    read_tensors,
    remove_folder,
    save,
    verify_manifest,
    write_manifest,
    write_model_files,
)
from lmkit.config import ModelConfig
from lmkit.errors import CheckpointError, TokenizerError
from lmkit.textfiles import read_json
from lmkit.train.distributed import (
    DistEnv,
    barrier,
    broadcast_object,
    full_state_dict,
    gather_objects,
    is_sharded,
    load_full_state_dict,
    unwrap,
)

log = logging.getLogger("lmkit")

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
    """Write `out_dir/checkpoints/step-{step}` atomically. Every rank must call it: each
    contributes its random and data state and, when the model is sharded (FSDP), its
    shards. Keeps the last `keep` checkpoints (0 = all)."""
    mine = {"rng": rng_state(),
            "data": data.state_dict() if hasattr(data, "state_dict") else None}
    ranks = gather_objects(mine, env)
    final = Path(out_dir) / CHECKPOINTS / f"step-{step}"
    shards = is_sharded(model)
    with _staging(final, env) as staging:  # the same step again: swapped
        if shards:
            sharded.write(_shard_templates(model, optimizer)[0], staging)
        if env.is_main:
            if shards:
                write_model_files(unwrap(model), staging)
            else:
                save(model, staging)
            optim = optimizer.state_dict()
            state = {"step": step, "optimizer": {"param_groups": optim["param_groups"]}
                     if shards else optim, "sharded": shards,
                     "scheduler": scheduler.state_dict(), "world_size": env.world_size,
                     "ranks": ranks, **(extra or {})}
            torch.save(state, staging / STATE)
            write_manifest(staging)
    if env.is_main and keep > 0:
        for stale in list_checkpoints(out_dir)[:-keep]:
            remove_folder(stale)
    barrier(env)
    return final


@contextlib.contextmanager
def _staging(final: Path, env: DistEnv) -> Iterator[Path]:
    """Rank 0's atomic staging folder for `final`, on every rank (the ranks of a sharded
    save write into it); renamed into place once every rank is done."""
    with atomic_folder(final, swap=True) if env.is_main else contextlib.nullcontext() as mine:
        yield broadcast_object(mine, env)
        barrier(env)


def _shard_templates(model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """A sharded model's tensors as a sharded checkpoint holds them, {"model": weights
    (a tied weight once), "optim": {parameter name: its AdamW tensors}}, this rank's shards
    of the live tensors; and the parameter names in the optimizer's index order. (The
    optimizer's state is created first if no step has made it yet.)"""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model = unwrap(model)
    tied = model.tied_names()
    weights = {k: v for k, v in get_model_state_dict(model).items() if k not in tied}
    optim = get_optimizer_state_dict(model, optimizer)
    names = [name for group in optim["param_groups"] for name in group["params"]]
    return {"model": weights, "optim": optim["state"]}, names


def _read_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer
                 ) -> dict[int, dict[str, torch.Tensor]]:
    """Load a sharded checkpoint's weights into `model` (each rank its shards) and return
    its optimizer tensors by parameter index, as `optimizer.state_dict()` holds them, to be
    checked and loaded like those of a whole checkpoint. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    tensors, names = _shard_templates(model, optimizer)
    sharded.read_into(tensors, folder)
    set_model_state_dict(unwrap(model), tensors["model"],
                         options=StateDictOptions(strict=False))  # a tied weight: left out
    return {i: tensors["optim"][name] for i, name in enumerate(names)
            if name in tensors["optim"]}


def save_model(model: nn.Module, path: str | Path, env: DistEnv) -> None:
    """Write the model as a checkpoint folder at `path` (on rank 0). Every rank must call
    it: a sharded model's weights are gathered whole onto rank 0's CPU first."""
    whole = full_state_dict(model)
    if env.is_main:
        save(unwrap(model), path, state_dict=whole)


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy a checkpoint folder's weights into `model` in place (its parameters stay the
    same objects; a sharded model's ranks each keep their shards)."""
    tensors, _ = read_tensors(Path(folder) / "model.safetensors")
    check_tensors(unwrap(model), tensors)
    if is_sharded(model):
        load_full_state_dict(model, tensors)
        return
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)


def read_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, env: DistEnv) -> dict[str, Any]:
    """The trainer state of a checkpoint folder, verified (manifest checksums) and checked
    against the objects it will be loaded into. Raises CheckpointError when the folder is
    damaged, ValueError when it is intact but belongs to another setup."""
    folder = Path(folder)
    if not (folder / STATE).exists():
        raise CheckpointError(f"{folder} is not a training checkpoint (no {STATE}): give a "
                              "checkpoints/step-N folder or the run folder")
    verify_manifest(folder)
    state = read_pickle(folder / STATE, allow_pickle=True)  # lmkit's own, checksummed file
    shards = isinstance(state, dict) and state.get("sharded") is True
    if shards:  # the optimizer tensors are in the shards, checked below with the rest
        _check_setup(state, folder, model, env)
        groups = state["optimizer"].get("param_groups") \
            if isinstance(state.get("optimizer"), dict) else None
        state["optimizer"] = {"state": _read_shards(folder, model, optimizer),
                              "param_groups": groups}
    check_state(state, folder, optimizer, scheduler)
    if not shards:
        _check_setup(state, folder, model, env)
    return state


def _check_setup(state: dict[str, Any], folder: Path, model: nn.Module, env: DistEnv
                 ) -> None:
    """Raise ValueError (with the fix) unless the checkpoint was written by a run like this
    one: as many processes, the same parallelism, architecture and tokenizer."""
    world = state.get("world_size")
    if isinstance(world, int) and world != env.world_size:
        raise ValueError(
            f"{folder} was written by {world} process(es) but this run has "
            f"{env.world_size}: resume with the same number of processes (torchrun "
            f"--nproc_per_node {world}) so every data shard continues exactly")
    if (state.get("sharded") is True) != is_sharded(model):
        kind = ("fsdp", "ddp") if state.get("sharded") is True else ("ddp", "fsdp")
        raise ValueError(f"{folder} was written with parallelism {kind[0]} but this run uses "
                         f"{kind[1]}: resume with the run's own (--set parallelism={kind[0]})")
    saved = ModelConfig.from_json(folder / CONFIG).to_dict()
    live = model.config.to_dict()
    changed = [f"{k} (checkpoint {saved[k]!r}, model {live[k]!r})" for k in saved
               if saved[k] != live[k] and k not in ("dropout", "attention_dropout",
                                                             "activation_dropout")]
    if changed:
        raise ValueError(f"{folder} holds another architecture than the model being trained: "
                         f"{'; '.join(changed)}. Resume with the run's own config")
    tok = getattr(model, "tokenizer", None)
    if tok is not None and (folder / TOKENIZER).is_file() and \
            json.loads(tok.backend.to_str()) != read_json(folder / TOKENIZER, "tokenizer",
                                                           TokenizerError):
        raise ValueError(f"the tokenizer of the model being trained differs from the one saved "
                         f"in {folder}: resume with the run's own tokenizer "
                         f"({folder / TOKENIZER})")


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, data: Any, env: DistEnv) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote into the given objects, once `read_state`
    has checked it; returns the raw trainer state (step, compute totals, ...)."""
    folder = Path(folder)
    state = read_state(folder, model, optimizer, scheduler, env)
    if not state.get("sharded"):  # a sharded one's weights came with its optimizer state
        load_weights(model, folder)
    return _restore(state, folder, optimizer, scheduler, data, env)


def _restore(state: dict[str, Any], folder: Path, optimizer: torch.optim.Optimizer,
             scheduler: Any, data: Any, env: DistEnv) -> dict[str, Any]:
    """Load a state `read_state` has checked into the live objects."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    mine = state["ranks"][env.rank]
    set_rng_state(mine["rng"])
    if mine["data"] is not None:
        if not hasattr(data, "load_state_dict"):
            raise ValueError("the checkpoint holds a data position but the batches given have "
                             "no load_state_dict(): pass a resumable stream (BatchStream)")
        try:
            data.load_state_dict(mine["data"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{folder / STATE}: the data position does not fit this "
                                  f"data ({type(e).__name__}: {e})") from None
    return state


def resume_checkpoint(candidates: list[Path], model: nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler: Any, data: Any,
                      env: DistEnv) -> tuple[Path, dict[str, Any]]:
    """Load the newest intact checkpoint of `candidates` (oldest first): a damaged one is
    skipped with a warning, so a run resumes from the previous complete checkpoint. (Each
    load overwrites everything the previous attempt may have restored.)"""
    damaged: list[str] = []
    for folder in reversed(candidates):
        try:
            state = load_checkpoint(folder, model, optimizer, scheduler, data, env)
        except CheckpointError as e:
            damaged.append(f"{folder}: {e}")
            continue
        if damaged:
            log.warning("resuming from %s: newer checkpoint(s) cannot be used:\n  %s", folder,
                        "\n  ".join(damaged))
        return folder, state
    raise CheckpointError("no intact checkpoint to resume from:\n  " + "\n  ".join(damaged))


# ---- structure of a trainer state -----------------------------------------------------------


def check_state(state: Any, folder: Path, optimizer: torch.optim.Optimizer,
                scheduler: Any) -> None:
    """Raise CheckpointError unless `state` has the structure `save_checkpoint` writes and
    fits `optimizer` and `scheduler`: the same parameter groups, each optimizer tensor the
    shape and dtype of its parameter, finite numbers, a step that agrees with the folder name,
    the scheduler and the per-parameter steps, and data positions within range."""
    try:
        _check_state(state, folder, optimizer, scheduler)
    except _Bad as e:
        raise CheckpointError(f"{folder / STATE} is not a valid training state ({e}): it is "
                              "damaged or was not written for this model; resume from another "
                              "checkpoint") from None


class _Bad(Exception):
    pass


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Bad(what)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _amount(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value >= 0


def _check_compute(compute: Any) -> None:
    """Totals are finite non-negative numbers; each session segment a flat record of
    numbers, names and None (nothing that could smuggle in another structure)."""
    _need(isinstance(compute, dict), "compute totals")
    segments = compute.get("segments", [])
    _need(all(_amount(v) for k, v in compute.items() if k != "segments"), "compute totals")
    _need(isinstance(segments, list) and all(
        isinstance(seg, dict) and all(v is None or isinstance(v, str) or _amount(v)
                                      for v in seg.values()) for seg in segments),
          "compute segments")


def _check_state(state: Any, folder: Path, optimizer: torch.optim.Optimizer,
                 scheduler: Any) -> None:
    _need(isinstance(state, dict), "not a mapping")
    missing = {"step", "optimizer", "scheduler", "world_size", "ranks"} - set(state)
    _need(not missing, f"missing {sorted(missing)}")
    step = state["step"]
    _need(_count(step), f"step={step!r}")
    if m := STEP_DIR.fullmatch(folder.name):
        _need(int(m.group(1)) == step, f"step {step} in a folder named {folder.name}")
    _need(isinstance(state["world_size"], int) and state["world_size"] >= 1,
          f"world_size={state['world_size']!r}")
    _check_optimizer(state["optimizer"], optimizer, step)
    _like(state["scheduler"], scheduler.state_dict(), "scheduler")
    _need(state["scheduler"]["last_epoch"] == step,
          f"the scheduler is at step {state['scheduler']['last_epoch']}, the state at {step}")
    batches = state.get("batches")
    _need(batches is None or _count(batches), f"batches={batches!r}")
    if "compute" in state:
        _check_compute(state["compute"])
    ranks = state["ranks"]
    _need(isinstance(ranks, list) and len(ranks) == state["world_size"],
          "one entry per process in ranks")
    live_rng = rng_state()
    for i, rank in enumerate(ranks):
        _need(isinstance(rank, dict) and {"rng", "data"} <= set(rank), f"ranks[{i}]")
        rng = rank["rng"]
        _need(isinstance(rng, dict) and isinstance(rng.get("cuda"), list) and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rng["cuda"]),
            f"ranks[{i}].rng")
        _like({k: v for k, v in rng.items() if k != "cuda"},
              {k: v for k, v in live_rng.items() if k != "cuda"}, f"ranks[{i}].rng")
        data = rank["data"]
        _need(data is None or isinstance(data, dict), f"ranks[{i}].data")
        for key in ("epoch", "row", "index"):  # positions of lmkit's resumable streams
            if isinstance(data, dict) and key in data:
                _need(_count(data[key]), f"ranks[{i}].data.{key}={data[key]!r}")
        if isinstance(data, dict) and "epoch" in data and batches is not None:
            _need(data["epoch"] <= batches, f"data epoch {data['epoch']} after only "
                                            f"{batches} batches")


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer, step: int) -> None:
    """The saved optimizer state against the live optimizer: groups, hyperparameters and,
    per parameter, every state tensor (shape, dtype, finite; steps within the global step).
    The fused AdamW kernels index these tensors by the parameter's size unchecked."""
    live = optimizer.state_dict()
    _need(isinstance(saved, dict) and isinstance(saved.get("state"), dict),
          "optimizer state")
    _like(saved.get("param_groups"), live["param_groups"], "optimizer.param_groups")
    for g_saved, g_live in zip(saved["param_groups"], live["param_groups"], strict=True):
        _need(g_saved["params"] == g_live["params"], "optimizer parameter indices")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    amsgrad = any(g.get("amsgrad") for g in optimizer.param_groups)
    keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    steps = []
    for index, entry in saved["state"].items():
        _need(_count(index) and index < len(params), f"optimizer state for parameter {index!r}")
        _need(isinstance(entry, dict) and set(entry) == keys,
              f"optimizer state {index}: {entry if not isinstance(entry, dict) else sorted(entry)}")
        p = params[index]
        for key, t in entry.items():
            _need(isinstance(t, torch.Tensor), f"optimizer state {index}.{key} is not a tensor")
            if key == "step":
                _need(t.numel() == 1, f"optimizer state {index}.step")
                value = float(t.reshape(-1)[0])
                _need(0 <= value <= step and value.is_integer(),
                      f"optimizer state {index}.step={value} (global step {step})")
                steps.append(value)
                continue
            _need(t.shape == p.shape and t.dtype == p.dtype,
                  f"optimizer state {index}.{key}: {tuple(t.shape)} {t.dtype} for a parameter "
                  f"of {tuple(p.shape)} {p.dtype}")
            t = t.to_local() if hasattr(t, "to_local") else t  # FSDP: this rank's shard
            _need(bool(torch.isfinite(t).all()), f"optimizer state {index}.{key} is not finite")
            if key != "exp_avg":
                _need(bool((t >= 0).all()), f"optimizer state {index}.{key} is negative")
    _need(not steps or max(steps) == step,
          f"the optimizer took {max(steps, default=0):.0f} steps, the state says {step}")


def _like(saved: Any, live: Any, where: str) -> None:
    """`saved` has the structure of `live`: the same keys, lengths and kinds of values
    (numbers finite; tensors of the same shape and dtype); the values themselves may differ."""
    number = (int, float)
    if isinstance(live, dict):
        _need(isinstance(saved, dict) and set(saved) == set(live),
              f"{where}: keys {sorted(map(str, saved)) if isinstance(saved, dict) else saved!r}")
        for k in live:
            _like(saved[k], live[k], f"{where}.{k}")
    elif isinstance(live, (list, tuple)):
        _need(isinstance(saved, (list, tuple)) and len(saved) == len(live), f"{where}: length")
        for i, (a, b) in enumerate(zip(saved, live)):
            _like(a, b, f"{where}[{i}]")
    elif isinstance(live, torch.Tensor):
        _need(isinstance(saved, torch.Tensor) and saved.shape == live.shape and
              saved.dtype == live.dtype, f"{where}: tensor shape or dtype")
        _need(not saved.is_floating_point() or bool(torch.isfinite(saved).all()),
              f"{where}: not finite")
    elif isinstance(live, bool) or isinstance(saved, bool):
        _need(type(saved) is type(live), f"{where}={saved!r}")
    elif live is None or isinstance(live, number):  # None and numbers: gauss_next, initial_lr
        _need(saved is None or (isinstance(saved, number) and math.isfinite(saved)),
              f"{where}={saved!r}")
    else:
        _need(type(saved) is type(live), f"{where}={saved!r}")
