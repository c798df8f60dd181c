"""The trainer end to end on CPU: metrics, checkpoints at the phase switch, exact resume, one code path at bag 1,
callbacks added from outside, a throughput window of training steps only."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from superpose import method
from superpose.data.loader import WindowLoader
from superpose.data.shards import open_dataset
from superpose.errors import SuperposeError
from superpose.models import build_model
from superpose.train import callbacks, loop
from superpose.train.callbacks import Callback
from superpose.train.checkpoint import list_checkpoints, load_checkpoint
from superpose.train.loop import train
from superpose.train.metrics import read_metrics
from superpose.train.step import TrainModule

from conftest import make_tiny_config


def losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def test_run_logs_phases_and_checkpoints(tiny_config):
    cfg = tiny_config()
    result = train(cfg, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["bag"] for r in rows] == [4] * 6 + [1] * 6
    assert [r["phase"] for r in rows] == [1] * 6 + [2] * 6
    # phase 1 reads (L+1)*bag tokens per sequence, phase 2 L+1; model FLOPs per step stay the same
    per_step = [b["text_tokens"] - a["text_tokens"] for a, b in zip(rows, rows[1:])]
    assert per_step[:5] == [4 * 17 * 4] * 5 and per_step[-1] == 4 * 17
    flops = [b["flops"] - a["flops"] for a, b in zip(rows, rows[1:])]
    assert len(set(flops)) == 1 and flops[0] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 12]
    assert result.final_val_loss == rows[-1]["val_loss"]
    for key in ("lr", "grad_norm", "wall_time"):
        assert all(key in r for r in rows)
    # throughput leaves the first (warm-up) step out: step 1's row, alone in its window, has none
    assert "tokens_per_s" not in rows[0] and all("tokens_per_s" in r for r in rows[1:])
    names = [p.name for p in list_checkpoints(result.run_dir)]
    # periodic 4, 8 pruned to keep=2 -> both kept; the switch (6) and the final (12) are always kept
    assert names == ["step-0000004", "step-0000006", "step-0000008", "step-0000012"]
    switch = json.loads((result.run_dir / "checkpoints/step-0000006/state.json").read_text())
    assert (switch["phase"], switch["bag"], switch["keep_always"]) == (1, 4, True)
    assert (result.run_dir / "config.toml").read_text() == cfg.to_toml()
    assert (result.run_dir / "checkpoints/step-0000006/config.toml").read_text() == cfg.to_toml()
    assert list((result.run_dir / "tb").iterdir())
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["stages"] == [{"bag": 4, "end_step": 6}, {"bag": 1, "end_step": 12}]


@pytest.fixture(scope="module")
def finished_copy(embedded_data, tmp_path_factory):
    """A finished tiny TST run (trained once per module) to cut short and resume."""
    return train(make_tiny_config(embedded_data, tmp_path_factory.mktemp("cut"), "cut"), progress=False).run_dir


@pytest.mark.parametrize("resume_from", ["step-0000004", "step-0000006", "step-0000008"])
def test_resume_reproduces_uninterrupted_losses(tiny_config, trained_run, finished_copy, resume_from):
    full = trained_run("tst")  # the same config, uninterrupted
    cut = tiny_config("cut")
    shutil.copytree(finished_copy, cut.run_dir)
    # simulate a run killed after `resume_from`: later checkpoints and metrics never happened
    for ckpt in list_checkpoints(cut.run_dir):
        if ckpt.name > resume_from:
            shutil.rmtree(ckpt)
    resumed = train(cut, resume=True, progress=False)
    assert losses(resumed.run_dir) == losses(full)
    last = read_metrics(full / "metrics.jsonl")[-1]
    assert (resumed.final_val_loss, resumed.text_tokens) == (last["val_loss"], last["text_tokens"])


def test_rerun_into_existing_run_is_refused(tiny_config):
    cfg = tiny_config()
    train(cfg, progress=False)
    before = (cfg.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(SuperposeError, match="already holds a run"):
        train(cfg, progress=False)
    assert (cfg.run_dir / "metrics.jsonl").read_text() == before


def test_checkpoint_shape_mismatch_is_one_line_error(tiny_config):
    cfg = tiny_config(train={"steps": 4})
    result = train(cfg, progress=False)
    other = build_model("small", 512)
    with pytest.raises(SuperposeError, match="does not match the model"):
        load_checkpoint(result.run_dir, other, None)


def test_bag_one_step_equals_plain_huggingface_loss(embedded_data, tiny_config):
    """The TST code path at bag 1 computes exactly the model's own next-token loss (labels=...)."""
    cfg = tiny_config(tst={"bag": 1, "ratio": 0.0})
    data = open_dataset(embedded_data)
    window = WindowLoader(data.split("train"), 4, 0).next_batch(method.window_length(16, 1))
    module = TrainModule(cfg, data.vocab_size, torch.device("cpu"))
    ours = module.loss(window, 1, "both").loss
    logits = module.model(input_ids=window[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("mode", ["input", "output"])
def test_ablation_modes_train(tiny_config, mode):
    result = train(tiny_config(mode, tst={"mode": mode}, train={"steps": 8}), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    tokens = rows[0]["text_tokens"]
    assert tokens == 4 * method.window_length(16, 4, mode)


def test_gradient_accumulation_matches_full_batch(tiny_config):
    a = train(tiny_config("full", train={"steps": 3}, optim={"warmup_steps": 1}), progress=False)
    b = train(tiny_config("accum", train={"steps": 3, "micro_batch_size": 2}, optim={"warmup_steps": 1}), progress=False)
    for (_, x), (_, y) in zip(losses(a.run_dir), losses(b.run_dir)):
        assert x == pytest.approx(y, abs=1e-5)


def test_moe_preset_trains_with_router_loss(tiny_config):
    result = train(tiny_config("moe", model={"preset": "tiny-moe"}, train={"steps": 8}), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert all(r["aux_loss"] > 0 for r in rows)


@pytest.mark.parametrize("option", [{"loss_chunk": 24}, {"activation_checkpointing": True}])
def test_memory_options_keep_the_losses(tiny_config, option):
    """The fused chunked loss and activation checkpointing change memory, not the numbers (within fp32 noise)."""
    plain = train(tiny_config("plain", train={"steps": 8}), progress=False)
    other = train(tiny_config("other", train={"steps": 8, **option}), progress=False)
    for (_, x), (_, y) in zip(losses(plain.run_dir), losses(other.run_dir)):
        assert x == pytest.approx(y, abs=1e-5)


@pytest.mark.slow
def test_compiled_blocks_train_across_the_phase_switch(tiny_config):
    """train.compile compiles each block once for both phases (they see L positions); same losses within fp32 noise."""
    plain = train(tiny_config("plain", train={"steps": 8}), progress=False)
    compiled = train(tiny_config("compiled", train={"steps": 8, "compile": True}), progress=False)
    rows = read_metrics(compiled.run_dir / "metrics.jsonl")
    assert [r["bag"] for r in rows] == [4] * 4 + [1] * 4
    for (_, x), (_, y) in zip(losses(plain.run_dir), losses(compiled.run_dir)):
        assert x == pytest.approx(y, abs=1e-4)


class SwitchLosses(Callback):
    """A monitor added from outside the loop: the train loss at every phase switch and at one step of its choice,
    which it makes a logged step by wanting a row there."""

    def __init__(self, switches: set[int], extra: int):
        self.steps, self.seen = switches | {extra}, {}

    def wants_row(self, done: int) -> bool:
        return done in self.steps

    def log_metrics(self, row: dict) -> None:
        if row["step"] in self.steps:
            self.seen[row["step"]] = row["train_loss"]


def test_a_callback_added_through_train_gets_the_rows_it_wants(tiny_config):
    quiet = {"train": {"log_every": 12}, "eval": {"every": 0}, "checkpoint": {"every": 0}}  # bag 4 -> 1 at step 6
    plain = train(tiny_config("plain", **quiet), progress=False)
    monitor = SwitchLosses({6}, extra=2)
    watched = train(tiny_config("watched", **quiet), progress=False, callbacks=[monitor])
    before = {r["step"]: r for r in read_metrics(plain.run_dir / "metrics.jsonl")}
    rows = {r["step"]: r for r in read_metrics(watched.run_dir / "metrics.jsonl")}
    assert sorted(before) == [6, 7, 12]  # the switch, the step after it (the spike line), the last
    assert sorted(rows) == [2, 6, 7, 12]  # and the step the monitor asked for
    assert monitor.seen == {step: rows[step]["train_loss"] for step in (2, 6)}
    assert all(rows[step]["train_loss"] == before[step]["train_loss"] for step in before)  # it only watched


def test_throughput_window_holds_training_steps_only(tiny_config, monkeypatch):
    """On a clock that moves 1 s per step, 100 s in the first (warm-up) step and 1000 s in every evaluation and
    checkpoint, every throughput figure is 1 s per step: none of that time is in a window."""
    clock = [0.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def takes(seconds, real, first=None):
        calls = [0]

        def timed(*args, **kwargs):
            clock[0] += first if first is not None and calls[0] == 0 else seconds
            calls[0] += 1
            return real(*args, **kwargs)
        return timed

    monkeypatch.setattr(TrainModule, "train_step", takes(1.0, TrainModule.train_step, first=100.0))
    monkeypatch.setattr(TrainModule, "eval_loss", takes(1000.0, TrainModule.eval_loss))
    monkeypatch.setattr(loop, "save_checkpoint", takes(1000.0, loop.save_checkpoint))
    cfg = tiny_config(train={"log_every": 2}, eval={"every": 2}, checkpoint={"every": 2})
    rows = {r["step"]: r for r in read_metrics(train(cfg, progress=False).run_dir / "metrics.jsonl")}
    assert sorted(rows) == [2, 4, 6, 7, 8, 10, 12] and all("val_loss" in rows[s] for s in (2, 4, 6, 8, 10, 12))
    assert all(r["step_time"] == 1.0 for r in rows.values())
    assert rows[4]["tokens_per_s"] == (rows[4]["text_tokens"] - rows[2]["text_tokens"]) / 2.0
    assert rows[2]["positions_per_s"] == 4 * 16  # step 2 alone: one batch of B x L positions in 1 s


def test_start_up_builds_the_model_and_parses_the_train_state_once(tiny_config, monkeypatch):
    """The meta shell built to refuse a bad model is the one TrainModule wraps; a resume parses state.json once."""
    from superpose.train import state, step

    builds, parses = [], []
    monkeypatch.setattr(loop, "build_model", lambda *a, _real=loop.build_model, **k: builds.append(a) or _real(*a, **k))
    monkeypatch.setattr(step, "build_model", lambda *a, _real=step.build_model, **k: builds.append(a) or _real(*a, **k))
    cfg = tiny_config(train={"steps": 4})
    train(cfg, progress=False)
    assert len(builds) == 1
    real = state.TrainState.from_state_dict.__func__
    monkeypatch.setattr(state.TrainState, "from_state_dict",
                        classmethod(lambda cls, *a: parses.append(a) or real(cls, *a)))
    shutil.rmtree(list_checkpoints(cfg.run_dir)[-1])
    assert train(cfg, resume=True, progress=False).steps == 4 and len(parses) == 1


def test_throughput_on_cuda_waits_once_and_reports_both_mfu_figures(monkeypatch):
    """The CUDA branch, on a CPU: the warm-up step is waited for once (no other sync), every row has peak memory,
    and MFU is the window's FLOP rate over the H200 peak, counted both ways (causal attention and PaLM's)."""
    from superpose.flops import flops_per_step
    from superpose.models import model_config
    from superpose.train.state import TrainState

    synced, clock = [], [0.0]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    config, state, cuda = model_config("tiny", 512), TrainState(), torch.device("cuda")
    throughput = callbacks.Throughput(state, 4, 16, config, cuda, world_size=1)
    rows = []
    for step, seconds in enumerate([50.0, 2.0, 2.0]):  # a slow first step (compilation), then 2 s per step
        throughput.pre_step(step)
        clock[0] += seconds
        state.advance(4 * 17, 0, clock[0])
        throughput.post_step(step + 1, None)
        if step != 1:  # rows at steps 1 and 3
            rows.append({})
            throughput.log_metrics(rows[-1])
    assert synced == [cuda]
    assert rows[0] == {"peak_memory_gb": 3.0}  # step 1 alone: no window
    assert rows[1]["step_time"] == 2.0 and rows[1]["peak_memory_gb"] == 3.0
    for key, causal in (("mfu", True), ("mfu_noncausal", False)):
        assert rows[1][key] == pytest.approx(flops_per_step(config, 4, 16, causal=causal) / 2.0 / 989e12)
