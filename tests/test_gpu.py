"""CUDA cases (skipped without a GPU; bench/gpu_check.sh runs them): bf16 steps without host syncs, one process
(autocast over fp32 weights) and FSDP2 on a one-rank group (bf16 parameters), both checked against a CPU fp32 run of
the same steps; MoE grouped matmuls and expert load; compiled blocks across the phase switch; the fused loss; eval;
the prefetcher. tests/test_gpu_path.py rehearses on the CPU what it can of the same path."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

from superpose import method
from superpose.losses import chunked_multi_hot_cross_entropy
from superpose.train.config_load import config_from_dict
from superpose.train.distributed import decoder_layers, init_one_rank_group, resolve_device, shutdown
from superpose.train.step import Prefetcher, StepResult, TrainModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 4096
BAGS = (4, 1, 4, 1)  # two warm-up steps, then two checked ones: each pair crosses the phase switch
BF16_LOSS = 1e-2
"""How far a bf16 step's loss may sit from the fp32 CPU run of the same step (loss ~ ln 4096 = 8.3; a CPU rehearsal
in bf16 differs by < 1e-3)."""


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    return resolve_device("cuda")  # indexed: cuda:N, what NCCL's device_id needs


def config(preset: str, device: str, dtype: str, **train):
    return config_from_dict({"model": {"preset": preset}, "tst": {"bag": 4},
                             "train": {"batch_size": 8, "seq_len": 64, "device": device, "dtype": dtype,
                                       "micro_batch_size": 4, **train}})


def make_module(device: torch.device, preset: str = "tiny", **train) -> TrainModule:
    return TrainModule(config(preset, str(device), "bf16", **train), VOCAB, device)


def window(bag: int, seed: int) -> torch.Tensor:
    """Host windows, the same on every run."""
    return torch.randint(0, VOCAB, (8, method.window_length(64, bag)), generator=torch.Generator().manual_seed(seed))


def cpu_reference(preset: str, **train) -> list[dict[str, float]]:
    """The steps of :data:`BAGS` in fp32 on the CPU, from the same seeded weights, in one plain process even while
    a process group exists (``ddp`` outside torchrun wraps nothing; ``fsdp`` would shard over the group)."""
    module = TrainModule(config(preset, "cpu", "fp32", **train, parallel="ddp"), VOCAB, torch.device("cpu"))
    return [module.train_step(window(bag, i), bag, 1e-3).to_host() for i, bag in enumerate(BAGS)]


@pytest.fixture
def one_rank_group(cuda):
    """A one-rank NCCL group: TrainModule then shards with FSDP2 (bf16 compute, fp32 master weights)."""
    init_one_rank_group(cuda)
    yield
    shutdown()


def steps_without_syncs(module: TrainModule, device: torch.device) -> list[StepResult]:
    """The steps of :data:`BAGS`; the last two with any host-device sync an error. Inputs are on the device first
    (the copy to it is a sync), as the prefetcher hands them over."""
    inputs = [window(bag, i).to(device) for i, bag in enumerate(BAGS)]
    results = [module.train_step(inputs[i], bag, 1e-3) for i, bag in enumerate(BAGS[:2])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results += [module.train_step(inputs[i], bag, 1e-3) for i, bag in enumerate(BAGS[2:], start=2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return results


def assert_like_cpu(rows: list[dict[str, float]], reference: list[dict[str, float]]) -> None:
    assert rows[0]["loss"] == pytest.approx(math.log(VOCAB), abs=0.05)  # near-uniform logits at init
    for step, (got, want) in enumerate(zip(rows, reference, strict=True)):
        assert got["finite"] == 1.0, step
        assert got["loss"] == pytest.approx(want["loss"], abs=BF16_LOSS), step
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=0.02), step


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_bf16_steps_under_autocast_do_not_sync(cuda, preset):
    """One process: fp32 weights under autocast (MoE experts cast to bf16 for grouped_mm's fast path)."""
    module = make_module(cuda, preset, loss_chunk=128)
    assert not module.sharded
    rows = [r.to_host() for r in steps_without_syncs(module, cuda)]
    assert_like_cpu(rows, cpu_reference(preset, loss_chunk=128))


def routed_shares(module: TrainModule) -> Callable[[], torch.Tensor]:
    """Count, from here on, the top-k experts of each MoE layer's router logits (the gate's first output, what the
    metric promises to count) with ``index_add_`` on the device; the function returned stops counting and gives
    each layer's share of routed slots per expert ``[layers, experts]``."""
    config = module.model.config
    blocks = decoder_layers(module.model)
    counts = torch.zeros(len(blocks), config.num_experts, device=module.device)

    def hook(layer: int):
        def count(gate, args, out):
            ids = out[0].topk(config.num_experts_per_tok, dim=-1).indices.reshape(-1)
            counts[layer].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        return count

    handles = [block.mlp.gate.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]

    def shares() -> torch.Tensor:
        for handle in handles:
            handle.remove()
        return (counts / counts.sum(-1, keepdim=True)).cpu()

    return shares


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_fsdp_on_one_rank_shards_and_steps_without_syncs(cuda, one_rank_group, preset):
    from torch.distributed.tensor import DTensor

    module = make_module(cuda, preset, parallel="fsdp")
    assert module.sharded and all(isinstance(p, DTensor) for p in module.model.parameters())
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # master weights; compute in bf16
    shares = routed_shares(module) if preset == "tiny-moe" else None
    results = steps_without_syncs(module, cuda)
    assert_like_cpu([r.to_host() for r in results], cpu_reference(preset))
    if shares is not None:  # the mean of the steps' expert loads: every micro-batch routes the same number of slots
        load = torch.stack([r.expert_load.cpu() for r in results]).mean(0)
        torch.testing.assert_close(load, shares(), atol=1e-6, rtol=0)


def test_compiled_blocks_across_the_phase_switch(cuda):
    plain, compiled = make_module(cuda), make_module(cuda, compile=True)
    assert compiled.compiled, "Triton or a C compiler is missing: the blocks fell back to eager"
    for step, bag in enumerate(BAGS):
        a = plain.train_step(window(bag, step).to(cuda), bag, 1e-3).to_host()
        b = compiled.train_step(window(bag, step).to(cuda), bag, 1e-3).to_host()
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2), step  # bf16 kernels differ, not the maths
    graphs = counters["stats"]["unique_graphs"]
    windows = torch.randint(0, VOCAB, (10, 65), generator=torch.Generator().manual_seed(7)).to(cuda)
    assert compiled.eval_loss(windows) == pytest.approx(plain.eval_loss(windows), abs=2e-2)
    assert counters["stats"]["unique_graphs"] == graphs  # eval compiled nothing


@pytest.mark.parametrize("bag", [1, 4, 16])
def test_fused_loss_matches_full_logits_on_cuda(cuda, bag):
    g = torch.Generator(device=cuda).manual_seed(bag)
    hidden = torch.randn(2, 64, 256, device=cuda, generator=g, requires_grad=True)
    weight = (0.02 * torch.randn(VOCAB, 256, device=cuda, generator=g)).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, 64, bag), device=cuda, generator=g)
    full = method.multi_hot_cross_entropy(hidden @ weight.T, targets)
    full_grads = torch.autograd.grad(full, (hidden, weight))
    fused = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=48)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    assert fused.item() == pytest.approx(full.item(), abs=1e-5)
    for a, b in zip(fused_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_loss_head_gradient_accumulates_in_fp32_on_cuda(cuda):
    """Under bf16 autocast the head gradient of every chunk after the first goes through
    ``addmm(grad_w, dz.T, h, out_dtype=float32, out=grad_w)`` (fp32 ``self``): the op runs on this GPU's torch, the
    gradient is fp32, and it is the fp32 product of the bf16 chunk values (only ``dz``'s own bf16 rounding apart)."""
    g = torch.Generator(device=cuda).manual_seed(3)
    hidden = torch.randn(2, 96, 256, device=cuda, generator=g).bfloat16().requires_grad_()
    weight = (0.02 * torch.randn(VOCAB, 256, device=cuda, generator=g)).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, 96, 4), device=cuda, generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=48)  # 4 chunks
    (grad,) = torch.autograd.grad(fused, (weight,))
    rounded = weight.detach().bfloat16().float().requires_grad_()
    full = method.multi_hot_cross_entropy(hidden.detach().float() @ rounded.T, targets)
    (reference,) = torch.autograd.grad(full, (rounded,))
    assert grad.dtype == torch.float32
    assert ((grad - reference).norm() / reference.norm()).item() < 1e-2


def test_eval_matches_the_cpu_within_bf16(cuda):
    windows = torch.randint(0, VOCAB, (10, 65), generator=torch.Generator().manual_seed(7))
    on_gpu = make_module(cuda).eval_loss(windows.to(cuda))
    on_cpu = TrainModule(config("tiny", "cpu", "fp32"), VOCAB, torch.device("cpu")).eval_loss(windows)
    assert on_gpu == pytest.approx(on_cpu, abs=BF16_LOSS)
    assert on_cpu == pytest.approx(math.log(VOCAB), abs=0.05)


def test_prefetcher_pins_and_copies_asynchronously(cuda):
    class Counting:
        """A loader: consecutive integers, one row repeated twice, and the position and epoch a loader reports."""

        def __init__(self):
            self.position, self.epoch = 0, 0

        def next_batch(self, n: int) -> torch.Tensor:
            self.position += n
            return torch.arange(self.position - n, self.position).repeat(2, 1)

        def state_dict(self) -> dict[str, int]:
            return {"position": self.position}

    read = []
    prefetcher = Prefetcher(Counting(), cuda)
    real_read = prefetcher._read
    prefetcher._read = lambda n: read.append(batch := real_read(n)) or batch
    try:
        first = prefetcher.get(5, 5)
        second = prefetcher.get(5)
        assert first.device == cuda and all(batch.is_pinned() for batch in read)
        assert torch.equal(second[0].cpu(), torch.arange(5, 10))
        assert prefetcher.state_dict() == {"position": 10} and prefetcher.epoch == 0
    finally:
        prefetcher.close()
