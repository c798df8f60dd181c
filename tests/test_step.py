"""TrainModule on one CPU process: no host reads in a step, non-finite updates skipped on the device, sync-free
expert load, the prefetcher, the profiler, distributed-ready eval."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from superpose import method
from superpose.data.loader import WindowLoader
from superpose.data.shards import open_dataset
from superpose.errors import SuperposeError
from superpose.train.config_load import config_from_dict
from superpose.train.distributed import init_one_rank_group, is_sharded, shutdown
from superpose.train.objective import expert_load
from superpose.train.step import Prefetcher, TrainModule, profile_steps

VOCAB = 512


def make_module(preset: str = "tiny", **train) -> TrainModule:
    cfg = config_from_dict({"model": {"preset": preset}, "tst": {"bag": 4},
                            "train": {"batch_size": 4, "seq_len": 16, "device": "cpu", "micro_batch_size": 2, **train}})
    return TrainModule(cfg, VOCAB, torch.device("cpu"))


def window(bag: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, method.window_length(16, bag)), generator=torch.Generator().manual_seed(seed))


def snapshot(module: TrainModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.model.state_dict().items()}


# Python-level ways to read a tensor back to the host; on CUDA each one waits for the device to catch up.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero", "cpu")


@pytest.mark.parametrize(("preset", "train"), [("tiny", {}), ("tiny", {"loss_chunk": 24}), ("tiny-moe", {})])
def test_a_step_reads_nothing_back_to_the_host(monkeypatch, preset, train):
    """The syncs of a non-log step: none from our code or transformers' (the docs state it; CUDA checks it too)."""
    module = make_module(preset, **train)
    module.train_step(window(4), 4, 1e-3)  # the optimizer's state is created on the first step
    reads = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    module.train_step(window(4, 1), 4, 1e-3)
    module.train_step(window(1, 2), 1, 1e-3)
    monkeypatch.undo()
    assert reads == {}


def test_nonfinite_update_is_skipped_on_the_device(monkeypatch):
    module = make_module()
    module.train_step(window(4), 4, 1e-3)
    weights, moments = snapshot(module), {k: v.clone() for k, v in module.optimizer.state_dict()["state"][0].items()}
    real = TrainModule.loss
    monkeypatch.setattr(TrainModule, "loss", lambda self, *a: (out := real(self, *a))._replace(loss=out.loss * float("nan")))
    result = module.train_step(window(4, 1), 4, 1e-3)
    monkeypatch.undo()
    assert not result.finite and result.loss.isnan()
    assert all(torch.equal(weights[k], v) for k, v in module.model.state_dict().items())
    state = module.optimizer.state_dict()["state"][0]
    assert all(torch.equal(moments[k], state[k]) for k in moments)  # moments and the step count did not move
    assert module.train_step(window(4, 2), 4, 1e-3).finite
    assert module.optimizer.state_dict()["state"][0]["step"].item() == 2


def test_expert_load_counts_routed_slots_without_bincount():
    logits = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(0))
    load = expert_load(tuple(logits), top_k=2)
    for layer, scores in enumerate(logits):
        chosen = scores.topk(2, dim=-1).indices.reshape(-1)
        assert torch.equal(load[layer], torch.bincount(chosen, minlength=8).float() / chosen.numel())


def test_moe_step_reports_router_loss_and_load():
    row = make_module("tiny-moe").train_step(window(4), 4, 1e-3).to_host()
    assert row.keys() == {"loss", "grad_norm", "finite", "aux_loss", "expert_load_max", "expert_load_cv"}
    assert row["finite"] == 1.0 and row["aux_loss"] > 0 and row["expert_load_max"] >= 1.0


def test_eval_loss_is_the_target_weighted_mean_over_windows():
    module = make_module(eval_micro_batch_size=3)
    windows = torch.randint(0, VOCAB, (7, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        per_window = [module.loss(w[None], 1, "both").loss.item() for w in windows]
    assert module.eval_loss(windows) == pytest.approx(sum(per_window) / len(per_window), abs=1e-6)


def test_prefetcher_hands_out_the_loader_batches_and_position(embedded_data):
    stream = open_dataset(embedded_data).split("train")
    plain, ahead = WindowLoader(stream, 4, 0), WindowLoader(stream, 4, 0)
    lengths = [68, 68, 17, 17]
    prefetcher = Prefetcher(ahead, torch.device("cpu"))
    try:
        for i, n in enumerate(lengths):
            batch = prefetcher.get(n, lengths[i + 1] if i + 1 < len(lengths) else None)
            assert torch.equal(batch, plain.next_batch(n))
            assert prefetcher.state_dict() == plain.state_dict()  # not the position read ahead
        with pytest.raises(ValueError, match="prefetched"):
            prefetcher.get(17, 17)
            prefetcher.get(68)
    finally:
        prefetcher.close()


def test_profile_steps_writes_a_trace(tmp_path):
    module = make_module()
    with profile_steps(2, tmp_path / "profile") as step:
        for i in range(3):
            module.train_step(window(4, i), 4, 1e-3)
            step()
    trace = json.loads((tmp_path / "profile" / "trace-rank0.json").read_text())
    assert any("AdamW" in e.get("name", "") or "aten::" in e.get("name", "") for e in trace["traceEvents"])
    with profile_steps(0, tmp_path / "off") as step:
        step()
    assert not (tmp_path / "off").exists()


def test_one_rank_group_shards_with_fsdp_and_refuses_replicas_that_do_not_divide():
    """FSDP2 on a one-process group (how one GPU gets bf16 compute over fp32 master weights): same first step."""
    plain = make_module().train_step(window(4), 4, 1e-3).to_host()
    init_one_rank_group(torch.device("cpu"))
    try:
        module = make_module()
        assert module.sharded and is_sharded(module.model)
        sharded = module.train_step(window(4), 4, 1e-3).to_host()
        assert all(sharded[k] == pytest.approx(plain[k], abs=1e-5) for k in plain)
        with pytest.raises(SuperposeError, match="train.replicas: 2 does not divide the world size 1"):
            make_module(replicas=2)
    finally:
        shutdown()
    assert not is_sharded(make_module().model)
