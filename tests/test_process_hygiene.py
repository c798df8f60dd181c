"""Process-group hygiene at scale (issue 20 item 3): a shorter collective timeout once the first step is done, and
Python's garbage collection on a fixed step cadence on every rank instead of whenever one rank's allocator decides."""

from __future__ import annotations

import gc
from datetime import timedelta

import torch
import torch.distributed as dist

from superpose.train import callbacks as callbacks_module
from superpose.train.callbacks import Callback
from superpose.train.distributed import data_parallel_mesh, set_collective_timeout, shutdown
from superpose.train.loop import train


class StepProbe(Callback):
    """Records the steps done (at post_step, before any end_step) and whether automatic collection was on."""

    def __init__(self):
        self.done: list[int] = []
        self.gc_enabled: list[bool] = []

    def post_step(self, done, result):
        self.done.append(done)
        self.gc_enabled.append(gc.isenabled())


def test_garbage_is_collected_on_the_cadence_and_never_automatically_while_training(tiny_config, monkeypatch):
    probe, collected = StepProbe(), []
    real = gc.collect

    def collect(generation: int = 2) -> int:
        collected.append((generation, len(probe.done)))
        return real(generation)

    monkeypatch.setattr(gc, "collect", collect)
    assert gc.isenabled()
    train(tiny_config("gc", train={"steps": 7, "gc_every": 3}), progress=False, callbacks=[probe])
    assert probe.done == list(range(1, 8))
    assert not any(probe.gc_enabled)  # automatic collection off for the whole run
    assert gc.isenabled()  # and given back afterwards
    assert (2, 0) in collected  # one full collection before the first step
    assert [after for generation, after in collected if generation == 1] == [3, 6]


def test_gc_every_zero_leaves_pythons_collector_alone(tiny_config):
    probe = StepProbe()
    train(tiny_config("gc-off", train={"steps": 4, "gc_every": 0}), progress=False, callbacks=[probe])
    assert probe.gc_enabled == [True] * 4


def test_collective_timeout_is_shortened_once_after_the_first_step(tiny_config, monkeypatch):
    probe, calls = StepProbe(), []
    monkeypatch.setattr(callbacks_module, "set_collective_timeout", lambda s: calls.append((s, len(probe.done))))
    train(tiny_config("timeout", train={"steps": 4, "collective_timeout": 90}), progress=False, callbacks=[probe])
    assert calls == [(90, 1)]


def test_collective_timeout_zero_keeps_torchs_default(tiny_config, monkeypatch):
    calls = []
    monkeypatch.setattr(callbacks_module, "set_collective_timeout", calls.append)
    train(tiny_config("timeout-off", train={"steps": 4, "collective_timeout": 0}), progress=False)
    assert calls == []


def test_set_collective_timeout_reaches_every_group_of_the_job():
    """The default group and the mesh's groups (gloo on one rank here) get the new timeout; torch's default before."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = data_parallel_mesh(torch.device("cpu"), 1)
        groups = [dist.group.WORLD, *mesh.get_all_groups()]
        backends = [g._get_backend(torch.device("cpu")) for g in groups]
        assert all(b.options._timeout == timedelta(minutes=30) for b in backends)
        set_collective_timeout(7)
        assert all(b.options._timeout == timedelta(seconds=7) for b in backends)
    finally:
        shutdown()
