"""PyTorch's own distributed stack, set up from torchrun's environment: FSDP2 or DDP, gloo on CPU, NCCL on GPU.

Nothing here is TST-specific: the objective module (model + bag mean + multi-hot loss) is wrapped like any model,
so the bag mean runs inside the wrapped forward where FSDP2 has the embedding unsharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import SuperposeError


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
    return info, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a scalar over ranks (for logging: every rank saw a different slice of the global batch)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def merge_across_ranks(part: dict[str, Any], info: DistInfo) -> dict[str, Any]:
    """Union of every rank's small dict (e.g. checksums of the files each rank hashed), on every rank."""
    if not info.enabled:
        return part
    parts: list[dict[str, Any]] = [{} for _ in range(info.world_size)]
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is true on any (so all ranks take the same branch, e.g. stop after this step).

    The flag travels on the training device: NCCL reduces CUDA tensors only.
    """
    if not info.enabled:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Llama, Qwen3, Qwen3-MoE, SmolLM3 all use model.layers)."""
    return list(lm.model.layers)


def apply_parallelism(objective: torch.nn.Module, lm: torch.nn.Module, parallel: str, info: DistInfo,
                      device: torch.device, bf16: bool) -> torch.nn.Module:
    """Wrap for data parallelism: FSDP2 ``fully_shard`` per block then the root, or DDP; a no-op on one process."""
    if not info.enabled:
        return objective
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in decoder_layers(lm):
        fully_shard(block, mp_policy=mp)
    fully_shard(objective, mp_policy=mp)  # the root owns embeddings, final norm and head
    return objective


def set_gradient_sync(wrapped: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch of a step."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    elif hasattr(wrapped, "require_backward_grad_sync"):  # DDP
        wrapped.require_backward_grad_sync = enabled
