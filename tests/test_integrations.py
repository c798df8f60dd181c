"""Integrations: TST inside a Hugging Face Trainer, and W&B logging (offline)."""

import importlib.util
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from superpose.errors import SuperposeError
from superpose.integrations.transformers import (
    TSTBatchSampler,
    TSTTrainer,
)
from superpose.method import window_length
from superpose.schedule import PhaseSchedule
from superpose.train.config import LogConfig
from superpose.train.metrics import WANDB_ID_FILE, MetricsWriter
from superpose.train.step import TrainModule

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_tst.py"


def load_example():
    spec = importlib.util.spec_from_file_location("hf_trainer_tst", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_end_to_end_with_a_phase_switch(embedded_data, tmp_path):
    trainer = load_example().main(["--data", str(embedded_data), "--steps", "8", "--bag", "4", "--ratio", "0.5",
                                   "--out", str(tmp_path / "out")])
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["bag"] for r in rows] == [4] * 4 + [1] * 4
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_tst_trainer_loss_at_bag_1_is_the_plain_trainer_loss(embedded_data, tmp_path):
    dataset, vocab_size = load_example().token_chunks(embedded_data, 17)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True)
    batch = torch.tensor(dataset[:4]["input_ids"])
    plain = Trainer(model=model, args=args, train_dataset=dataset)
    tst = TSTTrainer(model=model, args=args, train_dataset=dataset, bag=4, ratio=0.5)
    with torch.no_grad():
        expected = plain.compute_loss(model, {"input_ids": batch, "labels": batch})
        got = tst.compute_loss(model, {"input_ids": batch, "bag": 1})
        bagged = tst.compute_loss(model, {"input_ids": batch.view(1, -1), "bag": 4})
    diff = (got - expected).abs().item()
    print(f"TSTTrainer bag-1 loss {got.item():.8f} vs Trainer {expected.item():.8f}: |diff| = {diff:.3g}")
    assert diff <= 1e-6
    assert math.isfinite(bagged.item()) and bagged.item() != got.item()


@pytest.mark.parametrize(("mode", "preset"), [("both", "tiny"), ("input", "tiny"), ("output", "tiny"),
                                             ("both", "tiny-moe")])
def test_tst_trainer_step_equals_the_trainer_step(mode, preset, tiny_config, tmp_path):
    """The same batch through ``TrainModule.train_step`` and ``TSTTrainer.training_step``: the same loss and the same
    gradients, with the options a TST run sets (power weighting, rescaled bag means, the fused chunked loss) and, for
    MoE, the router loss at the model's coefficient."""
    cfg = tiny_config(model={"preset": preset}, tst={"mode": mode, "weighting": "power", "alpha": 0.5,
                                                     "rescale_mean": True},
                      train={"loss_chunk": 24}, optim={"grad_clip": 0.0})
    module = TrainModule(cfg, 512, torch.device("cpu"))
    bag, seq_len = cfg.tst.bag, cfg.train.seq_len
    window = torch.randint(0, 512, (4, window_length(seq_len, bag, mode)), generator=torch.Generator().manual_seed(3))
    grads = {}
    module.optimizer.step = lambda: grads.update((n, p.grad.clone()) for n, p in module.model.named_parameters())
    step = module.train_step(window, bag, lr=1e-3)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=cfg.train.steps,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True)
    trainer = TSTTrainer(model=module.model, args=args, train_dataset=[{"input_ids": [0] * (seq_len + 1)}] * 64,
                         bag=bag, ratio=cfg.tst.ratio, mode=mode, weighting="power", alpha=0.5, rescale_mean=True,
                         loss_chunk=24)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this step runs outside of
    loss = trainer.training_step(trainer.model, {"input_ids": window, "bag": bag})
    minimised = step.loss if step.aux_loss is None else step.loss + module.objective.aux_coef * step.aux_loss
    assert loss.item() == pytest.approx(minimised.item(), abs=1e-6)
    for name, param in module.model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert (step.aux_loss is not None) == (preset == "tiny-moe")


def test_sampler_reads_every_chunk_once_per_epoch_in_a_fresh_order():
    N, B, accum = 61, 3, 2
    schedule = PhaseSchedule([(3, 4), (1.0, 1)], total_steps=40)
    sampler = TSTBatchSampler(N, B, schedule, grad_accum=accum, seed=5)
    batches = [batch for _ in range(3) for batch in sampler]  # three Trainer epochs: the stream continues
    assert [len(b) for b in batches[:8]] == [12] * 6 + [3] * 2  # 3 steps of 2 micro-batches at bag 4, then bag 1
    stream = np.concatenate(batches)
    epochs = [stream[e * N:(e + 1) * N] for e in range(len(stream) // N)]
    assert len(epochs) >= 3
    for order in epochs:
        assert sorted(order) == list(range(N))  # every chunk exactly once per epoch, across the switch
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0][:20], np.arange(20))  # not text order
    for row in stream[:3 * accum * B * 4].reshape(-1, 4):  # a bag-4 row is 4 consecutive chunks: contiguous text
        assert ((row[1:] - row[:-1]) % N == 1).all(), row
    bag_1 = np.array([b for b in batches if len(b) == B])  # rows from B blocks across the corpus, not B neighbours
    assert ((bag_1[:, 1:] - bag_1[:, :-1]) % N == 1).mean() < 0.25
    other = np.concatenate([b for b in TSTBatchSampler(N, B, schedule, accum, seed=6)])
    assert not np.array_equal(other, stream[:len(other)])
    assert sampler.epoch(40) == (3 * accum * B * 4 + 37 * accum * B) / N


def test_sampler_refuses_bags_that_do_not_nest():
    with pytest.raises(SuperposeError, match="divide the bag before it"):
        TSTBatchSampler(100, 2, PhaseSchedule([(2, 6), (4, 4), (1.0, 1)], total_steps=8))


def test_sampler_resumes_at_any_step_and_splits_the_global_batch_across_ranks():
    N, accum = 50, 2
    schedule = PhaseSchedule([(0.5, 4), (1.0, 1)], total_steps=8)
    sampler = TSTBatchSampler(N, 4, schedule, accum, seed=1)
    whole = [b for _ in range(2) for b in sampler]
    for step in (1, 4, 5):
        resumed = TSTBatchSampler(N, 4, schedule, accum, seed=1)
        resumed.seek(step)
        assert list(resumed) == whole[step * accum: step * accum + len(resumed)]
    ranks = [iter(TSTBatchSampler(N, 2, schedule, accum, seed=1, rank=r, world_size=2)) for r in range(2)]
    for batch in whole[:len(TSTBatchSampler(N, 4, schedule, accum))]:
        assert next(ranks[0]) + next(ranks[1]) == batch


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))


def test_epoch_counts_chunks_read_and_flos_count_positions_run(embedded_data, tmp_path):
    """At equal steps a TST run and its baseline run the same positions, so the Trainer's FLOPs are equal; TST reads
    ``bag`` times more chunks in phase 1, which the epoch reports."""
    dataset, vocab_size = load_example().token_chunks(embedded_data, 17)
    B, steps = 4, 4
    states = {}
    for name, bag in (("tst", 4), ("baseline", 1)):
        model = tiny_llama(vocab_size)
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=steps, per_device_train_batch_size=B,
                                 logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        trainer = TSTTrainer(model=model, args=args, train_dataset=dataset, bag=bag, ratio=0.5)
        trainer.train()
        states[name] = trainer.state
    positions = B * 16 * steps  # L = 16 positions per row at every bag
    assert states["tst"].total_flos == states["baseline"].total_flos == 6 * model.num_parameters(
        exclude_embeddings=True) * positions
    chunks = {"tst": B * (4 * 2 + 1 * 2), "baseline": B * steps}
    for name, state in states.items():
        logged = [r["epoch"] for r in state.log_history if "loss" in r]
        assert logged[-1] == pytest.approx(chunks[name] / len(dataset)), name
        assert state.epoch == pytest.approx(chunks[name] / len(dataset)), name


def test_streaming_dataset_is_refused(tmp_path):
    from datasets import Dataset

    stream = Dataset.from_dict({"input_ids": [[1] * 9] * 64}).to_iterable_dataset()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True)
    with pytest.raises(SuperposeError, match="IterableDataset") as info:
        TSTTrainer(model=tiny_llama(16), args=args, train_dataset=stream)
    assert "\n" not in str(info.value)


def test_resume_through_the_trainer_with_workers_continues_exactly(embedded_data, tmp_path):
    """``trainer.train(resume_from_checkpoint=...)`` after step 3 of 6 (across the switch at 3) logs the losses of the
    uninterrupted run; the resumed half reads its batches through 2 data loader workers."""
    example = load_example()
    common = ["--data", str(embedded_data), "--steps", "6", "--bag", "4", "--ratio", "0.5", "--batch-size", "4",
              "--block-size", "17"]
    whole = example.main(common + ["--out", str(tmp_path / "whole")])
    example.main(common + ["--out", str(tmp_path / "cut"), "--save-steps", "3"])
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")  # killed after its step-3 checkpoint
    resumed = example.main(common + ["--out", str(tmp_path / "cut"), "--resume", "last", "--workers", "2"])

    def losses(trainer):
        return {r["step"]: (r["loss"], r["bag"], r["epoch"]) for r in trainer.state.log_history if "loss" in r}

    assert sorted(losses(resumed)) == list(range(1, 7))  # steps 1-3 come from the checkpoint's trainer state
    assert losses(resumed) == losses(whole)


def torchrun(script: Path, args: list[str]) -> str:
    """Run ``script`` on 2 gloo ranks; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(launch + args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_ddp_ranks_read_their_rows_of_the_one_process_batch(embedded_data, tmp_path):
    """torchrun, 2 gloo ranks of 4 rows, against one process of 8 rows: the same losses, bags and weights."""
    common = ["--data", str(embedded_data), "--steps", "4", "--bag", "4", "--ratio", "0.5", "--block-size", "17"]
    torchrun(EXAMPLE, common + ["--batch-size", "4", "--out", str(tmp_path / "ddp")])
    load_example().main(common + ["--batch-size", "8", "--out", str(tmp_path / "one")])
    history = {}
    for name in ("ddp", "one"):
        log = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        history[name] = [(r["step"], r["bag"], r["epoch"], r["loss"]) for r in log if "loss" in r]
    assert [h[:3] for h in history["ddp"]] == [h[:3] for h in history["one"]]
    assert [h[3] for h in history["ddp"]] == pytest.approx([h[3] for h in history["one"]], abs=1e-5)
    ddp, one = (load_file(tmp_path / name / "model.safetensors") for name in ("ddp", "one"))
    assert max((ddp[k] - one[k]).abs().max().item() for k in one) < 1e-5


FSDP_WORKER = """
import copy, sys
import torch
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from superpose.integrations.transformers import TSTTrainer

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
args = TrainingArguments(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True)
trainer = TSTTrainer(model=model, args=args, train_dataset=[{"input_ids": [0] * 9}] * 64, bag=4)
rank, world = args.process_index, args.world_size
assert world == 2
reference = copy.deepcopy(model)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
windows = torch.randint(0, 64, (2 * world, 4 * 9), generator=torch.Generator().manual_seed(1))
ours = trainer.compute_loss(model, {"input_ids": windows[2 * rank: 2 * rank + 2], "bag": 4})
ours.backward()
expected = trainer.compute_loss(reference, {"input_ids": windows, "bag": 4})
expected.backward()
for (name, p), q in zip(model.named_parameters(), reference.parameters()):
    assert torch.allclose(p.grad.full_tensor(), q.grad, atol=1e-6), name
print("grads match", float(expected))
"""


@pytest.mark.slow
def test_tst_loss_under_fsdp2_matches_one_process(tmp_path):
    """Each of 2 gloo ranks scores its rows of the global batch through ``fully_shard`` modules (bag means are made
    inside the sharded forward): the averaged gradients are the one-process gradients of the whole batch.

    Accelerate enables FSDP only on accelerators, so the Trainer's own FSDP wrapping cannot run on CPU; this runs
    the objective TSTTrainer trains with under FSDP2 as the Trainer would call it."""
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    assert torchrun(script, [str(tmp_path / "out")]).count("grads match") == 2


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of an offline W&B run, read from its ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, payload, rows = path.read_bytes(), 7, b"", []  # 7-byte file header: ":W&B", magic, version
    block = 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a record header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(tmp_path, log=LogConfig(tensorboard=False, wandb=True), config={"tst": {"bag": 4}})
    for step, loss in [(1, 6.5), (2, 6.0), (3, 5.25)]:
        writer.write({"step": step, "phase": 1, "bag": 4, "train_loss": loss})
    writer.close()
    deadline = time.monotonic() + 60  # the W&B service process may still be flushing the file after finish()
    while len(rows := wandb_history(tmp_path)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [(r["_step"], r["train/loss"], r["tst/bag"]) for r in rows] == [(1, 6.5, 4), (2, 6.0, 4), (3, 5.25, 4)]
    assert (tmp_path / WANDB_ID_FILE).read_text() in str(next(tmp_path.glob("wandb/offline-run-*")))
    assert not (tmp_path / "tb").exists()


def test_log_section_controls_the_sinks(tiny_config, monkeypatch):
    from superpose.train.loop import train

    quiet = train(tiny_config("no-tb", train={"steps": 2}, optim={"warmup_steps": 0}, log={"tensorboard": False}),
                  progress=False)
    assert (quiet.run_dir / "metrics.jsonl").is_file() and not (quiet.run_dir / "tb").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SuperposeError, match=r"log.wandb: wandb is not installed \(pip install 'superpose\[wandb\]'\)"):
        tiny_config(log={"wandb": True})
