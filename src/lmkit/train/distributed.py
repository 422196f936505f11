"""Data-parallel training under `torchrun`: the same command runs on 1 or N processes.

`torchrun --nproc_per_node N ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `init_distributed`
reads them and joins the process group (gloo on CPU, nccl on GPU). Without them everything
here is a no-op for one process. Only rank 0 writes files and prints.

`parallelism` picks how the processes share the model: "ddp" (DistributedDataParallel:
each holds it whole, gradients are all-reduced) or "fsdp" (FSDP2's `fully_shard`, per block
and at the root: each holds a 1/N shard of the parameters, gradients and optimizer state,
gathering a block's parameters only while it computes), for models that do not fit one
device. Under FSDP the parameters are DTensors: `is_sharded` tells the rest of lmkit so.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmkit.device import resolve_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun set them; (0, 1, 0) for a plain process.
    Usable before the process group exists (to shard data, say)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); idempotent."""
    rank, world, local_rank = launch_ranks()
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, dev)


PARALLELISM = ("ddp", "fsdp")


def wrap_model(model: nn.Module, env: DistEnv, parallelism: str = "ddp") -> nn.Module:
    """With several processes: the model wrapped in DistributedDataParallel ("ddp"), or
    sharded in place by FSDP2 ("fsdp": each block, then the root, which keeps the embeddings,
    the head and a tied weight in one unit). Build the optimizer after this: sharding
    replaces the parameters."""
    if not env.distributed:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for _, block in model.blocks():
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP shards (DTensors), not whole tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def grad_sync(net: nn.Module, env: DistEnv, last: bool) -> contextlib.AbstractContextManager:
    """The context of a micro-batch's backward: DDP all-reduces the gradients only in the
    last one. FSDP reduce-scatters every one, so that gradients stay sharded between
    micro-batches (skipping it would hold the whole model's gradients on each process)."""
    if env.distributed and not last and hasattr(net, "no_sync"):
        return net.no_sync()
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's tensors gathered whole onto rank 0's CPU (an empty dict on the
    other ranks); None for a model that holds them whole. Collective under FSDP."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unwrap(model), options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (every rank holds them) into a sharded model: each rank keeps its
    shard. A tied weight may be left out (it is loaded through the tensor it shares)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(unwrap(model), tensors, options=StateDictOptions(
        full_state_dict=True, strict=False))


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum `t` over all processes (in place; returned for convenience)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every process's `obj`, in rank order (on every rank)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()
