"""PyTorch's own distributed stack, set up from torchrun's environment: FSDP2, HSDP or DDP, gloo on CPU, NCCL on GPU.

Nothing here is TST-specific: the objective module (model + bag mean + multi-hot loss) is wrapped like any model,
and the methods it calls on the embedding module in place of its forward run under that module's FSDP2 hooks. The
model arrives here as a meta-device shell: FSDP2 shards the shell, and each rank then allocates and initialises only
its shard.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import SuperposeError

_host_group: dist.ProcessGroup | None = None
"""A gloo group beside NCCL for host-side agreement (the stop flag); None: the default group is gloo already."""
_mesh_groups: list[dist.ProcessGroup] = []
"""The data-parallel mesh's groups, once built: :func:`set_collective_timeout` shortens their timeout too."""


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
    """``auto`` is CUDA when available, else the CPU; asking for CUDA without it is a one-line error.

    CUDA comes back indexed, as NCCL's ``device_id`` requires (``init_process_group`` refuses a bare ``cuda``): a bare
    ``cuda`` is this process's GPU, ``LOCAL_RANK`` under torchrun, else the current device. Choosing CUDA sets the
    allocator's default (:func:`_default_cuda_allocator`) before the first CUDA call that could initialise it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SuperposeError(f"train.device: {name} requested but CUDA is not available")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SuperposeError(f"train.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type != "cuda":
        return device
    _default_cuda_allocator()
    if device.index is None:
        info = torchrun_env()
        device = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    return device


CUDA_ALLOC_CONF = "expandable_segments:True"
"""The allocator setting a run gets unless the user chose one: segments that grow in place instead of new blocks
per size, against the fragmentation of FSDP's mixed all-gather sizes and the loss's large chunks."""


def _default_cuda_allocator() -> None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` to :data:`CUDA_ALLOC_CONF` unless the user set it (or ``PYTORCH_ALLOC_CONF``).

    The caching allocator parses the variable once, when it is first used, so this must run before CUDA initialises
    (``torch.cuda.is_available`` does not initialise it; ``current_device`` and any allocation do).
    """
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device (made current on CUDA, so
    NCCL and the caching allocator work on it); under torchrun each rank takes GPU ``LOCAL_RANK``."""
    global _host_group
    device = resolve_device(device_name)
    info = torchrun_env()
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank) if info.enabled else device
        torch.cuda.set_device(device)
    if not info.enabled:
        return info, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        _host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return info, device


def init_one_rank_group(device: torch.device) -> None:
    """A process group of this process alone, so FSDP2 applies on one GPU too (bf16 compute, fp32 master weights).

    Checkpoints of such a run are sharded (DCP) like those of a multi-rank run. A CUDA ``device`` must be indexed
    (:func:`resolve_device` gives one).
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
    global _host_group, _mesh_groups
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()
    _host_group, _mesh_groups = None, []


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


def merge_across_ranks(part: dict[str, Any], info: DistInfo,
                       group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Union of every rank's small dict (e.g. checksums of the files each rank hashed), on every rank; over the host
    group, or ``group`` (e.g. a background thread's own, so no group is used from two threads)."""
    if not info.enabled:
        return part
    parts: list[dict[str, Any]] = [{} for _ in range(info.world_size)]
    dist.all_gather_object(parts, part, group=group or _host_group)
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
    model keeps whole (``_no_split_modules``: LlamaDecoderLayer, GPT2Block, GPTNeoXLayer, ...), in order; wrapped
    ones too (FSDP2 gives a sharded block a subclass of its own)."""
    kinds = set(getattr(lm, "_no_split_modules", None) or ())
    blocks: dict[str, torch.nn.Module] = {}
    for name, module in lm.named_modules():
        if kinds.intersection(c.__name__ for c in type(module).__mro__) and not any(
                name.startswith(f"{outer}.") for outer in blocks):
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
    global _mesh_groups
    world = dist.get_world_size()
    if replicas < 1 or world % replicas:
        raise SuperposeError(f"train.replicas: {replicas} does not divide the world size {world}")
    if replicas == 1:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    else:
        mesh = init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    _mesh_groups = mesh.get_all_groups()
    return mesh


def set_collective_timeout(seconds: float) -> None:
    """Let every collective of this job (the default group, the host group, the mesh's shard/replicate groups) wait
    at most ``seconds``, after a barrier so no rank starts counting while another is still catching up.

    Called once the first step is done: start-up, shard verification and compilation keep torch's generous default
    (10 min NCCL, 30 min gloo), and from then on a hung rank fails the whole job in ``seconds`` instead. torch's
    ``_set_pg_timeout`` is private but is what torchtitan uses for the same switch (torch has no public setter).
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    groups = {id(g): g for g in (dist.group.WORLD, _host_group, *_mesh_groups) if g is not None}
    for group in groups.values():
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)


def shards(parallel: str) -> bool:
    """Whether :func:`apply_parallelism` will shard: FSDP2 under any process group, a one-rank group included."""
    return parallel == "fsdp" and dist.is_initialized()


def _tied(lm: torch.nn.Module) -> bool:
    """Whether the LM head is the input embedding table (or absent): one weight, one unit, the root's."""
    head = lm.get_output_embeddings()
    return head is None or head.weight is lm.get_input_embeddings().weight


def head_unit(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of the FSDP unit that holds the LM head: the head, with every module outside the blocks and the
    input embeddings that owns parameters (the final norm in Llama-like families); empty when the root keeps them.

    The root keeps them with tied embeddings and when no such module exists: the fused loss reads ``head.weight``
    without calling the head, so the unit's all-gather must be started by a module that runs before the loss does
    (the final norm).
    """
    if _tied(lm):
        return []
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    taken = {id(m) for block in decoder_layers(lm) for m in block.modules()} | {id(embedding), id(head)}
    rest = [m for m in lm.modules() if id(m) not in taken and next(m.parameters(recurse=False), None) is not None]
    return [*rest, head] if rest else []


def apply_parallelism(objective: torch.nn.Module, lm: torch.nn.Module, parallel: str, info: DistInfo,
                      device: torch.device, bf16: bool, replicas: int = 1) -> torch.nn.Module:
    """Wrap for data parallelism; a no-op on one process without a process group.

    ``fsdp``: FSDP2 over :func:`data_parallel_mesh` (HSDP when ``replicas > 1``), as torchtitan lays it out: a unit
    for the input embeddings, one per block, one for the final norm and the head (:func:`head_unit`; not resharded
    after forward, since backward needs them at once), and the root (the objective) for what is left (nothing in
    Llama-like families). The embedding table is gathered for the bag mean and freed after it, instead of held by
    the root through forward and backward, and not gathered again for backward unless the objective's backward
    reads it (``objective.embedding_backward_reads_weight``: a lookup's gradient needs only the ids). The objective
    reads the table in methods of the embedding module, not its forward (``objective.embedding_methods``), which are
    registered as forwards so FSDP2 gathers the table around them. The ids need no gradient, so FSDP2 reduce-scatters
    the table's gradient in the root's final callback, right after the table's backward, the last of the step. The
    head's unit is all-gathered when the final norm runs, while the last blocks compute, and reduce-scattered as
    backward leaves it, instead of at the start of the forward and exposed at the end of the backward as a root unit
    would be. Tied embeddings stay with the root, with the final norm. It runs on a meta-device shell, and with a
    one-rank group too (bf16 compute with fp32 master weights on one GPU). ``ddp``: DistributedDataParallel over
    materialised weights.
    """
    if shards(parallel):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = data_parallel_mesh(device, replicas)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
        if not _tied(lm):
            embedding = fully_shard(lm.get_input_embeddings(), mesh=mesh, mp_policy=mp)
            for name in getattr(objective, "embedding_methods", ()):
                register_fsdp_forward_method(embedding, name)
            embedding.set_unshard_in_backward(getattr(objective, "embedding_backward_reads_weight", True))
        for block in decoder_layers(lm):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        if last := head_unit(lm):
            fully_shard(last, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        fully_shard(objective, mesh=mesh, mp_policy=mp)
        return objective
    if parallel == "ddp" and info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    return objective


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile's default backend (inductor) cannot build kernels for ``device`` here; None when it can.

    Checked up front, so that a machine without a compiler trains eagerly instead of failing at the first step:
    inductor writes C++ for the CPU, and Triton kernels (plus a C launcher Triton builds with ``CC``/gcc/clang) on
    CUDA.
    """
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor}"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed or does not support this GPU"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return "no C compiler for Triton's launcher (gcc, clang or $CC)"
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return "no C++ compiler for inductor's CPU kernels (g++ or $CXX)"
    return None


def compile_blocks(lm: torch.nn.Module, device: torch.device) -> bool:
    """torch.compile each block's ``forward``, after wrapping; False (with one warning) when compiling cannot work.

    The forward, not the module's call: FSDP2's hooks run in the call around it, outside the compiled region, so
    the graph has no breaks at them (compiling the call, as ``Module.compile`` does, traces into the hooks, which
    dynamo skips). Blocks share one code object and see ``[B, L, d]`` in every phase, so one graph serves them all;
    the module and its state-dict names stay as they are (no ``_orig_mod``).
    """
    reason = compile_unavailable(device)
    if reason:
        warnings.warn(f"train.compile: {reason}; the blocks run eagerly", stacklevel=2)
        return False
    for block in decoder_layers(lm):
        block.forward = torch.compile(block.forward)
    return True


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the parameters are FSDP2 shards (DTensors): then checkpoints must go through DCP state dicts."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def accumulation_context(wrapped: torch.nn.Module, last: bool) -> ContextManager:
    """What a micro-batch's backward runs under during gradient accumulation.

    FSDP2: gradients are reduce-scattered after every micro-batch, so a rank only ever holds its 1/shard part of
    them (torchtitan does the same); turning the sync off would keep full-size fp32 gradients on every rank until
    the last micro-batch. Under HSDP the all-reduce across replica groups (across nodes) runs on the last
    micro-batch only: FSDP2 sums the earlier reduce-scattered shards aside (``set_requires_all_reduce``), so a step
    crosses replicas once per unit, not once per unit and micro-batch. DDP holds full gradients anyway, so it
    all-reduces only on the last one.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_all_reduce(last)
    elif not last and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()

