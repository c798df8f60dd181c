"""A comparison trained in this process: the jobs of ``jobs``, one after another in :func:`~.jobs.launch_order`
(the order run_local.sh starts them in), each exactly as its planned job trains (``superpose train CONFIG
--resume``), through the trainer's public API; then collected by ``results``. Finished runs are reused and a trunk
another comparison left in the runs folder is extended, so comparisons that share one train each run once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data.loader import validation_windows
from ..data.mixture import open_sources
from ..errors import SuperposeError
from ..train.checkpoint import checkpoint_step, list_checkpoints
from ..train.config import RunConfig
from ..train.loop import train
from .isoloss import DEFAULT_FAMILY
from .jobs import Job, Variant, check_comparison, derive, launch_order, plan_jobs
from .results import Comparison, collect, is_finished, read_rows, same_run


def _train(cfg: RunConfig, progress: bool) -> None:
    """Train ``cfg`` from its newest checkpoint, else ``checkpoint.fork_from``, else step 0. A run stopped by a
    signal (it checkpointed first) stops the whole comparison, to be rerun later."""
    if train(cfg, resume=True, progress=progress).stopped:
        raise KeyboardInterrupt


def _ensure_trunk(cfg: RunConfig, progress: bool) -> None:
    """Train a trunk segment until the trunk holds a kept checkpoint at every fork step of ``cfg`` up to the
    segment's ``train.stop_at``. A trunk that another comparison (another length) started is extended, its kept
    steps and ours together, not trained again; one that passed a fork step of ours without a checkpoint there cannot
    serve, and is refused."""
    if (cfg.run_dir / "config.toml").exists():
        saved = same_run(cfg, trunk=True)
        have = {checkpoint_step(path) for path in list_checkpoints(cfg.run_dir)}
        missed = [step for step in cfg.checkpoint.keep_steps if step < max(have, default=0) and step not in have]
        if missed:
            raise SuperposeError(f"{cfg.run_dir} passed step {missed[0]} without a checkpoint to fork from; use "
                                 f"another --runs folder")
        end = cfg.train.stop_at or cfg.train.steps
        if have.issuperset(step for step in cfg.checkpoint.keep_steps if step <= end):
            return
        cfg = derive(cfg, train={"steps": max(cfg.train.steps, saved.train.steps)},
                     checkpoint={"keep_steps": sorted({*cfg.checkpoint.keep_steps, *saved.checkpoint.keep_steps})})
    _train(cfg, progress)


def _ensure_run(cfg: RunConfig, progress: bool) -> None:
    """Train ``cfg`` unless its folder holds the same finished run."""
    if (cfg.run_dir / "config.toml").exists():
        same_run(cfg)
        if is_finished(cfg, read_rows(cfg)):
            return
    _train(cfg, progress)


def run_jobs(jobs: Sequence[Job], progress: bool = True) -> None:
    """Train ``jobs`` here, one after another in :func:`launch_order`: a job starts once the one it waits for has
    ended, so a fork finds its trunk's checkpoint."""
    by_id = {job.id: job for job in jobs}
    for job_id in launch_order({job.id: job.after for job in jobs}):
        run_job(by_id[job_id], progress)


def run_job(job: Job, progress: bool = False) -> None:
    """Train one job unless its run has finished (a trunk segment: extend the trunk to the segment's end); the job
    it waits for must have ended. Launchers that start jobs in parallel call this, one job per process."""
    (_ensure_trunk if job.kind == "trunk" else _ensure_run)(job.cfg, progress)


def check_data(base: RunConfig) -> None:
    """The data (each source of a mixture) must have a validation split with enough windows (iso-loss reads
    validation losses)."""
    paths = [path for _, path, _ in base.data.mixture()]
    for path, data in zip(paths, open_sources(paths, tokenizer=base.data.tokenizer or None)):
        try:
            val = data.split("val")
        except SuperposeError:
            raise SuperposeError(f"{path} has no validation split, and iso-loss needs validation losses; "
                                 "prepare it with --val-fraction > 0") from None
        validation_windows(val, base.micro_batch_size(1), base.train.seq_len, base.eval.batches)


def compare(base: RunConfig, variants: Sequence[Variant], seeds: int = 1, family: Sequence[float] = DEFAULT_FAMILY,
            runs: Path | None = None, progress: bool = True) -> Comparison:
    """Run a baseline family and every TST variant for ``seeds`` seeds (``base.seed``, ``base.seed + 1``, ...) in
    this process: the jobs ``superpose compare --plan`` writes, in the order its run_local.sh starts them."""
    check_comparison(base, variants, seeds, family)
    check_data(base)
    runs = Path(runs or base.run_dir)
    run_jobs(plan_jobs(base, variants, seeds, family, runs), progress)
    return collect(base, variants, seeds, family, runs)
