"""PyTorch's own distributed stack, set up from torchrun's environment: FSDP2, HSDP or DDP, gloo on CPU, NCCL on GPU.

Nothing here is TST-specific: the objective module (model + bag mean + multi-hot loss) is wrapped like any model,
so the bag mean runs inside the wrapped forward where FSDP2 has the embedding unsharded. The model arrives here as a
meta-device shell: FSDP2 shards the shell, and each rank then allocates and initialises only its shard.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import SuperposeError

_host_group: dist.ProcessGroup | None = None
"""A gloo group beside NCCL for host-side agreement (the stop flag); None: the default group is gloo already."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> DistInfo:
    """This process's place in the job, read once from torchrun's environment (one process outside torchrun)."""
    try:
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        if world == 1:
            return DistInfo()
        return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError):
        found = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        raise SuperposeError(f"torchrun environment is not integers: {found}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA without it is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SuperposeError(f"train.device: {name} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SuperposeError(f"train.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    global _host_group
    device = resolve_device(device_name)
    info = torchrun_env()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        _host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return info, device


def init_one_rank_group(device: torch.device) -> None:
    """A process group of this process alone, so FSDP2 applies on one GPU too (bf16 compute, fp32 master weights).

    Checkpoints of such a run are sharded (DCP) like those of a multi-rank run.
    """
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, device_id=device if device.type == "cuda" else None)


def shutdown() -> None:
    """Leave the process group once every rank is done with it.

    Gloo frees finished collectives on its worker threads, which need the GIL when a collective held Python-made
    tensors (DCP's and our all_gather_object). A group destroyed from Python (or from DDP's reducer) joins those
    threads while holding the GIL, so a free still pending then deadlocks the exit; the barrier and a short pause
    with the GIL released let them finish first.
    """
    global _host_group
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()
    _host_group = None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def sum_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks on the device it lives on (a collective, not a host-device sync)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def merge_across_ranks(part: dict[str, Any], info: DistInfo) -> dict[str, Any]:
    """Union of every rank's small dict (e.g. checksums of the files each rank hashed), on every rank."""
    if not info.enabled:
        return part
    parts: list[dict[str, Any]] = [{} for _ in range(info.world_size)]
    dist.all_gather_object(parts, part, group=_host_group)
    return {k: v for p in parts for k, v in p.items()}


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is true on any (so all ranks take the same branch, e.g. stop after this step).

    The flag travels between hosts over gloo, never through the GPU: agreeing costs a network round trip and no
    host-device sync, so the loop asks once every step.
    """
    if not info.enabled:
        return flag
    value = torch.tensor(int(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(value)


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM, found by class: the outermost modules of the classes the
    model keeps whole (``_no_split_modules``: LlamaDecoderLayer, GPT2Block, GPTNeoXLayer, ...), in order."""
    kinds = set(getattr(lm, "_no_split_modules", None) or ())
    blocks: dict[str, torch.nn.Module] = {}
    for name, module in lm.named_modules():
        if type(module).__name__ in kinds and not any(name.startswith(f"{outer}.") for outer in blocks):
            blocks[name] = module
    if not blocks:
        raise SuperposeError(f"{type(lm).__name__} names no block class (_no_split_modules) to shard or compile")
    return list(blocks.values())


def data_parallel_mesh(device: torch.device, replicas: int) -> DeviceMesh:
    """All ranks as one FSDP group (``replicas = 1``), or HSDP: ``replicas`` groups, each sharding the model.

    Ranks are laid out replica-major, so with one replica group per node (torchrun's consecutive ranks per node)
    parameters are all-gathered and gradients reduce-scattered inside a node, and only the sharded gradient crosses
    nodes (an all-reduce between replicas).
    """
    world = dist.get_world_size()
    if replicas < 1 or world % replicas:
        raise SuperposeError(f"train.replicas: {replicas} does not divide the world size {world}")
    if replicas == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def shards(parallel: str) -> bool:
    """Whether :func:`apply_parallelism` will shard: FSDP2 under any process group, a one-rank group included."""
    return parallel == "fsdp" and dist.is_initialized()


def apply_parallelism(objective: torch.nn.Module, lm: torch.nn.Module, parallel: str, info: DistInfo,
                      device: torch.device, bf16: bool, replicas: int = 1) -> torch.nn.Module:
    """Wrap for data parallelism; a no-op on one process without a process group.

    ``fsdp``: FSDP2 ``fully_shard`` per block then the root, over :func:`data_parallel_mesh` (HSDP when
    ``replicas > 1``); it runs on a meta-device shell, and with a one-rank group too (bf16 compute with fp32 master
    weights on one GPU). ``ddp``: DistributedDataParallel over materialised weights.
    """
    if shards(parallel):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = data_parallel_mesh(device, replicas)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
        for block in decoder_layers(lm):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(objective, mesh=mesh, mp_policy=mp)  # the root owns embeddings, final norm and head
        return objective
    if parallel == "ddp" and info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    return objective


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the parameters are FSDP2 shards (DTensors): then checkpoints must go through DCP state dicts."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def accumulation_context(wrapped: torch.nn.Module, last: bool) -> ContextManager:
    """What a micro-batch's backward runs under during gradient accumulation.

    FSDP2: nothing. Gradients are reduce-scattered after every micro-batch, so a rank only ever holds its 1/world
    shard of them (torchtitan does the same); turning the sync off would keep full-size fp32 gradients on every
    rank until the last micro-batch. DDP holds full gradients anyway, so it all-reduces only on the last one.
    """
    if not last and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()
