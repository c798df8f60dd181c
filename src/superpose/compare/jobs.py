"""The jobs of a comparison: a baseline family forked from one constant-LR trunk, the TST arms, and the one order
every launcher starts them in.

Every run is an ordinary run config (the trunk keeps its fork-step checkpoints, a member starts from one:
``checkpoint.keep_steps``, ``checkpoint.fork_from``), so the same list of jobs is trained in this process
(``runner``) or written as cluster jobs (``plan``). The trunk is a chain of segment jobs, one per fork step, each the
same run stopped at that step (``train.stop_at``), so a member waits for the segment that writes its fork checkpoint
and not for the whole trunk. A job names the job it waits for (``after``), and :func:`launch_order` turns those
dependencies into the order of starts; the in-process runner and the plan's launchers all take it from there, so no
launcher writes the graph down a second time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import SuperposeError
from ..schedule import wsd_decay_start
from ..train.checkpoint import checkpoint_name
from ..train.config import RunConfig
from ..train.config_load import config_from_dict
from .isoloss import family_lengths, member_steps

if TYPE_CHECKING:
    from ..train.config import TSTConfig

BASELINE_TST = {"bag": 1, "ratio": 0.0, "schedule": [], "mode": "both", "rewarmup_steps": 0, "rescale_mean": False}
"""The ``[tst]`` keys of a baseline: bag 1 everywhere, no switch options."""
NO_FORK = {"keep_steps": [], "fork_from": ""}
"""The ``[checkpoint]`` keys of a run that neither forks nor is forked from."""


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
    if data["tst"].get("schedule"):  # as in RunConfig.to_dict: a multi-stage schedule replaces bag/ratio
        data["tst"] = {k: v for k, v in data["tst"].items() if k not in ("bag", "ratio")}
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


def check_comparison(base: RunConfig, variants: Sequence[Variant], seeds: int, family: Sequence[float]) -> None:
    """Every problem of the comparison's settings as one line, before any run is planned or trained."""
    if seeds < 1:
        raise SuperposeError(f"--seeds must be >= 1, got {seeds}")
    if not variants:
        raise SuperposeError("nothing to compare: no TST variant given")
    family_lengths(family, base.train.steps)
    check_warmup_fits(base, family)
    for variant in variants:
        try:
            cfg = derive(base, tst={**BASELINE_TST, **variant.tst})
        except SuperposeError as e:
            raise SuperposeError(f"{variant.label}: {e}") from None
        if max(cfg.phase_schedule().bags()) < 2:
            raise SuperposeError(f"{variant.label}: TST needs a stage with bag >= 2 and a ratio > 0 "
                                 "(bag 1 or ratio 0 is the baseline itself)")
        if not cfg.tst.schedule and cfg.tst.ratio <= 0:
            raise SuperposeError(f"{variant.label}: tst.ratio must be > 0 for TST")


@dataclass(frozen=True)
class Job:
    """One run of a comparison, an ordinary ``superpose train CONFIG --resume``, and what it waits for: a baseline
    forked from its seed's trunk can start once the trunk segment ending at ``wait_step`` has written its checkpoint
    there; a trunk segment continues from where the one before it stopped (``wait_step``)."""

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
    def steps(self) -> int:
        """The step this job's run ends at: a trunk segment's ``train.stop_at``, else its last step."""
        return self.cfg.train.stop_at or self.cfg.train.steps

    @property
    def id(self) -> str:
        """``seed-N/NAME``; a trunk segment's ``seed-N/trunk-STEP`` (the segments share one run folder)."""
        name = self.cfg.name + (f"-{self.cfg.train.stop_at}" if self.cfg.train.stop_at else "")
        return f"seed-{self.seed}/{name}"


def family_jobs(base: RunConfig, lengths: Sequence[int], runs: Path) -> list[Job]:
    """The baselines of the given lengths for ``base.seed`` and, for a WSD LR, the constant-LR trunk they fork from.

    The trunk runs to the last fork step and keeps its checkpoint at every fork step (``checkpoint.keep_steps``), as
    a chain of segments: one job per fork step, the same run config stopped at that step (``train.stop_at``; its
    constant LR does not depend on where a process stops). Each baseline starts from the checkpoint at its decay start
    (``checkpoint.fork_from``) once the segment ending there has finished. In this process a trunk another
    comparison left in the runs folder is extended (``runner``).
    """
    forks = {steps: fork_step(base, steps) for steps in lengths}
    keep = sorted({f for f in forks.values() if f > 0})
    jobs: list[Job] = []
    segment: dict[int, Job] = {}
    for end in keep:
        cfg = derive(base, "trunk", runs, tst=BASELINE_TST, optim={"decay_fraction": 0.0},
                     train={"steps": keep[-1], "stop_at": end}, checkpoint={**NO_FORK, "keep_steps": keep})
        previous = jobs[-1] if jobs else None
        segment[end] = Job(base.seed, "trunk", cfg, previous.id if previous else "", previous.steps if previous else 0)
        jobs.append(segment[end])
    for steps in sorted(set(lengths)):
        fork = forks[steps]
        source = str(segment[fork].cfg.run_dir / "checkpoints" / checkpoint_name(fork)) if fork else ""
        cfg = derive(base, f"baseline-{steps}", runs, tst=BASELINE_TST, train={"steps": steps},
                     checkpoint={**NO_FORK, "fork_from": source})
        jobs.append(Job(base.seed, "baseline", cfg, segment[fork].id if fork else "", fork))
    return jobs


def arm_config(base: RunConfig, variant: Variant, runs: Path) -> RunConfig:
    """The TST run of one variant: the base config with the variant's ``[tst]`` keys."""
    tst = {**BASELINE_TST, **{k: v for k, v in asdict(base.tst).items() if k in ("weighting", "alpha")},
           **variant.tst}
    return derive(base, f"{variant.label}-T{base.train.steps}", runs, tst=tst, checkpoint=NO_FORK)


def plan_jobs(base: RunConfig, variants: Sequence[Variant], seeds: int, family: Sequence[float],
              runs: Path) -> list[Job]:
    """Every run of a comparison: per seed, the trunk, the family, the arms (the order :func:`launch_order` keeps
    among jobs that wait equally long)."""
    lengths = family_lengths(family, base.train.steps)
    jobs: list[Job] = []
    for k in range(seeds):
        seeded = derive(base, seed=base.seed + k)
        folder = Path(runs) / f"seed-{seeded.seed}"
        jobs += family_jobs(seeded, lengths, folder)
        jobs += [Job(seeded.seed, "tst", arm_config(seeded, v, folder), label=v.label) for v in variants]
    return jobs


def launch_order(after: Mapping[str, str]) -> list[str]:
    """Job ids (``after``: id -> the id it waits for, or "", in plan order) in the order to start them: the jobs
    that wait for none first, then those that wait for one of them, and so on; plan order within each.

    Ready jobs first, so a launcher that starts jobs one at a time never holds a free slot for a fork whose
    checkpoint is not written yet while a ready job could use it. Every launcher takes its order from here.
    """
    depth: dict[str, int] = {}

    def depth_of(job: str, path: tuple[str, ...] = ()) -> int:
        if job not in depth:
            if job in path:
                raise ValueError(f"jobs wait for each other in a circle: {' -> '.join((*path, job))}")
            if after[job] and after[job] not in after:
                raise ValueError(f"{job} waits for {after[job]}, which is not a job of the plan")
            depth[job] = depth_of(after[job], (*path, job)) + 1 if after[job] else 0
        return depth[job]

    return sorted(after, key=depth_of)  # sorted is stable: plan order among equal depths


def finish_steps(after: Mapping[str, str], own_steps: Mapping[str, int]) -> dict[str, int]:
    """When each job ends, in steps from the plan's start, if every job starts as soon as the one it waits for has
    ended (machines enough for all): its own steps (``steps - wait_step``: a fork counts only its decay) plus the
    finish of the job it waits for. The largest is the plan's makespan: its longest chain of waits."""
    finish: dict[str, int] = {}
    for job in launch_order(after):  # a job comes after the one it waits for
        finish[job] = (finish[after[job]] if after[job] else 0) + own_steps[job]
    return finish
