"""checkpoint.async: DCP checkpoints are written, hashed and renamed into place by a background thread while the step
loop trains on; at most one is in flight, a new checkpoint, a stop and the end of the run wait for it, and the losses
are the same as with checkpoints written in place.

The trainer runs in this process as FSDP2 over a one-rank gloo group (how a CPU reaches DCP without torchrun); each
background write is held (at DCP's ``write_data``) until two more steps have trained or the main thread waits for it,
so "in flight" is deterministic. Kills with a save in flight are in tests/test_faults.py (2 gloo ranks, torchrun).
"""

import os
import signal
import threading
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

from superpose.errors import SuperposeError, TrainingStopped
from superpose.train import checkpoint as checkpoint_module
from superpose.train.callbacks import Callback
from superpose.train.checkpoint import BackgroundCheckpoints, list_checkpoints, read_state, verify_checkpoint
from superpose.train.config_load import config_from_dict
from superpose.train.distributed import shutdown
from superpose.train.loop import train
from superpose.train.metrics import read_metrics
from test_faults import poison


def losses(run_dir):
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(run_dir / "metrics.jsonl")]


def fsdp_train(cfg, callbacks=(), **kwargs):
    """``train`` as FSDP2 on a one-rank gloo group: its checkpoints are DCP folders (train's exit destroys it)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return train(cfg, progress=False, callbacks=callbacks, **kwargs)
    finally:
        shutdown()


class HeldWrites(Callback):
    """Holds every background write until two more steps have trained, or the main thread waits for it; records the
    steps trained while a checkpoint was in flight, how many were in flight at each start, and each
    ``post_checkpoint`` with whether that checkpoint was complete then."""

    def __init__(self, monkeypatch):
        self.gate = threading.Event()
        self.trained_in_flight: list[int] = []
        self.in_flight_at_start: list[Path | None] = []
        self.announced: list[tuple[str, bool]] = []
        self.background: BackgroundCheckpoints | None = None
        self._steps_held = 0
        real_write, real_start, real_wait = FileSystemWriter.write_data, BackgroundCheckpoints.start, \
            BackgroundCheckpoints.wait

        def write_data(writer, plan, planner):
            assert threading.current_thread() is not threading.main_thread()
            self.gate.wait()
            return real_write(writer, plan, planner)

        def start(background, *args, **kwargs):
            self.background, self._steps_held = background, 0
            self.in_flight_at_start.append(background.in_flight)
            self.gate.clear()
            return real_start(background, *args, **kwargs)

        def wait(background):
            self.gate.set()
            return real_wait(background)

        monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
        monkeypatch.setattr(BackgroundCheckpoints, "start", start)
        monkeypatch.setattr(BackgroundCheckpoints, "wait", wait)

    def post_step(self, done, result):
        if self.background is not None and not self.gate.is_set():  # a write is held: in flight for sure
            self.trained_in_flight.append(done)
            self._steps_held += 1
            if self._steps_held == 2:
                self.gate.set()

    def post_checkpoint(self, path):
        self.announced.append((path.name, path.is_dir() and (path / "manifest.sha256").is_file()))


@pytest.fixture(scope="module")
def sync_losses(embedded_data, tmp_path_factory):
    """The same FSDP2 run with every checkpoint written in place (checkpoint.async = false)."""
    from conftest import make_tiny_config

    cfg = make_tiny_config(embedded_data, tmp_path_factory.mktemp("sync"), "sync", train={"parallel": "fsdp"},
                           checkpoint={"every": 4, "keep": 2, "async": False})
    fsdp_train(cfg)
    assert (list_checkpoints(cfg.run_dir)[0] / "dcp" / ".metadata").is_file()
    return losses(cfg.run_dir)


def test_config_key_is_async(tiny_config):
    cfg = tiny_config(checkpoint={"async": False})
    assert cfg.checkpoint.async_ is False and tiny_config().checkpoint.async_ is True
    assert "async = false" in cfg.to_toml()
    assert config_from_dict(cfg.to_dict(), ["checkpoint.async=true"]).checkpoint.async_ is True
    with pytest.raises(SuperposeError, match="unknown config key checkpoint.async_ "):
        config_from_dict({"checkpoint": {"async_": True}})
    with pytest.raises(SuperposeError, match="checkpoint.async: expected bool"):
        config_from_dict({"checkpoint": {"async": "yes"}})


def test_training_goes_on_while_one_checkpoint_at_a_time_is_written(tiny_config, monkeypatch, sync_losses):
    """Steps train while a checkpoint is in flight, never two at once, each announced once complete; the end of the
    run waits for the last; the losses are those of checkpoints written in place, and resuming from a checkpoint
    written while training went on gives them again."""
    held = HeldWrites(monkeypatch)
    cfg = tiny_config("async", train={"parallel": "fsdp"})
    fsdp_train(cfg, callbacks=[held])
    assert held.trained_in_flight == [5, 6, 7, 8, 9, 10]  # saves of steps 4, 6 and 8 in flight, two steps each
    assert held.in_flight_at_start == [None] * 4  # steps 4, 6 (the switch), 8, 12: each waited for the one before
    assert held.announced == [(f"step-{s:07d}", True) for s in (4, 6, 8, 12)]
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == [f"step-{s:07d}" for s in (4, 6, 8, 12)]
    for path in list_checkpoints(cfg.run_dir):
        verify_checkpoint(path)
        assert (path / "dcp" / ".metadata").is_file() and read_state(path)["step"] == int(path.name[5:])
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))
    assert losses(cfg.run_dir) == sync_losses
    resumed = tiny_config("resumed", train={"parallel": "fsdp"})
    fsdp_train(resumed, resume=cfg.run_dir / "checkpoints" / "step-0000008")
    assert losses(resumed.run_dir) == [row for row in sync_losses if row[0] > 8]


def test_sigterm_waits_for_the_checkpoint_in_flight_and_its_own(tiny_config, monkeypatch, sync_losses):
    """SIGTERM after step 5, with step 4's checkpoint still being written: the stop waits for it, writes step 5's
    and waits for that too before the run returns; --resume continues with the uninterrupted losses."""
    held = HeldWrites(monkeypatch)

    class Terminate(Callback):
        def end_step(self, done):
            if done == 5:
                assert held.background.in_flight is not None and held.background.in_flight.name == "step-0000004"
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config("terminated", train={"parallel": "fsdp"})
    result = fsdp_train(cfg, callbacks=[held, Terminate()])
    assert result.stopped == "SIGTERM" and result.steps == 5
    assert held.announced == [("step-0000004", True), ("step-0000005", True)]
    for path in list_checkpoints(cfg.run_dir):
        verify_checkpoint(path)
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    fsdp_train(cfg, resume=True)
    assert losses(cfg.run_dir) == sync_losses


def test_the_nonfinite_stop_names_a_complete_checkpoint(tiny_config, monkeypatch):
    """train.nonfinite = stop raises with the path of the last good weights: that checkpoint is complete by then."""
    held = HeldWrites(monkeypatch)
    poison(monkeypatch, {5})
    cfg = tiny_config("stopped", train={"parallel": "fsdp", "nonfinite": "stop"})
    with pytest.raises(TrainingStopped, match="the last good weights are in .*step-0000005"):
        fsdp_train(cfg, callbacks=[held])
    assert held.announced == [("step-0000004", True), ("step-0000005", True)]
    verify_checkpoint(list_checkpoints(cfg.run_dir)[-1])


def test_a_failed_background_write_is_one_line_at_the_next_checkpoint(tiny_config, monkeypatch):
    """The disk fills while step 4's checkpoint is written in the background: the next checkpoint (the phase switch
    at step 6) reports it in one line, and nothing half-written is left where --resume would look."""

    def full_disk(path, checksums=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "write_manifest", full_disk)
    cfg = tiny_config("full", train={"parallel": "fsdp"})
    with pytest.raises(SuperposeError, match=r"^writing checkpoint step-0000004 failed: \[Errno 28\] No space left"):
        fsdp_train(cfg)
    assert list_checkpoints(cfg.run_dir) == [] and not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))
    assert read_metrics(cfg.run_dir / "metrics.jsonl")[-1]["step"] == 6  # trained on until it waited for step 4


def test_one_process_checkpoints_are_written_in_place(tiny_config, monkeypatch):
    """Without DCP (one process, no FSDP2) checkpoint.async changes nothing: safetensors, written in place."""
    started = []
    monkeypatch.setattr(BackgroundCheckpoints, "__init__", lambda *a, **k: started.append(a))
    cfg = tiny_config("plain", train={"steps": 4})
    train(cfg, progress=False)
    assert started == [] and (list_checkpoints(cfg.run_dir)[-1] / "model.safetensors").is_file()
