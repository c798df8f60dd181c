"""The runs of a comparison: a baseline family forked from one constant-LR trunk, the TST arms, reuse of finished
runs. Drives the trainer through its public API (``train``, ``config_from_dict``, ``list_checkpoints``, the
metrics rows) and reads each arm's speedup off its seed's family with the arithmetic of ``isoloss``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..data.loader import validation_windows
from ..data.shards import open_dataset
from ..errors import SuperposeError
from ..flops import superpose_overhead_flops
from ..models import model_config
from ..schedule import wsd_decay_start
from ..train.checkpoint import list_checkpoints
from ..train.config import RunConfig, config_from_dict
from ..train.loop import train
from ..train.metrics import read_metrics
from .isoloss import (
    DEFAULT_FAMILY,
    at_steps,
    family_lengths,
    iso_loss_steps,
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


def _same_run(cfg: RunConfig, ignore_steps: bool = False) -> None:
    """Refuse to reuse a run folder whose run was made with a different config."""
    saved = config_from_dict(tomllib.loads((cfg.run_dir / "config.toml").read_text())).to_dict()
    mine = cfg.to_dict()
    if ignore_steps:
        saved["train"]["steps"] = mine["train"]["steps"]
    if saved != mine:
        raise SuperposeError(f"{cfg.run_dir} holds a run with a different config; use another --out or --runs folder")


def _finished(cfg: RunConfig) -> bool:
    path = cfg.run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []
    return bool(rows) and rows[-1]["step"] == cfg.train.steps and "val_loss" in rows[-1]


def _train_or_interrupt(cfg: RunConfig, resume: bool | Path, progress: bool) -> None:
    """Train; a run stopped by a signal (it checkpointed first) stops the whole comparison, to be rerun later."""
    if train(cfg, resume=resume, progress=progress).stopped:
        raise KeyboardInterrupt


def _ensure_run(cfg: RunConfig, fork: Path | None, progress: bool) -> None:
    """Train ``cfg`` unless its folder holds the same finished run; continue it if interrupted; fork if asked."""
    if (cfg.run_dir / "config.toml").exists():
        _same_run(cfg)
        if _finished(cfg):
            return
        if list_checkpoints(cfg.run_dir):
            _train_or_interrupt(cfg, True, progress)
            return
    _train_or_interrupt(cfg, fork or False, progress)


def _checkpoints_by_step(run_dir: Path) -> dict[int, Path]:
    """A run's complete checkpoints by step (the number their folder name ends in)."""
    return {int(p.name.rsplit("-", 1)[-1]): p for p in list_checkpoints(run_dir)}


def _extend_trunk(trunk: RunConfig, forks: Sequence[int], progress: bool) -> dict[int, Path]:
    """Train the constant-LR trunk in segments ending at each fork step, so each has a checkpoint to fork from."""
    for fork in sorted(set(forks)):
        have = _checkpoints_by_step(trunk.run_dir)
        if fork in have:
            continue
        if have and max(have) > fork:
            raise SuperposeError(f"{trunk.run_dir} passed step {fork} without a checkpoint; use a fresh --runs folder")
        segment = derive(trunk, train={"steps": fork})
        if have:
            _same_run(segment, ignore_steps=True)
        _train_or_interrupt(segment, bool(have), progress)
    return _checkpoints_by_step(trunk.run_dir)


@dataclass
class Member:
    """A finished baseline of the family, its metrics stitched onto the trunk's rows before the fork."""

    steps: int
    fork: int
    final_val_loss: float
    wall_time: float
    flops: int
    rows: list[dict[str, Any]] = field(repr=False)


def baseline_family(base: RunConfig, lengths: Sequence[int], runs: Path, progress: bool = True) -> list[Member]:
    """Train (or reuse) baselines of the given lengths for ``base.seed``, forked from one constant-LR trunk.

    Ask for every length a runs folder will need in the first call: the trunk is extended in segments that end at
    each fork step, and a fork step it has already passed without a checkpoint cannot be added later.
    """
    trunk = derive(base, "trunk", runs, tst=BASELINE_TST, optim={"decay_fraction": 0.0}, checkpoint={"every": 0})
    forks = {steps: fork_step(base, steps) for steps in lengths}
    checkpoints = _extend_trunk(trunk, [f for f in forks.values() if f > 0], progress)
    trunk_rows = read_metrics(trunk.run_dir / "metrics.jsonl") if any(forks.values()) else []
    members = []
    for steps in sorted(set(lengths)):
        cfg = derive(base, f"baseline-{steps}", runs, tst=BASELINE_TST, train={"steps": steps},
                     checkpoint={"every": 0})
        fork = forks[steps]
        _ensure_run(cfg, checkpoints[fork] if fork else None, progress)
        rows = [r for r in trunk_rows if r["step"] <= fork] + read_metrics(cfg.run_dir / "metrics.jsonl")
        last = rows[-1]
        members.append(Member(steps, fork, last["val_loss"], last["wall_time"], last["flops"], rows))
    return members


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
    text_tokens: int
    baseline_steps: float
    bound: str
    speedup: float
    """Iso-loss speedup in steps, equal to the model-FLOPs speedup (every step costs the same model FLOPs)."""
    flops_speedup: float
    """Baseline model FLOPs over TST model + superposition overhead FLOPs at equal loss."""
    wall_speedup: float
    spike: dict[str, Any]
    run_dir: str
    rows: list[dict[str, Any]] = field(repr=False)


def overhead_flops(cfg: RunConfig) -> int:
    """FLOPs the bag means and multi-hot gathers add over the whole run (the model FLOPs are a baseline's); for the
    input/output ablations, which do only one of the two, an upper bound."""
    info = json.loads((cfg.run_dir / "run.json").read_text())
    config = model_config(cfg.model.preset, info["vocab_size"], **cfg.model.overrides)
    schedule = cfg.phase_schedule()
    starts = [0, *schedule.ends[:-1]]
    return sum((end - start) * superpose_overhead_flops(config, cfg.train.batch_size, cfg.train.seq_len, st.bag)
               for st, start, end in zip(schedule.stages, starts, schedule.ends) if st.bag > 1)


def run_arm(base: RunConfig, variant: Variant, family: list[Member], runs: Path, progress: bool = True) -> Arm:
    """Train (or reuse) one TST run and read its iso-loss speedup off ``family`` (same seed, same config)."""
    tst = {**BASELINE_TST, **{k: v for k, v in asdict(base.tst).items() if k in ("weighting", "alpha")},
           **variant.tst}
    cfg = derive(base, f"{variant.label}-T{base.train.steps}", runs, tst=tst, checkpoint={"every": 0})
    _ensure_run(cfg, None, progress)
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    last, steps = rows[-1], cfg.train.steps
    lengths = [m.steps for m in family]
    iso = iso_loss_steps(lengths, [m.final_val_loss for m in family], last["val_loss"])
    extra = overhead_flops(cfg)
    same_length = next((m for m in family if m.steps == steps), None)
    return Arm(
        label=variant.label, seed=cfg.seed, steps=steps, mode=cfg.tst.mode, final_val_loss=last["val_loss"],
        flops=last["flops"], overhead_flops=extra, wall_time=last["wall_time"], text_tokens=last["text_tokens"],
        baseline_steps=iso.baseline_steps, bound=iso.bound, speedup=iso.speedup(steps),
        flops_speedup=at_steps(lengths, [m.flops for m in family], iso.baseline_steps) / (last["flops"] + extra),
        wall_speedup=at_steps(lengths, [m.wall_time for m in family], iso.baseline_steps) / last["wall_time"],
        spike=measure_spike(rows, same_length.rows) if same_length else {}, run_dir=str(cfg.run_dir), rows=rows,
    )


@dataclass
class Comparison:
    """Everything a report shows: the setup, each seed's family, every arm, per-variant summaries."""

    config: dict[str, Any]
    runs: str
    family: dict[int, list[Member]]
    arms: list[Arm]
    summaries: list[dict[str, Any]]
    recommendation: str
    setup: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def _preflight(base: RunConfig, variants: Sequence[Variant], seeds: int, family: Sequence[float]) -> None:
    """Every input problem as one line, before any run is trained."""
    if seeds < 1:
        raise SuperposeError(f"--seeds must be >= 1, got {seeds}")
    if not variants:
        raise SuperposeError("nothing to compare: no TST variant given")
    family_lengths(family, base.train.steps)
    check_warmup_fits(base, family)
    data = open_dataset(base.data.path, tokenizer=base.data.tokenizer or None)
    try:
        val = data.split("val")
    except SuperposeError:
        raise SuperposeError(f"{base.data.path} has no validation split, and iso-loss needs validation losses; "
                             "prepare it with --val-fraction > 0") from None
    validation_windows(val, base.micro_batch_size(1), base.train.seq_len, base.eval.batches)
    for variant in variants:
        cfg = derive(base, tst={**BASELINE_TST, **variant.tst})
        if max(cfg.phase_schedule().bags()) < 2:
            raise SuperposeError(f"{variant.label}: TST needs a stage with bag >= 2 and a ratio > 0 "
                                 "(bag 1 or ratio 0 is the baseline itself)")
        if not cfg.tst.schedule and cfg.tst.ratio <= 0:
            raise SuperposeError(f"{variant.label}: tst.ratio must be > 0 for TST")


def compare(base: RunConfig, variants: Sequence[Variant], seeds: int = 1, family: Sequence[float] = DEFAULT_FAMILY,
            runs: Path | None = None, progress: bool = True) -> Comparison:
    """Run a baseline family and every TST variant for ``seeds`` seeds (``base.seed``, ``base.seed + 1``, ...)."""
    _preflight(base, variants, seeds, family)
    runs = Path(runs or base.run_dir)
    lengths = family_lengths(family, base.train.steps)
    families, arms = {}, []
    for k in range(seeds):
        seeded = derive(base, seed=base.seed + k)
        folder = runs / f"seed-{seeded.seed}"
        families[seeded.seed] = baseline_family(seeded, lengths, folder, progress)
        arms += [run_arm(seeded, v, families[seeded.seed], folder, progress) for v in variants]
    summaries = [summarize([a for a in arms if a.label == v.label]) for v in variants]
    return Comparison(base.to_dict(), str(runs), families, arms, summaries, recommend(summaries), _setup(base, arms))


def _setup(base: RunConfig, arms: Sequence[Arm]) -> dict[str, Any]:
    """The shared setup a reader needs to judge the numbers: model size, shapes, FLOPs per step, the overhead."""
    info = json.loads((Path(arms[0].run_dir) / "run.json").read_text())
    phase1 = [a for a in arms if a.overhead_flops]
    overhead = max((a.overhead_flops / a.flops for a in phase1), default=0.0)
    return {
        "preset": base.model.preset, "overrides": base.model.overrides, "parameters": info["parameters"],
        "active_parameters": info["active_parameters"], "vocab_size": info["vocab_size"], "device": info["device"],
        "batch_size": base.train.batch_size, "seq_len": base.train.seq_len, "steps": base.train.steps,
        "flops_per_step": info["flops_per_step"], "lr": base.optim.lr, "lr_schedule": base.optim.lr_schedule,
        "warmup_steps": base.optim.warmup_steps, "decay_fraction": base.optim.decay_fraction,
        "overhead_fraction_of_run_flops": overhead,
    }
