"""What the runs of a comparison have left in their folders, read into a :class:`Comparison`: each seed's finished
family (stitched onto the trunk's rows before the fork), each finished arm's iso-loss speedup read off its seed's
family with the arithmetic of ``isoloss``, and where every other run stands. The in-process ``runner`` and a plan's
``--report`` both collect through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import SuperposeError
from ..files import FolderLock, read_json_object
from ..flops import superpose_overhead_flops
from ..train.config import RunConfig
from ..train.config_load import load_config
from ..train.metrics import read_metrics
from .isoloss import at_steps, family_lengths, iso_loss_partial, measure_spike, recommend, summarize
from .jobs import Job, Variant, plan_jobs
from .standing import standing

Rows = list[dict[str, Any]]
"""A run's metrics rows, one dict per logged step."""


def same_run(cfg: RunConfig, trunk: bool = False) -> RunConfig:
    """The config of the run in ``cfg``'s folder, refused when it was made with a different config. A trunk may
    differ in its length, kept steps and where a segment stops: its constant LR does not depend on them, so one trunk
    serves comparisons of every length."""
    saved = load_config(cfg.run_dir / "config.toml")
    theirs, mine = saved.to_dict(), cfg.to_dict()
    if trunk:
        for config in (theirs, mine):
            config["train"]["steps"], config["train"]["stop_at"], config["checkpoint"]["keep_steps"] = 0, 0, []
    if theirs != mine:
        raise SuperposeError(f"{cfg.run_dir} holds a run with a different config; use another --out or --runs folder")
    return saved


def read_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """The run's metrics rows so far (none before it started; a row being written by a live run is left out)."""
    path = cfg.run_dir / "metrics.jsonl"
    return read_metrics(path, partial_ok=True) if path.exists() else []


def is_finished(cfg: RunConfig, rows: list[dict[str, Any]]) -> bool:
    """Whether ``rows`` end at the run's last step with its final evaluation."""
    return bool(rows) and rows[-1]["step"] == cfg.train.steps and "val_loss" in rows[-1]


def is_locked(folder: Path) -> bool | None:
    """Whether a live process holds ``folder``'s lock (a run being trained does, rank 0 for all its ranks); None when
    this process cannot tell (a file system without ``flock``, a folder it may not write to).

    ``FolderLock`` offers no query, so the lock is taken without waiting and let go at once. The kernel drops the
    lock of a process that died in any way, SIGKILL included, so a killed run's folder is free. A ``superpose train``
    starting in those microseconds is refused in one line ("in use by another process"); started again, it
    continues (``--resume``), as after any stop.
    """
    try:
        with FolderLock(folder, "run folder"):
            return False
    except SuperposeError:
        return True
    except OSError:
        return None


def run_state(cfg: RunConfig, rows: Rows, done: bool) -> str:
    """finished, running (a live process holds the run folder's lock), stopped (it has steps but no live process:
    killed, or its job ended; ``--resume`` continues it), not started, or "running or stopped" (no way to tell)."""
    if done:
        return "finished"
    if not cfg.run_dir.is_dir():  # never create a folder to probe it
        return "not started"
    live = is_locked(cfg.run_dir)
    if live is None:
        return "running or stopped"
    return "running" if live else "stopped" if rows else "not started"


def _world_size(cfg: RunConfig) -> int:
    """Ranks of the run's newest start (run.json is rewritten at every start)."""
    return read_json_object(cfg.run_dir / "run.json").get("world_size", 1)


def gpu_seconds(rows: Rows, world_size: int, since: float = 0.0) -> float:
    """Wall time x ranks over ``rows``, from the clock at ``since``: each stretch between two logged rows at the
    world size of the process that wrote the later one, so a run resumed on another number of ranks costs each
    segment between resumes at its own size. (A resume continues at a checkpoint, whose step has a row unless a stop
    signal wrote it between rows: then the steps since the last row, fewer than ``train.log_every``, count at the
    resumed size.) Rows written before rows carried ``world_size`` count at ``world_size``."""
    total = 0.0
    for row in rows:
        total += (row["wall_time"] - since) * row.get("world_size", world_size)
        since = row["wall_time"]
    return total


@dataclass
class Member:
    """A finished baseline of the family, its metrics stitched onto the trunk's rows before the fork."""

    steps: int
    fork: int
    final_val_loss: float
    wall_time: float
    """Seconds from step 0, the trunk's up to the fork included (a fork resumes the trunk's clock)."""
    gpu_hours: float
    """Wall time x ranks summed over the trunk up to the fork and the member's own steps, each segment between
    resumes at its own world size."""
    flops: int
    rows: list[dict[str, Any]] = field(repr=False)


def _member(job: Job, rows: list[dict[str, Any]], trunk_rows: list[dict[str, Any]], trunk_world: int) -> Member:
    prefix = [r for r in trunk_rows if r["step"] <= job.wait_step] if job.wait_step else []
    shared = prefix[-1]["wall_time"] if prefix else 0.0
    last = rows[-1]
    seconds = gpu_seconds(prefix, trunk_world) + gpu_seconds(rows, _world_size(job.cfg), since=shared)
    return Member(job.cfg.train.steps, job.wait_step, last["val_loss"], last["wall_time"], seconds / 3600,
                  last["flops"], prefix + rows)


@dataclass
class Arm:
    """One finished TST run and how it compares with its seed's baseline family (an ``isoloss.ArmResult``)."""

    label: str
    seed: int
    steps: int
    mode: str
    final_val_loss: float
    flops: int
    overhead_flops: int
    wall_time: float
    gpu_hours: float
    text_tokens: int
    baseline_steps: float
    bound: str
    speedup: float
    """Iso-loss speedup in steps, equal to the model-FLOPs speedup (every step costs the same model FLOPs)."""
    flops_speedup: float
    """Baseline model FLOPs over TST model + superposition overhead FLOPs at equal loss."""
    wall_speedup: float
    gpu_hours_speedup: float
    """Baseline GPU-hours (trunk share included) at equal loss over the TST run's."""
    spike: dict[str, Any]
    run_dir: str
    rows: list[dict[str, Any]] = field(repr=False)


def overhead_flops(cfg: RunConfig) -> int:
    """FLOPs the bag means and multi-hot gathers add over the whole run (the model FLOPs are a baseline's); for the
    input/output ablations, which do only one of the two, an upper bound."""
    info = read_json_object(cfg.run_dir / "run.json")
    config = cfg.model.build_config(info["vocab_size"])
    schedule = cfg.phase_schedule()
    starts = [0, *schedule.ends[:-1]]
    return sum((end - start) * superpose_overhead_flops(config, cfg.train.batch_size, cfg.train.seq_len, st.bag)
               for st, start, end in zip(schedule.stages, starts, schedule.ends) if st.bag > 1)


def _arm(job: Job, rows: list[dict[str, Any]], family: list[Member], lengths: Sequence[int]) -> Arm:
    """One TST run's iso-loss speedup, read off its seed's finished family members."""
    cfg, last = job.cfg, rows[-1]
    steps = cfg.train.steps
    done = [m.steps for m in family]
    iso = iso_loss_partial(lengths, {m.steps: m.final_val_loss for m in family}, last["val_loss"])
    extra = overhead_flops(cfg)
    gpu_hours = gpu_seconds(rows, _world_size(cfg)) / 3600
    same_length = next((m for m in family if m.steps == steps), None)
    return Arm(
        label=job.label, seed=cfg.seed, steps=steps, mode=cfg.tst.mode, final_val_loss=last["val_loss"],
        flops=last["flops"], overhead_flops=extra, wall_time=last["wall_time"], gpu_hours=gpu_hours,
        text_tokens=last["text_tokens"], baseline_steps=iso.baseline_steps, bound=iso.bound,
        speedup=iso.speedup(steps),
        flops_speedup=at_steps(done, [m.flops for m in family], iso.baseline_steps) / (last["flops"] + extra),
        wall_speedup=at_steps(done, [m.wall_time for m in family], iso.baseline_steps) / last["wall_time"],
        gpu_hours_speedup=at_steps(done, [m.gpu_hours for m in family], iso.baseline_steps) / gpu_hours,
        spike=measure_spike(rows, same_length.rows) if same_length else {}, run_dir=str(cfg.run_dir), rows=rows,
    )


@dataclass
class Comparison:
    """Everything a report shows: the setup, each seed's family, every arm, per-variant summaries, run states."""

    config: dict[str, Any]
    runs: str
    family: dict[int, list[Member]]
    arms: list[Arm]
    summaries: list[dict[str, Any]]
    recommendation: str
    setup: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    status: list[dict[str, Any]] = field(default_factory=list)
    """Every planned run: id, kind, an arm's variant label, state (:func:`run_state`), step reached, steps; a plan's
    stopped run also the command that continues it (``resume``)."""
    standing: str = ""
    """Where the result stands against the measured trend and the paper (:func:`~.standing.standing`)."""


def _job_state(job: Job, rows: Rows, done: bool) -> str:
    """:func:`run_state` of a job; a trunk segment whose run has not passed the step it starts from has not started
    (the segment before it may hold the run folder)."""
    if job.kind == "trunk" and not done and not (rows and rows[-1]["step"] > job.wait_step):
        return "not started"
    return run_state(job.cfg, rows, done)


def _finished_rows(jobs: Sequence[Job], partial: bool) -> tuple[dict[str, Rows], Rows]:
    """The rows of every finished job by id, and every job's state; an unfinished one is refused unless
    ``partial``. A trunk segment has finished once the trunk reached the step it stops at (a longer comparison that
    shares the runs folder may have extended it past that)."""
    finished: dict[str, Rows] = {}
    status = []
    for job in jobs:
        trunk = job.kind == "trunk"
        if (job.cfg.run_dir / "config.toml").exists():
            same_run(job.cfg, trunk)
        rows = read_rows(job.cfg)
        done = bool(rows) and rows[-1]["step"] >= job.steps if trunk else is_finished(job.cfg, rows)
        if done:
            finished[job.id] = rows
        elif not partial:
            raise SuperposeError(f"{job.cfg.run_dir} has not finished")
        status.append({"run": job.id, "kind": job.kind, "label": job.label, "state": _job_state(job, rows, done),
                       "step": rows[-1]["step"] if rows else 0, "steps": job.steps})
    return finished, status


def collect(base: RunConfig, variants: Sequence[Variant], seeds: int, family: Sequence[float], runs: Path,
            partial: bool = False) -> Comparison:
    """The comparison as far as its runs have finished; every run must have, unless ``partial``.

    With ``partial``, an arm still running is left out (``status`` says where it is) and an arm whose loss the
    finished members do not bracket gets a bound (see :func:`iso_loss_partial`).
    """
    runs = Path(runs)
    lengths = family_lengths(family, base.train.steps)
    jobs = plan_jobs(base, variants, seeds, family, runs)
    finished, status = _finished_rows(jobs, partial)
    families: dict[int, list[Member]] = {}
    arms: list[Arm] = []
    for seed in sorted({job.seed for job in jobs}):
        mine = [job for job in jobs if job.seed == seed]
        trunk = next((job for job in mine if job.kind == "trunk"), None)
        trunk_rows = read_rows(trunk.cfg) if trunk else []
        trunk_world = _world_size(trunk.cfg) if trunk_rows else 1
        members = [_member(job, finished[job.id], trunk_rows, trunk_world) for job in mine
                   if job.kind == "baseline" and job.id in finished]
        if members:
            families[seed] = members
            arms += [_arm(job, finished[job.id], members, lengths) for job in mine
                     if job.kind == "tst" and job.id in finished]
    if not families:
        raise SuperposeError(f"no baseline of the family has finished yet in {runs}; the report needs at least one")
    summaries = [summarize(mine) for v in variants if (mine := [a for a in arms if a.label == v.label])]
    verdict = recommend(summaries) if summaries else "no recommendation: no TST arm has finished yet"
    source = Path(arms[0].run_dir) if arms else next(j.cfg.run_dir for j in jobs if j.id in finished)
    setup = _setup(base, source, arms)
    return Comparison(base.to_dict(), str(runs), families, arms, summaries, verdict, setup, status=status,
                      standing=standing(setup, summaries))


def _setup(base: RunConfig, run_dir: Path, arms: Sequence[Arm]) -> dict[str, Any]:
    """The shared setup a reader needs to judge the numbers: model size, shapes, FLOPs per step, the overhead."""
    info = read_json_object(run_dir / "run.json")
    phase1 = [a for a in arms if a.overhead_flops]
    overhead = max((a.overhead_flops / a.flops for a in phase1), default=0.0)
    return {
        "model": base.model.describe(), "overrides": base.model.overrides, "parameters": info["parameters"],
        "active_parameters": info["active_parameters"], "vocab_size": info["vocab_size"], "device": info["device"],
        "batch_size": base.train.batch_size, "seq_len": base.train.seq_len, "steps": base.train.steps,
        "flops_per_step": info["flops_per_step"], "lr": base.optim.lr, "lr_schedule": base.optim.lr_schedule,
        "warmup_steps": base.optim.warmup_steps, "decay_fraction": base.optim.decay_fraction,
        "overhead_fraction_of_run_flops": overhead,
    }
