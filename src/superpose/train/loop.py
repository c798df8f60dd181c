"""The training loop: bookkeeping only. The schedule picks the bag, the loader reads the window, the TrainModule steps.

Everything that can be wrong with the inputs (config, data, windows that do not fit, an existing run folder) is
checked before the first byte is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import method
from ..data.loader import WindowLoader, check_window, validation_windows
from ..data.shards import open_dataset
from ..errors import SuperposeError, TrainingStopped
from ..flops import flops_per_step
from ..models import build_model, model_config, parameter_counts
from ..schedule import lr_at, rewarmup_factor
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    write_atomic,
)
from .config import RunConfig
from .distributed import DistInfo, any_rank, barrier, init_distributed, shutdown
from .faults import StopSignals, kill_point
from .metrics import MetricsWriter
from .step import TrainModule


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_val_loss: float
    text_tokens: int
    wall_time: float
    stopped: str | None = None
    """The signal (SIGTERM, SIGINT) that stopped the run early, after its checkpoint; None when it ran to the end."""


def train(cfg: RunConfig, resume: bool | str | Path = False, progress: bool = True) -> RunResult:
    """Run (or resume) a training run described by ``cfg``; returns where it is and how it ended.

    ``resume``: ``True`` continues from the run folder's newest checkpoint, a path from that checkpoint. Under
    torchrun every rank calls this; rank 0 alone writes files and shows progress.
    """
    cfg.validate()
    run_dir = cfg.run_dir
    data = open_dataset(cfg.data.path, tokenizer=cfg.data.tokenizer or None)
    schedule = cfg.phase_schedule()
    L, B = cfg.train.seq_len, cfg.train.batch_size
    train_stream, val_stream = data.split("train"), data.split("val")
    for bag in sorted(set(schedule.bags())):
        check_window(train_stream, B, method.window_length(L, bag, cfg.tst.mode))
    val_windows = [w for batch in validation_windows(val_stream, B, L, cfg.eval.batches)  # the same at any world size
                   for w in batch.split(cfg.micro_batch_size)]
    model_config(cfg.model.preset, data.vocab_size, **cfg.model.overrides)  # unknown preset: fail before writing
    checkpoint = None
    if resume:
        checkpoint = resolve_checkpoint(run_dir if resume is True else Path(resume))
    elif list_checkpoints(run_dir):
        raise SuperposeError(f"run folder {run_dir} already holds a run; pass --resume to continue it or choose another name")

    info, device = init_distributed(cfg.train.device)
    try:
        return _train(cfg, data, schedule, train_stream, val_windows, checkpoint, info, device, progress)
    finally:
        shutdown()


def _train(cfg: RunConfig, data, schedule, train_stream, val_windows, checkpoint: Path | None, info: DistInfo,
           device: torch.device, progress: bool) -> RunResult:
    run_dir, L, B = cfg.run_dir, cfg.train.seq_len, cfg.train.batch_size
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.preset, data.vocab_size, seed=cfg.seed, device=device, **cfg.model.overrides)
    total_params, active_params = parameter_counts(model)
    step_flops = flops_per_step(model.config, B, L)
    module = TrainModule(model, cfg, device, info)
    local = cfg.local_batch_size
    loader = WindowLoader(train_stream, B, cfg.seed, lanes=range(info.rank * local, (info.rank + 1) * local))
    state = {"step": 0, "text_tokens": 0, "flops": 0, "wall_time": 0.0}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, module.optimizer)
        loader.load_state_dict(state["loader"])

    config_toml = cfg.to_toml()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run_dir)
        write_atomic(run_dir / "config.toml", config_toml)
        data.tokenizer.save(str(run_dir / "tokenizer.json"))  # a run folder is self-contained for export
        write_atomic(run_dir / "run.json", json.dumps({
            "preset": cfg.model.preset, "vocab_size": data.vocab_size, "parameters": total_params,
            "active_parameters": active_params, "flops_per_step": step_flops, "device": str(device),
            "world_size": info.world_size, "parallel": cfg.train.parallel if info.enabled else None,
            "stages": [{"bag": st.bag, "end_step": end} for st, end in zip(schedule.stages, schedule.ends)],
        }, indent=2))
    barrier(info)
    writer = MetricsWriter(run_dir, resume_step=state["step"] if checkpoint is not None else None, log=cfg.log,
                           config=cfg.to_dict()) if info.is_main else None
    switches = set(schedule.switch_steps())
    val_loss = float("nan")
    skipped_in_row = state.get("skipped_in_row", 0)
    bar = tqdm(total=cfg.train.steps, initial=state["step"], desc=cfg.name, disable=not (progress and info.is_main),
               dynamic_ncols=True)
    wall0 = time.perf_counter() - state["wall_time"]

    def say(message: str) -> None:
        if info.is_main:  # tqdm.write prints even with the bar disabled: one voice per job
            bar.write(message)

    def snapshot(step: int, keep_always: bool) -> Path:
        return save_checkpoint(
            run_dir,
            model,
            module.optimizer,
            {**state, "step": step, "loader": loader.state_dict(), "keep_always": keep_always,
             "phase": schedule.stage_at(step - 1) + 1, "bag": schedule.bag_at(step - 1),
             "skipped_in_row": skipped_in_row},
            config_toml,
            cfg.checkpoint.keep,
            info,
        )

    stopped = None
    try:
        with StopSignals() as signals:
            for step in range(state["step"], cfg.train.steps):
                bag = schedule.bag_at(step)
                lr = lr_at(step, cfg.train.steps, peak=cfg.optim.lr, schedule=cfg.optim.schedule,
                           warmup_steps=cfg.optim.warmup_steps, decay_fraction=cfg.optim.decay_fraction,
                           min_ratio=cfg.optim.min_lr_ratio) * rewarmup_factor(step, schedule.switch_steps(), cfg.tst.rewarmup_steps)
                t0 = time.perf_counter()
                epoch = loader.epoch
                window = loader.next_batch(method.window_length(L, bag, cfg.tst.mode))
                metrics = module.train_step(window, bag, lr)
                dt = time.perf_counter() - t0
                done = step + 1
                finite = metrics.pop("finite")
                skipped_in_row = 0 if finite else skipped_in_row + 1
                state.update(step=done, text_tokens=state["text_tokens"] + B * window.shape[1],
                             flops=state["flops"] + step_flops, wall_time=time.perf_counter() - wall0,
                             skipped=state.get("skipped", 0) + (not finite))
                row = {"step": done, "phase": schedule.stage_at(step) + 1, "bag": bag, "lr": lr,
                       "train_loss": metrics["loss"], **{k: v for k, v in metrics.items() if k != "loss"},
                       "text_tokens": state["text_tokens"], "flops": state["flops"], "wall_time": state["wall_time"],
                       "tokens_per_s": B * window.shape[1] / dt, "epoch": loader.epoch}
                if not finite:
                    row.update(skipped=1, skipped_total=state["skipped"])
                    say(f"step {done}: non-finite loss or gradient, update skipped ({skipped_in_row} in a row)")
                if loader.epoch != epoch:
                    say(f"step {done}: epoch {epoch} of the training data complete, starting epoch {loader.epoch}")
                # the last step always evaluates: after a skipped update the weights are the last good ones
                if (finite and cfg.eval.every and done % cfg.eval.every == 0) or done == cfg.train.steps:
                    val_loss = module.eval_loss(val_windows)
                    row["val_loss"] = val_loss
                if writer is not None and (done % cfg.train.log_every == 0 or "val_loss" in row or not finite
                                           or done in switches or done == cfg.train.steps):
                    writer.write(row)
                bar.update(1)
                bar.set_postfix({"phase": row["phase"], "bag": bag, "loss": f"{metrics['loss']:.3f}",
                                 "tok/s": f"{row['tokens_per_s']:.0f}"})
                kill_point("step", done)
                if not finite and (cfg.train.nonfinite == "stop" or skipped_in_row >= cfg.train.max_skips):
                    path = snapshot(done, keep_always=True)
                    raise TrainingStopped(
                        f"non-finite loss or gradient at step {done} ({skipped_in_row} in a row, policy "
                        f"{cfg.train.nonfinite}); the last good weights are in {path}"
                    )
                stop = any_rank(signals.received is not None, info, device)  # every rank stops after the same step
                if done in switches or done == cfg.train.steps:
                    snapshot(done, keep_always=True)
                elif stop or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                    snapshot(done, keep_always=False)
                if stop and done < cfg.train.steps:
                    stopped = signals.name or "SIGTERM"
                    say(f"{stopped}: stopped after step {done} with a checkpoint; continue with --resume")
                    break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if checkpoint is not None and val_loss != val_loss:  # resumed a finished run: report its last validation
        val_loss = module.eval_loss(val_windows)
    return RunResult(run_dir, state["step"], val_loss, state["text_tokens"], state["wall_time"], stopped)
