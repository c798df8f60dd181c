"""CUDA cases (skipped without a GPU; bench/gpu_check.sh runs them): bf16 steps without host syncs, the fused loss,
compiled blocks across the phase switch, FSDP2 on a one-rank group, MoE grouped matmuls on bf16 weights."""

from __future__ import annotations

import pytest
import torch

from superpose import method
from superpose.losses import chunked_multi_hot_cross_entropy
from superpose.train.config_load import config_from_dict
from superpose.train.distributed import init_one_rank_group, shutdown
from superpose.train.step import Prefetcher, TrainModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 4096
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def make_module(preset: str = "tiny", **train) -> TrainModule:
    cfg = config_from_dict({"model": {"preset": preset}, "tst": {"bag": 4},
                            "train": {"batch_size": 8, "seq_len": 64, "device": "cuda", "dtype": "bf16",
                                      "micro_batch_size": 4, **train}})
    return TrainModule(cfg, VOCAB, CUDA)


def window(bag: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (8, method.window_length(64, bag)), generator=torch.Generator().manual_seed(seed))
    return ids.to(CUDA)


@pytest.fixture
def one_rank_group():
    """A one-rank NCCL group: TrainModule then shards with FSDP2 (bf16 compute, fp32 master weights)."""
    init_one_rank_group(CUDA)
    yield
    shutdown()


def steps_without_syncs(module: TrainModule) -> list[dict[str, float]]:
    """Two warm-up steps, then two steps (a phase switch) with any host-device sync an error; their metrics."""
    module.train_step(window(4, 0), 4, 1e-3)
    module.train_step(window(1, 1), 1, 1e-3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [module.train_step(window(4, 2), 4, 1e-3), module.train_step(window(1, 3), 1, 1e-3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [r.to_host() for r in results]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_bf16_steps_do_not_sync(preset):
    rows = steps_without_syncs(make_module(preset, loss_chunk=128))
    assert all(r["finite"] == 1.0 and 0 < r["loss"] < 20 for r in rows)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_fsdp_on_one_rank_shards_and_steps_without_syncs(one_rank_group, preset):
    from torch.distributed.tensor import DTensor

    module = make_module(preset, parallel="fsdp")
    assert module.sharded and all(isinstance(p, DTensor) for p in module.model.parameters())
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # master weights; compute in bf16
    rows = steps_without_syncs(module)
    assert all(r["finite"] == 1.0 for r in rows)
    if preset == "tiny-moe":
        assert rows[0]["expert_load_max"] >= 1.0


def test_compiled_blocks_across_the_phase_switch():
    plain, compiled = make_module(), make_module(compile=True)
    for step, bag in enumerate((4, 4, 1, 1)):
        a = plain.train_step(window(bag, step), bag, 1e-3).to_host()
        b = compiled.train_step(window(bag, step), bag, 1e-3).to_host()
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2), step  # bf16 kernels differ, not the maths


@pytest.mark.parametrize("bag", [1, 4, 16])
def test_fused_loss_matches_full_logits_on_cuda(bag):
    g = torch.Generator(device="cuda").manual_seed(bag)
    hidden = torch.randn(2, 64, 256, device=CUDA, generator=g, requires_grad=True)
    weight = (0.02 * torch.randn(VOCAB, 256, device=CUDA, generator=g)).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, 64, bag), device=CUDA, generator=g)
    full = method.multi_hot_cross_entropy(hidden @ weight.T, targets)
    full_grads = torch.autograd.grad(full, (hidden, weight))
    fused = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=48)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    assert fused.item() == pytest.approx(full.item(), abs=1e-5)
    for a, b in zip(fused_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_eval_is_one_number_on_cuda():
    module = make_module()
    windows = torch.randint(0, VOCAB, (10, 65), generator=torch.Generator().manual_seed(7)).to(CUDA)
    assert 0 < module.eval_loss(windows) < 20


def test_prefetcher_pins_and_copies_asynchronously():
    class Counting:
        def __init__(self):
            self.position = 0

        def next_batch(self, n: int) -> torch.Tensor:
            self.position += n
            return torch.arange(self.position - n, self.position).repeat(2, 1)

        def state_dict(self) -> dict[str, int]:
            return {"position": self.position}

    prefetcher = Prefetcher(Counting(), CUDA)
    try:
        first = prefetcher.get(5, 5)
        second = prefetcher.get(5)
        assert first.is_cuda and torch.equal(second[0].cpu(), torch.arange(5, 10))
        assert prefetcher.state_dict() == {"position": 10}
    finally:
        prefetcher.close()
