"""Crash safety and numerical faults: a killed run resumes with the losses of an uninterrupted one."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config, torchrun
from safetensors.torch import load_file

from superpose.errors import TrainingStopped
from superpose.train import loop
from superpose.train.checkpoint import list_checkpoints
from superpose.train.faults import KILL_ENV, StopSignals
from superpose.train.loop import train
from superpose.train.metrics import read_metrics
from superpose.train.step import TrainModule


def cli(config_path, *args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "superpose", "train", str(config_path), "--quiet", *args],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, **kwargs)


def losses(run_dir):
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(embedded_data, tmp_path_factory):
    """Losses of an uninterrupted run in a subprocess (the same way the killed runs train)."""
    cfg = make_tiny_config(embedded_data, tmp_path_factory.mktemp("reference"), "reference")
    path = cfg.run_dir.parent / "reference.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_toml())
    assert cli(path).returncode == 0
    return losses(cfg.run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint:6", "step:6", "checkpoint:8", "manifest:8", "step:11"])
def test_sigkill_then_resume_gives_uninterrupted_losses(tiny_config, tmp_path, reference, point):
    """Killed mid-checkpoint-write (after the weights; after every file but the manifest), right at the phase switch
    (step 6) and mid-run in phase 2 (step 11): resume, same losses. (A kill mid-phase-1 replays phase-1 steps from a
    checkpoint, which checkpoint:6 does too: it resumes from step 4.)"""
    cfg = tiny_config("killed")
    path = tmp_path / "killed.toml"
    path.write_text(cfg.to_toml())
    died = cli(path, env={KILL_ENV: point})
    assert died.returncode == -signal.SIGKILL
    where, step = point.split(":")[0], int(point.split(":")[1])
    in_write = where in ("checkpoint", "manifest")
    complete = [p.name for p in list_checkpoints(cfg.run_dir)]
    assert all(int(name.split("-")[1]) < step or not in_write for name in complete)
    if in_write:
        half = cfg.run_dir / "checkpoints" / f".tmp-step-{step:07d}"
        assert half.is_dir() and (where == "checkpoint") != (half / "state.json").is_file()  # the half-written one
    resumed = cli(path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(cfg.run_dir) == reference
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))


HELD_WORKER = """
import sys, time
from pathlib import Path
from torch.distributed.checkpoint import FileSystemWriter
from superpose.cli import main

real, metrics = FileSystemWriter.write_data, Path(sys.argv.pop(1))

def write_data(writer, plan, planner):  # step 8's checkpoint is written once the loop has logged step 10
    deadline = time.time() + 60  # (a loop that waits for this write never logs it)
    while "step-0000008" in str(writer.path) and '"step": 10,' not in metrics.read_text() and time.time() < deadline:
        time.sleep(0.01)
    return real(writer, plan, planner)

FileSystemWriter.write_data = write_data
sys.exit(main())
"""


def torchrun_killed(config_path, metrics, point: str) -> subprocess.CompletedProcess:
    """``superpose train`` on 2 gloo ranks under torchrun with ``SUPERPOSE_KILL_AT=point``, each worker holding
    step 8's background checkpoint write until ``metrics`` logs step 10 (conftest.torchrun, which requires success,
    for the rest)."""
    worker = Path(config_path).with_name("held_worker.py")
    worker.write_text(HELD_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(metrics), "train", str(config_path), "--quiet"],
                          env={**env, KILL_ENV: point}, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_rank_reference(embedded_data, tmp_path_factory):
    """Losses of an uninterrupted run on 2 gloo ranks (FSDP2, so DCP checkpoints, written in the background)."""
    cfg = make_tiny_config(embedded_data, tmp_path_factory.mktemp("two-ranks"), "reference", train={"parallel": "fsdp"})
    path = cfg.run_dir.parent / "reference.toml"
    path.write_text(cfg.to_toml())
    torchrun(path)
    return losses(cfg.run_dir)


@pytest.mark.slow
def test_sigkill_with_a_background_checkpoint_in_flight_resumes_from_the_last_complete_one(
        embedded_data, tmp_path, two_rank_reference):
    """checkpoint.async on 2 ranks: killed inside the background write of step 8's checkpoint, at its last moment
    (every file written, DCP's on every rank, all but the manifest on rank 0), after the loop trained on to step 10.
    Step 6's checkpoint is the newest complete one; --resume takes it and gives the uninterrupted losses exactly
    (same world size). (The earlier kill point inside the write, ``checkpoint:8``, leaves less behind: the
    in-place kill tests cover it.)"""
    point = "manifest:8"
    cfg = make_tiny_config(embedded_data, tmp_path / "runs", "killed", train={"parallel": "fsdp"})
    path = tmp_path / "killed.toml"
    path.write_text(cfg.to_toml())
    died = torchrun_killed(path, cfg.run_dir / "metrics.jsonl", point)
    assert died.returncode != 0, died.stderr[-2000:]
    assert losses(cfg.run_dir)[-1][0] >= 10  # the loop trained on while step 8's checkpoint was being written
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-0000004", "step-0000006"]
    half = cfg.run_dir / "checkpoints" / ".tmp-step-0000008"
    assert (half / "dcp" / ".metadata").is_file() and not (half / "manifest.sha256").exists()
    torchrun(path, "--resume")
    assert losses(cfg.run_dir) == two_rank_reference
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(tiny_config, tmp_path, reference):
    cfg = tiny_config("terminated", train={"steps": 12, "log_every": 1})
    path = tmp_path / "terminated.toml"
    path.write_text(cfg.to_toml())
    proc = subprocess.Popen([sys.executable, "-m", "superpose", "train", str(path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    rows = read_metrics(metrics)
    if rows[-1]["step"] < 12:  # the signal arrived before the run ended (the usual case)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "stopped by SIGTERM" in out
        assert list_checkpoints(cfg.run_dir)[-1].name == f"step-{rows[-1]['step']:07d}"
        assert cli(path, "--resume").returncode == 0
    assert losses(cfg.run_dir) == reference


def test_partial_checkpoint_and_metrics_line_are_ignored(tiny_config):
    cfg = tiny_config()
    full = train(cfg, progress=False)
    expected = losses(full.run_dir)
    # what a kill mid-write leaves: a temporary checkpoint folder and half a JSON line
    (cfg.run_dir / "checkpoints" / ".tmp-step-0000010").mkdir()
    for ckpt in list_checkpoints(cfg.run_dir)[-2:]:
        shutil.rmtree(ckpt)
    with open(cfg.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "train_lo')
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-0000004", "step-0000006"]
    train(cfg, resume=True, progress=False)
    assert losses(cfg.run_dir) == expected
    assert not (cfg.run_dir / "checkpoints" / ".tmp-step-0000010").exists()


def poison(monkeypatch, bad_steps):
    """Make the loss non-finite on the given (1-based) optimizer steps, as an overflow would."""
    real = TrainModule.loss
    calls = {"n": 0}

    def loss(self, window, bag, mode):
        out = real(self, window, bag, mode)
        if self.model.training:
            calls["n"] += 1
            if calls["n"] in bad_steps:
                out = out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(TrainModule, "loss", loss)


def test_nonfinite_step_is_skipped_and_counted(tiny_config, monkeypatch):
    poison(monkeypatch, {3, 7})
    result = train(tiny_config(), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert skipped == [3, 7]
    assert rows[-1]["step"] == 12 and torch.isfinite(torch.tensor(result.final_val_loss))


def test_last_step_nonfinite_still_reports_a_final_validation(tiny_config, monkeypatch):
    poison(monkeypatch, {12})
    result = train(tiny_config(), progress=False)
    last = read_metrics(result.run_dir / "metrics.jsonl")[-1]
    assert last["step"] == 12 and last["skipped"] == 1 and last["val_loss"] == result.final_val_loss


def test_checkpoint_set_aside_for_replacement_is_restored(tiny_config):
    cfg = tiny_config()
    train(cfg, progress=False)
    folder = cfg.run_dir / "checkpoints"
    # a kill after the old step-12 was set aside and before the new one was renamed into place
    (folder / "step-0000012").rename(folder / ".old-step-0000012")
    (folder / ".tmp-step-0000012").mkdir()
    train(cfg, resume=True, progress=False)  # nothing left to train: it only cleans up and reports
    assert (folder / "step-0000012" / "state.json").is_file()
    assert not list(folder.glob(".*"))


def test_nonfinite_weights_never_reach_the_model(tiny_config, monkeypatch):
    poison(monkeypatch, {2})
    cfg = tiny_config(train={"steps": 2}, optim={"warmup_steps": 0}, checkpoint={"every": 1, "keep": 5})
    train(cfg, progress=False)
    one = load_file(cfg.run_dir / "checkpoints/step-0000001/model.safetensors")
    two = load_file(cfg.run_dir / "checkpoints/step-0000002/model.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)  # the skipped step changed nothing


def test_stop_policy_checkpoints_last_good_state(tiny_config, monkeypatch):
    poison(monkeypatch, {5})
    cfg = tiny_config(train={"nonfinite": "stop"})
    with pytest.raises(TrainingStopped, match="non-finite loss or gradient by step 5") as e:
        train(cfg, progress=False)
    assert e.value.exit_code == 3
    assert list_checkpoints(cfg.run_dir)[-1].name == "step-0000005"


def test_too_many_skips_in_a_row_stop(tiny_config, monkeypatch):
    poison(monkeypatch, {2, 3, 4})
    cfg = tiny_config(train={"max_skips": 3})
    with pytest.raises(TrainingStopped, match="3 in a row"):
        train(cfg, progress=False)


def test_the_stop_flag_is_agreed_once_per_step(tiny_config, monkeypatch):
    """Ranks agree on a stop request at the step boundary only, not between micro-batches (4 per step here)."""
    calls = []
    real = loop.any_rank
    monkeypatch.setattr(loop, "any_rank", lambda flag, info: calls.append(flag) or real(flag, info))
    result = train(tiny_config(train={"micro_batch_size": 1}), progress=False)
    assert result.steps == 12 and len(calls) == 1 + 12  # the run folder's lock, then once per step


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_repeated_sigterm_is_ignored_while_stopping():
    """SLURM signals every process of the step and torchrun forwards its own: repeats must not kill the worker
    (in a child process: a repeat that kills would take pytest with it)."""
    child = run_python(
        "import os, signal, time\n"
        "from superpose.train.faults import StopSignals\n"
        "with StopSignals() as signals:\n"
        "    for _ in range(3):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.05)\n"
        "    print(signals.name)\n"
        "print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n")
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["SIGTERM", "True"]  # stopping, alive; the default handler back afterwards


def test_second_sigint_interrupts_at_once():
    """Ctrl-C asks for a stop after the step; Ctrl-C again is a person who wants out: KeyboardInterrupt."""
    # raise_signal delivers to this thread, so the handler runs before the next line; os.kill(getpid()) may go to a
    # thread an earlier test left running, and the handler then runs only after the block has ended
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGINT)
        assert signals.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_a_second_sigterm_during_the_stop_still_leaves_the_checkpoint(tiny_config, tmp_path):
    """A run that receives SIGTERM twice after step 3 (a callback sends them: the second arrives while the stop is
    in progress) still writes step 3's checkpoint and reports the stop."""
    cfg = tiny_config("twice")
    path = tmp_path / "twice.toml"
    path.write_text(cfg.to_toml())
    child = run_python(
        "import os, signal, time\n"
        "from superpose.train.callbacks import Callback\n"
        "from superpose.train.config_load import load_config\n"
        "from superpose.train.loop import train\n"
        "class TermTwice(Callback):\n"
        "    def post_step(self, done, result):\n"
        "        for _ in range(2 if done == 3 else 0):\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            time.sleep(0.05)\n"
        f"result = train(load_config({str(path)!r}), progress=False, callbacks=[TermTwice()])\n"
        "print(result.stopped, result.steps)\n")
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[-2:] == ["SIGTERM", "3"]
    assert list_checkpoints(cfg.run_dir)[-1].name == "step-0000003"
    assert [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl")][-1] == 3
