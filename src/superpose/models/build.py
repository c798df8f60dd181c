"""Building a model on the meta device, materialising it (also shard by shard under FSDP2) and drawing its weights.

We draw every matrix ourselves rather than trusting each architecture's ``_init_weights``, so that TST and baseline
runs of any family start from the same, seed-determined distribution regardless of the transformers version; only
norm gains and buffers (rotary frequencies, embedding scales) are left to the family's own init, which computes them
without randomness. Also the parameter counts and the MoE router loss, read off a built model."""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AttentionInterface, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import ModelOutput

from superpose.errors import SuperposeError

from .configs import check_trainable
from .presets import model_config, moe_shape


CAUSAL_SDPA = "sdpa_causal"
"""transformers' SDPA attention under a name its mask builder does not know, so it builds no mask (see below)."""
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def use_causal_sdpa(model: PreTrainedModel) -> None:
    """Attend causally with no mask at all, for training on full, unpadded windows (never for padded batches).

    With ``sdpa`` transformers inspects ``position_ids`` for packed sequences on every forward, a host-device sync;
    under this name it skips mask building, and SDPA runs with ``is_causal=True``: the same logits bit for bit.
    Only for families whose every layer attends fully causally through SDPA: sliding windows (Mistral, Gemma 3)
    need the mask transformers builds, and families without SDPA keep their own attention.
    """
    if model._supports_sdpa and _fully_causal(model.config):
        model.set_attn_implementation(CAUSAL_SDPA)


AUTOCAST_EXPERTS = "grouped_mm_autocast"
"""transformers' ``grouped_mm`` experts under a name of our own, with the expert weights cast as autocast would."""


class _CastParameters:
    """A module seen with its floating-point parameters cast to ``dtype`` (differentiable casts: the gradients reach
    the fp32 parameters, as autocast's casts of a Linear's weight do); everything else is the module's own."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self._module, self._dtype = module, dtype

    def __getattr__(self, name: str) -> object:
        value = getattr(self._module, name)
        if isinstance(value, torch.nn.Parameter) and value.is_floating_point():
            return value.to(self._dtype)
        return value


def _autocast_grouped_mm(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped_mm experts forward, on expert weights cast to the autocast dtype when autocast is on.

    Autocast does not cover ``torch._grouped_mm``, so fp32 expert weights (DDP or one process, where the weights stay
    fp32) would run it in fp32: off the bf16 kernel, through a fallback that copies the offsets to the host (a
    sync) and loops over experts in every MoE layer.
    """
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device):
        experts = _CastParameters(experts, torch.get_autocast_dtype(device))
    return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(AUTOCAST_EXPERTS, _autocast_grouped_mm)


def use_autocast_experts(model: PreTrainedModel) -> None:
    """Run a mixture-of-experts model's grouped_mm experts on autocast-dtype weights (see :func:`_autocast_grouped_mm`)
    when the model computes under autocast; a no-op for dense models and other expert implementations."""
    if getattr(model.config, "_experts_implementation", None) == "grouped_mm":
        model.set_experts_implementation(AUTOCAST_EXPERTS)


def _fully_causal(config: PretrainedConfig) -> bool:
    """Whether every layer attends to all earlier positions (no sliding window, no linear or chunked attention)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


def build_model(
    preset_or_config: str | PretrainedConfig,
    vocab_size: int | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> PreTrainedModel:
    """Instantiate a causal LM with our seeded init; ``device="meta"`` gives a weightless shell.

    The model is always built on the meta device first and then materialised, so a distributed trainer can shard
    the shell before any weight exists and call :func:`materialize` itself.
    """
    if isinstance(preset_or_config, PretrainedConfig):
        if vocab_size is not None or overrides:
            raise SuperposeError("vocab_size and shape overrides apply to preset names, not to a config")
        config = preset_or_config
    else:
        config = model_config(preset_or_config, vocab_size, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_trainable(model)
    device = torch.device(device)
    if device.type != "meta":
        materialize(model, device, seed)
    return model


@torch.no_grad()
def materialize(model: PreTrainedModel, device: torch.device, seed: int | None) -> None:
    """Give a meta-built model (plain or already sharded by FSDP2) real storage on ``device``.

    Each rank allocates only its shard; buffers and norm gains are set as the family's own init sets them
    (:func:`family_defaults`); ``seed`` draws the weights with :func:`init_weights`, ``None`` leaves them
    uninitialised for a checkpoint (or ``model.init_from``) to fill.
    """
    model.to_empty(device=device)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        model.tie_weights()  # to_empty gives each module its own tensor; FSDP2 keeps a shared parameter shared
    if seed is None:
        family_defaults(model)
    else:
        init_weights(model, seed)


def _seeded(name: str, param: torch.Tensor) -> bool:
    """Parameters :func:`init_weights` draws (matrices, embeddings, fused experts) or zeroes (biases)."""
    return param.ndim >= 2 or name.endswith("bias")


@torch.no_grad()
def family_defaults(model: PreTrainedModel) -> None:
    """Buffers (rotary frequencies, embedding scales) and norm gains as the family's own ``_init_weights`` sets them
    (1, or 0 for Gemma's ``1 + w`` norms), with nothing drawn: every parameter we seed is marked as initialised, the
    flag transformers' init functions honour, for the duration of the call.
    """
    seeded = [p for n, p in model.named_parameters() if _seeded(n, p)]
    for param in seeded:
        param._is_hf_initialized = True
    try:
        with hf_init.guard_torch_init_functions():
            for module in model.modules():
                model._init_weights(module)
    finally:
        for param in seeded:
            del param._is_hf_initialized


_OUTPUT_PROJECTIONS = frozenset({"o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj", "fc2", "w2"})
"""Residual-stream writers across families: Llama-style, GPT-2 (c_proj), GPT-NeoX/Falcon/Phi (dense, dense_4h_to_h,
fc2), OPT (out_proj), Mixtral-style experts (w2)."""


def _is_output_projection(name: str) -> bool:
    """Projections that write into the residual stream (attention out, MLP/expert down)."""
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" else parts[-1]
    return leaf in _OUTPUT_PROJECTIONS


_BLOCK_ELEMENTS = 1 << 20
"""Values drawn from one generator: parameters are drawn in blocks of whole rows, so a shard draws only its rows."""


def _block_generator(seed: int, name: str, block: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the full parameter held here: all of them, or this rank's FSDP2 shard."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise AssertionError(f"only row (dim-0) sharding is supported, got {param.placements}")
    return offset[0], offset[0] + shape[0]


def _row_blocks(shape: torch.Size, start: int, stop: int, std: float, seed: int,
                name: str) -> Iterator[tuple[int, torch.Tensor]]:
    """Rows ``[start, stop)`` of a N(0, std) tensor of ``shape`` as ``(first row, values)`` pieces of at most one
    block: the values are the same whichever rows a caller asks for, and only one block is held at a time."""
    per_block = max(1, _BLOCK_ELEMENTS // max(math.prod(shape[1:]), 1))
    for block in range(start // per_block, -(-stop // per_block) if stop > start else 0):
        lo, hi = block * per_block, min((block + 1) * per_block, shape[0])
        values = torch.empty((hi - lo, *shape[1:])).normal_(0.0, std, generator=_block_generator(seed, name, block))
        yield max(start, lo), values[max(start, lo) - lo:min(stop, hi) - lo]


@torch.no_grad()
def init_weights(model: PreTrainedModel, seed: int, std: float = 0.02) -> None:
    """Seeded GPT-2-style init, drawn on the CPU in float32 from private generators, one per block of rows.

    A parameter's values depend only on the seed, its name and the row, so a rank holding an FSDP2 shard draws just
    its rows and gets exactly what a single process draws for them; the device, dtype and global RNG play no part.
    Residual-stream writers are scaled by 1/sqrt(2 * num_layers) so the residual variance does not grow with depth.
    Tied weights appear once in `named_parameters()` and are drawn once. Norm gains and buffers are the family's
    (:func:`family_defaults`).
    """
    family_defaults(model)
    out_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif _seeded(name, param):  # embeddings, linear layers, fused expert tensors, routers
            local = param.to_local() if isinstance(param, DTensor) else param
            start, stop = _local_rows(param)
            scale = out_std if _is_output_projection(name) else std
            for row, values in _row_blocks(param.shape, start, stop, scale, seed, name):
                local[row - start:row - start + values.shape[0]].copy_(values)


def router_aux_loss(lm: PreTrainedModel, outputs: ModelOutput) -> torch.Tensor | None:
    """The MoE load-balancing loss (unweighted) of a forward's outputs, as the model family defines it; None if dense.

    A causal LM's own outputs carry it (``aux_loss``); a backbone's carry only ``router_logits``, scored here with
    the load-balancing function of the model's own modeling module (Qwen3-MoE, Mixtral, OLMoE, ... each have one).
    """
    if getattr(outputs, "aux_loss", None) is not None:
        return outputs.aux_loss
    logits = getattr(outputs, "router_logits", None)
    if not logits:
        return None
    loss_fn = sys.modules[type(lm).__module__].load_balancing_loss_func
    return loss_fn(logits, *moe_shape(lm.config), None)


def _expert_parameter_numel(model: PreTrainedModel) -> int:
    """Numel of the routed expert weights (fused 3D tensors or per-expert modules, either layout)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." in f".{n}")


def parameter_counts(model_or_config: PreTrainedModel | PretrainedConfig) -> tuple[int, int]:
    """(total, active) parameters; active counts only `num_experts_per_tok` of each layer's experts."""
    if isinstance(model_or_config, PretrainedConfig):
        model = build_model(model_or_config, device="meta")
    else:
        model = model_or_config
    total = sum(p.numel() for p in model.parameters())
    num_experts, top_k = moe_shape(model.config)
    if not num_experts:
        return total, total
    per_expert = _expert_parameter_numel(model) // num_experts
    return total, total - per_expert * (num_experts - top_k)
