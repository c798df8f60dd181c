"""torchrun with 2 gloo processes on CPU: FSDP2 and DDP match one process; DCP checkpoints resume at any world size."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import make_tiny_config
from safetensors.torch import load_file

from superpose.export import export
from superpose.train.checkpoint import list_checkpoints
from superpose.train.loop import train
from superpose.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def torchrun(config_path, *args, nproc=2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "superpose", "train", str(config_path), "--quiet", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(run_dir):
    return read_metrics(run_dir / "metrics.jsonl")


def assert_same_losses(a, b, tol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["bag"] == y["bag"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=tol), x["step"]
        assert x.get("val_loss", 0.0) == pytest.approx(y.get("val_loss", 0.0), abs=tol), x["step"]
        assert x["text_tokens"] == y["text_tokens"]


@pytest.fixture(scope="module")
def runs(embedded_data, tmp_path_factory):
    """One single-process run and its config factory; all runs share B=4, 12 steps, a switch at step 6."""
    root = tmp_path_factory.mktemp("dist")

    def config(name, **sections):
        cfg = make_tiny_config(embedded_data, root / "runs", name, **sections)
        path = root / f"{name}.toml"
        path.write_text(cfg.to_toml())
        return cfg, path

    single, _ = config("single")
    train(single, progress=False)
    return config, rows(single.run_dir)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_ranks_match_one_process(runs, parallel):
    config, reference = runs
    cfg, path = config(parallel, train={"parallel": parallel})
    torchrun(path)
    assert_same_losses(rows(cfg.run_dir), reference)
    switch = cfg.run_dir / "checkpoints" / "step-0000006"
    assert (switch / "dcp" / ".metadata").is_file() and not (switch / "model.safetensors").exists()
    # the sharded run exports to the same plain Hugging Face layout as a single-process run
    sharded = load_file(export(cfg.run_dir, cfg.run_dir.parent / f"{parallel}-hf") / "model.safetensors")
    single = make_tiny_config(cfg.data.path, cfg.out_dir, "single").run_dir
    plain = load_file(export(single, cfg.run_dir.parent / f"single-hf-{parallel}") / "model.safetensors")
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in plain.items()}
    assert max((sharded[k] - plain[k]).abs().max().item() for k in plain) < 1e-4


def test_dcp_resume_and_resume_on_one_rank(runs):
    config, reference = runs
    cfg, path = config("fsdp-resume", train={"parallel": "fsdp"})
    torchrun(path)
    full = rows(cfg.run_dir)
    # 2 ranks -> 1 process, from the phase-switch checkpoint
    solo, _ = config("solo")
    train(solo, resume=cfg.run_dir / "checkpoints" / "step-0000006", progress=False)
    assert_same_losses(rows(solo.run_dir), [r for r in full if r["step"] > 6])
    # 2 ranks -> 2 ranks, as after a crash past step 4
    for ckpt in list_checkpoints(cfg.run_dir):
        if ckpt.name > "step-0000004":
            shutil.rmtree(ckpt)
    torchrun(path, "--resume")
    assert_same_losses(rows(cfg.run_dir), full)


def test_one_process_checkpoint_resumes_on_two_ranks(runs):
    config, reference = runs
    cfg, path = config("grow", train={"parallel": "fsdp"})
    single = make_tiny_config(cfg.data.path, cfg.out_dir, "single")
    torchrun(path, f"--resume={single.run_dir / 'checkpoints' / 'step-0000004'}")
    assert_same_losses(rows(cfg.run_dir), [r for r in reference if r["step"] > 4])


def test_moe_trains_under_fsdp(runs):
    config, _ = runs
    cfg, path = config("moe", model={"preset": "tiny-moe"}, train={"parallel": "fsdp", "steps": 8})
    torchrun(path)
    out = rows(cfg.run_dir)
    assert [r["step"] for r in out] == list(range(1, 9))
    assert all(r["aux_loss"] > 0 and r["expert_load_max"] >= 1.0 and r["expert_load_cv"] >= 0 for r in out)
