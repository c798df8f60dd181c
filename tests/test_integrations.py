"""Integrations: TST inside a Hugging Face Trainer, and W&B logging (offline)."""

import importlib.util
import json
import math
import struct
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from superpose.data.shards import open_dataset
from superpose.integrations.transformers import (
    TSTBatchSampler,
    TSTDataCollator,
    TSTTrainer,
)
from superpose.schedule import PhaseSchedule
from superpose.train.config import LogConfig
from superpose.train.metrics import WANDB_ID_FILE, MetricsWriter

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


def test_sampler_reads_contiguous_text_at_the_bag_of_each_step(embedded_data):
    stream = open_dataset(embedded_data).split("train")
    T, B, accum = 9, 3, 2
    chunks = stream.read(0, 90 * T).reshape(90, T)
    schedule = PhaseSchedule([(2, 4), (1.0, 1)], total_steps=5)
    sampler = TSTBatchSampler(len(chunks), B, schedule, grad_accum=accum)
    collate = TSTDataCollator(B)
    batches = [collate([{"input_ids": chunks[i]} for i in idx]) for idx in sampler]
    assert [b["bag"] for b in batches[:10]] == [4, 4, 4, 4, 1, 1, 1, 1, 1, 1]  # 2 steps of 2 micro-batches at bag 4
    lane = len(chunks) // B
    for b in range(B):  # row b reads lane b front to back: contiguous text whatever the bag
        text = torch.cat([batches[i]["input_ids"][b] for i in range(10)])
        assert torch.equal(text, torch.from_numpy(chunks[b * lane: b * lane + 22].reshape(-1)))
    resumed = TSTBatchSampler(len(chunks), B, schedule, grad_accum=accum)
    resumed.seek(3)  # a run resumed after 3 optimizer steps continues where the uninterrupted one was
    assert next(iter(resumed)) == [idx for i, idx in enumerate(TSTBatchSampler(len(chunks), B, schedule, accum)) if i == 6][0]


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
    assert [(r["_step"], r["train_loss"], r["bag"]) for r in rows] == [(1, 6.5, 4), (2, 6.0, 4), (3, 5.25, 4)]
    assert (tmp_path / WANDB_ID_FILE).read_text() in str(next(tmp_path.glob("wandb/offline-run-*")))
    assert not (tmp_path / "tb").exists()


def test_log_section_in_config(tiny_config):
    cfg = tiny_config(log={"wandb": True, "wandb_project": "p"})
    assert (cfg.log.wandb, cfg.log.wandb_project, cfg.log.tensorboard) == (True, "p", True)
    assert "[log]" in cfg.to_toml()
