"""What keeps a run folder whole: one writer at a time, a restart command that also starts, checkpoints verified,
a full disk that loses nothing, and a log a person can read."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from superpose.errors import SuperposeError
from superpose.files import FolderLock
from superpose.train import checkpoint as checkpoint_module
from superpose.train.checkpoint import list_checkpoints
from superpose.train.loop import train
from superpose.train.metrics import read_metrics


def test_a_second_writer_is_refused_and_the_first_keeps_its_folder(tiny_config):
    cfg = tiny_config(train={"steps": 4})
    with FolderLock(cfg.run_dir, "run folder"):  # a live run holds it (flock is per open file, so this conflicts)
        with pytest.raises(SuperposeError, match="is in use by another process"):
            train(cfg, progress=False)
        assert not (cfg.run_dir / "metrics.jsonl").exists()
    assert train(cfg, progress=False).steps == 4  # released with its holder: no stale lock


def test_a_start_that_fails_before_writing_leaves_no_run_folder(tiny_config, monkeypatch):
    """Setup failing after the lock (e.g. init_from weights that do not fit) removes the folder the lock made; a
    folder that existed before is kept."""

    def refuse(*args, **kwargs):
        raise SuperposeError("setup failed")

    monkeypatch.setattr("superpose.train.loop.Trainer", refuse)
    cfg = tiny_config(train={"steps": 4})
    with pytest.raises(SuperposeError, match="setup failed"):
        train(cfg, progress=False)
    assert not cfg.run_dir.exists() and cfg.run_dir.parent.is_dir()
    cfg.run_dir.mkdir()
    with pytest.raises(SuperposeError, match="setup failed"):
        train(cfg, progress=False)
    assert cfg.run_dir.is_dir()


def test_resume_without_a_checkpoint_starts_the_run(tiny_config, capsys):
    cfg = tiny_config(train={"steps": 4}, checkpoint={"every": 0})
    result = train(cfg, resume=True, progress=False)
    assert result.steps == 4 and [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-0000002", "step-0000004"]
    assert "holds no checkpoint yet; starting the run from step 0" in capsys.readouterr().out


def test_explicit_checkpoint_that_does_not_exist_is_refused(tiny_config, tmp_path):
    with pytest.raises(SuperposeError, match="no checkpoint found"):
        train(tiny_config(), resume=tmp_path / "nowhere", progress=False)


def test_full_disk_during_a_checkpoint_keeps_the_last_complete_one(tiny_config, monkeypatch):
    cfg = tiny_config(train={"steps": 8}, checkpoint={"every": 2, "keep": 5})
    real = checkpoint_module.save_model

    def fill_the_disk_at_step_4(model, path):
        if "step-0000004" in path:
            raise OSError(28, "No space left on device", path)
        real(model, path)

    monkeypatch.setattr(checkpoint_module, "save_model", fill_the_disk_at_step_4)
    with pytest.raises(SuperposeError, match="writing checkpoint step-0000004 failed: .*No space left on device.*"
                                             "last complete checkpoint .* is intact"):
        train(cfg, progress=False)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-0000002"]
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(checkpoint_module, "save_model", real)
    assert train(cfg, resume=True, progress=False).steps == 8


@pytest.mark.parametrize(("key", "value"), [("lr", 1e-3), ("weight_decay", 0.0), ("beta2", 0.99), ("grad_clip", 0.5)])
def test_resume_refuses_a_changed_update_rule(tiny_config, key, value):
    """Issue 19 item 13: a changed optim.lr resumed without a word (a changed beta, eps or weight_decay was silently
    replaced by the saved optimizer state's); each is one line naming the key, both values and the checkpoint."""
    cfg = tiny_config(train={"steps": 4})
    train(cfg, progress=False)
    before = {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()}
    changed = tiny_config(train={"steps": 4}, optim={key: value})
    saved = getattr(cfg.optim, key)
    with pytest.raises(SuperposeError, match=rf"--resume: optim\.{key} is {value!r} but checkpoint \S+step-0000004 "
                                             rf"was trained with {saved!r}") as e:
        train(changed, resume=True, progress=False)
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()} == before


def test_resume_may_lengthen_the_run_and_change_its_logging(tiny_config):
    """What compare's forks and extended trunks change (the run's length, hence its LR schedule's), and what only
    reports (log and eval cadence, checkpoint cadence), may differ on a resume."""
    train(tiny_config(train={"steps": 4}), progress=False)
    longer = tiny_config(train={"steps": 6, "log_every": 2}, eval={"every": 3}, checkpoint={"every": 3, "keep": 1})
    assert train(longer, resume=True, progress=False).steps == 6


def test_log_lines_and_grouped_dashboard_tags(tiny_config, capsys):
    cfg = tiny_config()  # bag 4 for 6 steps, then bag 1; eval every 4
    result = train(cfg, progress=False)
    out = capsys.readouterr().out
    rows = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}
    assert f"step 4: validation loss {rows[4]['val_loss']:.4f}" in out
    spike = rows[7]["train_loss"] - rows[6]["train_loss"]
    assert f"step 7: phase 1 -> 2 (bag 4 -> 1), train loss {rows[6]['train_loss']:.3f} -> " \
           f"{rows[7]['train_loss']:.3f} ({spike:+.3f} nat)" in out
    events = EventAccumulator(str(result.run_dir / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "tst/bag", "perf/text_tokens_per_s", "train/lr"} <= tags
    assert [e.value for e in events.Scalars("tst/bag")] == [4] * 6 + [1] * 6


def test_steps_that_do_not_log_read_nothing_back_from_the_device(tiny_config, monkeypatch):
    """The whole step (loader, prefetch, update, every callback) on a step that logs nothing: no host read, so on
    a GPU the host runs ahead of the device. Logged steps are the switch, the one after it and the last."""
    from superpose.train.loop import Trainer
    from test_step import HOST_READS

    reads, quiet_steps, counting = [], [], [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if counting[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real = Trainer._step

    def one_step(self, step):
        counting[0] = not self.is_logged(step + 1)
        quiet_steps.extend([step + 1] if counting[0] else [])
        try:
            return real(self, step)
        finally:
            counting[0] = False

    monkeypatch.setattr(Trainer, "_step", one_step)
    cfg = tiny_config(train={"log_every": 12}, eval={"every": 0}, checkpoint={"every": 0})
    train(cfg, progress=False)
    assert quiet_steps == [1, 2, 3, 4, 5, 8, 9, 10, 11] and reads == []
    assert [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl")] == [6, 7, 12]
