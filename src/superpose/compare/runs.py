"""The runs of a comparison: a baseline family forked from one constant-LR trunk, the TST arms, reuse of finished
runs. Every run is an ordinary run config (the trunk keeps its fork-step checkpoints, a member starts from one:
``checkpoint.keep_steps``, ``checkpoint.fork_from``), so the same list of jobs is trained here one after another or
planned as cluster jobs (``plan``). Drives the trainer through its public API (``train``, ``config_from_dict``, the
metrics rows) and reads each arm's speedup off its seed's family with the arithmetic of ``isoloss``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..data.loader import validation_windows
from ..data.mixture import open_sources
from ..errors import SuperposeError
from ..files import read_json_object
from ..flops import superpose_overhead_flops
from ..schedule import wsd_decay_start
from ..train.checkpoint import checkpoint_name, checkpoint_step, list_checkpoints
from ..train.config import RunConfig, config_from_dict, load_config
from ..train.loop import train
from ..train.metrics import read_metrics
from .isoloss import (
    DEFAULT_FAMILY,
    at_steps,
    family_lengths,
    iso_loss_partial,
    measure_spike,
    member_steps,
    recommend,
    summarize,
)

if TYPE_CHECKING:
    from ..train.config import TSTConfig

BASELINE_TST = {"bag": 1, "ratio": 0.0, "schedule": [], "mode": "both", "rewarmup_steps": 0, "rescale_mean": False}
"""The ``[tst]`` keys of a baseline: bag 1 everywhere, no switch options."""


@dataclass(frozen=True)
class Variant:
    """One TST arm: a folder-safe label and the ``[tst]`` keys it sets on top of the base config."""

    label: str
    tst: dict[str, Any]


def variant_label(tst: TSTConfig) -> str:
    """A short folder-safe name for a TST setting: ``s4-r0.3``, ``s8@0.1-4@0.2``, plus mode and options."""
    if tst.schedule:
        label = "s" + "-".join(f"{bag}@{until:g}" for until, bag in tst.schedule if bag > 1)
    else:
        label = f"s{tst.bag}-r{tst.ratio:g}"
    if tst.mode != "both":
        label += f"-{tst.mode}"
    if tst.weighting != "uniform":
        label += f"-{tst.weighting}{tst.alpha:g}"
    if tst.rewarmup_steps:
        label += f"-rewarm{tst.rewarmup_steps}"
    if tst.rescale_mean:
        label += "-rescale"
    return label


def derive(base: RunConfig, name: str | None = None, runs: Path | None = None, seed: int | None = None,
           **sections: dict[str, Any]) -> RunConfig:
    """A config that differs from ``base`` only in the given name, runs folder, seed and sections' keys (validated
    like a file)."""
    data = base.to_dict()
    top = {"name": name, "out_dir": None if runs is None else str(runs), "seed": seed}
    data.update({k: v for k, v in top.items() if v is not None})
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return config_from_dict(data)


def variants_for(base: RunConfig, modes: Sequence[str] = ("both",), **tst: Any) -> list[Variant]:
    """One variant per objective (``both``/``input``/``output``) over the base config's TST keys plus ``tst``."""
    out = []
    for mode in modes:
        keys = {k: v for k, v in asdict(base.tst).items() if k not in ("weighting", "alpha")}
        keys.update(tst, mode=mode)
        out.append(Variant(variant_label(derive(base, tst=keys).tst), keys))
    return out


def fork_step(cfg: RunConfig, steps: int) -> int:
    """Where a baseline of ``steps`` steps leaves the constant-LR trunk: its decay start (0: no shared prefix)."""
    if cfg.optim.lr_schedule != "wsd":
        return 0
    return wsd_decay_start(steps, cfg.optim.decay_fraction)


def check_warmup_fits(base: RunConfig, multiples: Sequence[float]) -> None:
    """Refuse a family member whose LR warmup does not end before its decay starts (cosine: before its last step).

    Such a member never finishes its decay, so reading it as a finished baseline would understate the baseline.
    Refused rather than given a shorter warmup: a member with its own warmup would share neither the trunk's prefix
    (it could not be forked) nor the TST run's LR schedule, and the speedup would mix that difference in.
    """
    warmup = base.optim.warmup_steps
    for multiple in sorted(multiples):
        steps = member_steps(multiple, base.train.steps)
        decay = fork_step(base, steps) if base.optim.lr_schedule == "wsd" else steps
        if warmup >= decay:
            raise SuperposeError(
                f"--family {multiple:g}: a {steps}-step baseline has no room to decay its LR after the {warmup}-step "
                f"warmup (optim.warmup_steps must be below {decay} for it), so it would not be a finished baseline; "
                f"drop {multiple:g} from --family, raise train.steps or lower optim.warmup_steps")


def _same_run(cfg: RunConfig, trunk: bool = False) -> RunConfig:
    """The config of the run in ``cfg``'s folder, refused when it was made with a different config. A trunk may
    differ in its length and kept steps: its constant LR does not depend on them, so one trunk serves comparisons of
    every length."""
    saved = load_config(cfg.run_dir / "config.toml")
    theirs, mine = saved.to_dict(), cfg.to_dict()
    if trunk:
        for config in (theirs, mine):
            config["train"]["steps"], config["checkpoint"]["keep_steps"] = 0, []
    if theirs != mine:
        raise SuperposeError(f"{cfg.run_dir} holds a run with a different config; use another --out or --runs folder")
    return saved


def _ensure_trunk(cfg: RunConfig, progress: bool) -> None:
    """Train the trunk until it holds a kept checkpoint at every fork step of ``cfg``. A trunk that another
    comparison (another length) started is extended, its kept steps and ours together, not trained again; one that
    passed a fork step of ours without a checkpoint there cannot serve, and is refused."""
    if (cfg.run_dir / "config.toml").exists():
        saved = _same_run(cfg, trunk=True)
        have = {checkpoint_step(path) for path in list_checkpoints(cfg.run_dir)}
        missed = [step for step in cfg.checkpoint.keep_steps if step < max(have, default=0) and step not in have]
        if missed:
            raise SuperposeError(f"{cfg.run_dir} passed step {missed[0]} without a checkpoint to fork from; use "
                                 f"another --runs folder")
        if have.issuperset(cfg.checkpoint.keep_steps):
            return
        cfg = derive(cfg, train={"steps": max(cfg.train.steps, saved.train.steps)},
                     checkpoint={"keep_steps": sorted({*cfg.checkpoint.keep_steps, *saved.checkpoint.keep_steps})})
    if train(cfg, resume=True, progress=progress).stopped:
        raise KeyboardInterrupt


def _read_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """The run's metrics rows so far (none before it started; a row being written by a live run is left out)."""
    path = cfg.run_dir / "metrics.jsonl"
    return read_metrics(path, partial_ok=True) if path.exists() else []


def _finished(cfg: RunConfig, rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and rows[-1]["step"] == cfg.train.steps and "val_loss" in rows[-1]


def _ensure_run(cfg: RunConfig, progress: bool) -> None:
    """Train ``cfg`` unless its folder holds the same finished run, exactly as its planned job does
    (``superpose train CONFIG --resume``): its own newest checkpoint, else ``checkpoint.fork_from``, else step 0.
    A run stopped by a signal (it checkpointed first) stops the whole comparison, to be rerun later."""
    if (cfg.run_dir / "config.toml").exists():
        _same_run(cfg)
        if _finished(cfg, _read_rows(cfg)):
            return
    if train(cfg, resume=True, progress=progress).stopped:
        raise KeyboardInterrupt


NO_FORK = {"keep_steps": [], "fork_from": ""}
"""The ``[checkpoint]`` keys of a run that neither forks nor is forked from."""


@dataclass(frozen=True)
class Job:
    """One run of a comparison, an ordinary ``superpose train CONFIG --resume``, and what it waits for: a baseline
    forked from its seed's trunk can start once the trunk has written its checkpoint at ``wait_step``."""

    seed: int
    kind: str
    """"trunk", "baseline" (a member of the family) or "tst" (an arm)."""
    cfg: RunConfig
    after: str = ""
    """The id of the job whose checkpoint this one starts from; "" when it waits for none."""
    wait_step: int = 0
    label: str = ""
    """A TST arm's variant label."""

    @property
    def id(self) -> str:
        return f"seed-{self.seed}/{self.cfg.name}"


def family_jobs(base: RunConfig, lengths: Sequence[int], runs: Path) -> list[Job]:
    """The baselines of the given lengths for ``base.seed`` and, for a WSD LR, the constant-LR trunk they fork from.

    The trunk trains straight to the last fork step and keeps its checkpoint at every fork step
    (``checkpoint.keep_steps``); each baseline starts from the one at its decay start (``checkpoint.fork_from``).
    In this process a trunk another comparison left in the runs folder is extended (:func:`_ensure_trunk`).
    """
    forks = {steps: fork_step(base, steps) for steps in lengths}
    keep = sorted({f for f in forks.values() if f > 0})
    jobs: list[Job] = []
    trunk = None
    if keep:
        trunk = Job(base.seed, "trunk", derive(base, "trunk", runs, tst=BASELINE_TST, optim={"decay_fraction": 0.0},
                                               train={"steps": keep[-1]},
                                               checkpoint={**NO_FORK, "keep_steps": keep}))
        jobs.append(trunk)
    for steps in sorted(set(lengths)):
        fork = forks[steps]
        source = str(trunk.cfg.run_dir / "checkpoints" / checkpoint_name(fork)) if fork else ""
        cfg = derive(base, f"baseline-{steps}", runs, tst=BASELINE_TST, train={"steps": steps},
                     checkpoint={**NO_FORK, "fork_from": source})
        jobs.append(Job(base.seed, "baseline", cfg, trunk.id if fork else "", fork))
    return jobs


def arm_config(base: RunConfig, variant: Variant, runs: Path) -> RunConfig:
    """The TST run of one variant: the base config with the variant's ``[tst]`` keys."""
    tst = {**BASELINE_TST, **{k: v for k, v in asdict(base.tst).items() if k in ("weighting", "alpha")},
           **variant.tst}
    return derive(base, f"{variant.label}-T{base.train.steps}", runs, tst=tst, checkpoint=NO_FORK)


def plan_jobs(base: RunConfig, variants: Sequence[Variant], seeds: int, family: Sequence[float],
              runs: Path) -> list[Job]:
    """Every run of a comparison in an order that respects the forks: per seed, the trunk, the family, the arms."""
    lengths = family_lengths(family, base.train.steps)
    jobs: list[Job] = []
    for k in range(seeds):
        seeded = derive(base, seed=base.seed + k)
        folder = Path(runs) / f"seed-{seeded.seed}"
        jobs += family_jobs(seeded, lengths, folder)
        jobs += [Job(seeded.seed, "tst", arm_config(seeded, v, folder), label=v.label) for v in variants]
    return jobs


def _world_size(cfg: RunConfig) -> int:
    """Ranks of the run's newest start (run.json is rewritten at every start)."""
    return read_json_object(cfg.run_dir / "run.json").get("world_size", 1)


@dataclass
class Member:
    """A finished baseline of the family, its metrics stitched onto the trunk's rows before the fork."""

    steps: int
    fork: int
    final_val_loss: float
    wall_time: float
    """Seconds from step 0, the trunk's up to the fork included (a fork resumes the trunk's clock)."""
    gpu_hours: float
    """Wall time x ranks summed over the trunk up to the fork and the member's own steps."""
    flops: int
    rows: list[dict[str, Any]] = field(repr=False)


def _member(job: Job, rows: list[dict[str, Any]], trunk_rows: list[dict[str, Any]], trunk_world: int) -> Member:
    prefix = [r for r in trunk_rows if r["step"] <= job.wait_step] if job.wait_step else []
    shared = prefix[-1]["wall_time"] if prefix else 0.0
    last = rows[-1]
    gpu_seconds = trunk_world * shared + _world_size(job.cfg) * (last["wall_time"] - shared)
    return Member(job.cfg.train.steps, job.wait_step, last["val_loss"], last["wall_time"], gpu_seconds / 3600,
                  last["flops"], prefix + rows)


@dataclass
class Arm:
    """One finished TST run and how it compares with its seed's baseline family."""

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
    gpu_hours = _world_size(cfg) * last["wall_time"] / 3600
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
    """Every planned run: id, kind, state (finished / running / not started), step reached, steps."""


def check_comparison(base: RunConfig, variants: Sequence[Variant], seeds: int, family: Sequence[float]) -> None:
    """Every problem of the comparison's settings as one line, before any run is planned or trained."""
    if seeds < 1:
        raise SuperposeError(f"--seeds must be >= 1, got {seeds}")
    if not variants:
        raise SuperposeError("nothing to compare: no TST variant given")
    family_lengths(family, base.train.steps)
    check_warmup_fits(base, family)
    for variant in variants:
        cfg = derive(base, tst={**BASELINE_TST, **variant.tst})
        if max(cfg.phase_schedule().bags()) < 2:
            raise SuperposeError(f"{variant.label}: TST needs a stage with bag >= 2 and a ratio > 0 "
                                 "(bag 1 or ratio 0 is the baseline itself)")
        if not cfg.tst.schedule and cfg.tst.ratio <= 0:
            raise SuperposeError(f"{variant.label}: tst.ratio must be > 0 for TST")


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
    this process, one run after another: the runs ``superpose compare --plan`` writes as jobs, in plan order."""
    check_comparison(base, variants, seeds, family)
    check_data(base)
    runs = Path(runs or base.run_dir)
    for job in plan_jobs(base, variants, seeds, family, runs):
        (_ensure_trunk if job.kind == "trunk" else _ensure_run)(job.cfg, progress)
    return collect(base, variants, seeds, family, runs)


def collect(base: RunConfig, variants: Sequence[Variant], seeds: int, family: Sequence[float], runs: Path,
            partial: bool = False) -> Comparison:
    """The comparison as far as its runs have finished; every run must have, unless ``partial``.

    With ``partial``, an arm still running is left out (``status`` says where it is) and an arm whose loss the
    finished members do not bracket gets a bound (see :func:`iso_loss_partial`).
    """
    runs = Path(runs)
    lengths = family_lengths(family, base.train.steps)
    jobs = plan_jobs(base, variants, seeds, family, runs)
    finished: dict[str, list[dict[str, Any]]] = {}
    status = []
    for job in jobs:
        trunk = job.kind == "trunk"
        if (job.cfg.run_dir / "config.toml").exists():
            _same_run(job.cfg, trunk)
        rows = _read_rows(job.cfg)
        done = bool(rows) and rows[-1]["step"] >= job.cfg.train.steps if trunk else _finished(job.cfg, rows)
        if done:
            finished[job.id] = rows
        elif not partial:
            raise SuperposeError(f"{job.cfg.run_dir} has not finished")
        status.append({"run": job.id, "kind": job.kind, "state": "finished" if done else "running" if rows
                       else "not started", "step": rows[-1]["step"] if rows else 0, "steps": job.cfg.train.steps})
    families: dict[int, list[Member]] = {}
    arms: list[Arm] = []
    for seed in sorted({job.seed for job in jobs}):
        mine = [job for job in jobs if job.seed == seed]
        trunk = next((job for job in mine if job.kind == "trunk"), None)
        trunk_rows = _read_rows(trunk.cfg) if trunk else []
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
    return Comparison(base.to_dict(), str(runs), families, arms, summaries, verdict, _setup(base, source, arms),
                      status=status)


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
