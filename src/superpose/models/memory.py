"""Whether a model fits where it is to train, checked on its meta-device shell before any weight is allocated: a
config that only names a family (``{"model_type": "llama"}``) builds that family's full default size, and allocating
it would exhaust the host instead of saying so."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from superpose.errors import SuperposeError


TRAINING_BYTES_PER_PARAMETER = 16
"""What the trainer holds per parameter: fp32 weights, fp32 gradients and AdamW's two fp32 moments (4 + 4 + 8 bytes);
activations come on top, so a model refused here could never train, and one let through may still not."""


def available_memory(device: torch.device) -> int | None:
    """Bytes a model can use on ``device``: a GPU's total memory, or the host's available memory; None when unknown.

    A GPU's total, not its free memory: asking for free memory would create a CUDA context on a device other ranks
    use, before each rank has picked its own.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(model: torch.nn.Module, device: torch.device, world_size: int = 1, sharded: bool = False) -> None:
    """Refuse, in one line with its size, a model whose training state cannot fit on ``device``.

    ``model`` is the meta-device shell (its parameters count, none is allocated). Under FSDP (``sharded``) each rank
    holds 1/``world_size`` of the state; on the CPU the ranks torchrun started on this host share its memory.
    """
    params = sum(p.numel() for p in model.parameters())
    per_rank = params * TRAINING_BYTES_PER_PARAMETER // (world_size if sharded else 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    here = int(local) if device.type == "cpu" and local.isdigit() and int(local) > 0 else 1
    need, have = per_rank * here, available_memory(device)
    if have is None or need <= have:
        return
    where = f"{device.type} device {device.index or 0}" if device.type == "cuda" else "this host"
    split = f" over {world_size} FSDP ranks" if sharded and world_size > 1 else ""
    ranks = f" for its {here} ranks" if here > 1 else ""
    raise SuperposeError(f"model: {params / 1e9:.2f}B parameters need {_gib(need)} GiB{ranks} to train "
                         f"({TRAINING_BYTES_PER_PARAMETER} bytes each for weights, gradients and AdamW moments{split}),"
                         f" more than the {_gib(have)} GiB {where} has; choose a smaller model")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"
