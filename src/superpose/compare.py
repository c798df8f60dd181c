"""Matched-FLOPs comparison of TST against ordinary training: the runs, the iso-loss speedup, the report.

Every run of a comparison shares the model, initialisation seed, batch, positions ``L``, optimizer and LR schedule,
so every step costs the same model FLOPs; only the bag schedule differs. The **iso-loss speedup** of a TST run of
``T`` steps is ``T_base / T``, where ``T_base`` is the number of baseline steps that reach the TST run's final
validation loss. A warmup-stable-decay baseline stopped early is not a finished run (it never decayed), so
``T_base`` is read off a *family* of finished baselines of several lengths ``T_k``, interpolated linearly in
``log(steps)`` between the two members whose final losses bracket the target. Outside the family's range the
speedup is a bound (``> longest/T`` or ``< shortest/T``), never an extrapolation.

The family costs little: a WSD LR depends on the run length only through where the decay starts, so every member
is forked from one constant-LR *trunk* at its decay start ``T_k - decay_k`` and decays on its own (forking resumes the
trunk's checkpoint exactly: model, optimizer, loader position, counters). A cosine LR has no shared prefix, so its
members are trained from scratch.

Runs live in ``RUNS/seed-N/NAME``; a finished run whose config matches is reused, an interrupted one continued, so
comparisons that share a runs folder (a sweep, a trend study) train each baseline once. This module drives the
trainer through its public API only.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data.loader import validation_windows
from .data.shards import open_dataset
from .errors import SuperposeError
from .flops import superpose_overhead_flops
from .models import model_config
from .schedule import wsd_decay_start
from .train.checkpoint import checkpoint_name, list_checkpoints
from .train.config import RunConfig, TSTConfig, config_from_dict, load_config
from .train.loop import train
from .train.metrics import read_metrics

DEFAULT_FAMILY = (0.5, 1.0, 2.0, 4.0)
SMOOTH = 5
"""Phase-1 train-loss rows averaged for the run's own jump at the switch (single-batch losses are noisy)."""


# --------------------------------------------------------------------------- the arithmetic (pure, tested alone)


@dataclass
class IsoLoss:
    """Where a baseline family reaches a target loss: steps (interpolated), or a bound outside the family."""

    baseline_steps: float
    bound: str
    """"" inside the family; ">" the target is below every member (the speedup is at least this); "<" above."""

    def speedup(self, steps: float) -> float:
        return self.baseline_steps / steps


def iso_loss_steps(lengths: Sequence[float], losses: Sequence[float], target: float) -> IsoLoss:
    """Baseline steps that reach ``target``: linear in log(steps) between the first bracketing pair of members.

    Members are taken in order of length; the first member at or below the target ends the search, so a noisy,
    non-monotone family gives the earliest crossing.
    """
    pairs = sorted(zip(lengths, losses))
    if not pairs:
        raise SuperposeError("the baseline family is empty")
    for i, (steps, loss) in enumerate(pairs):
        if loss <= target:
            if i == 0:
                return IsoLoss(steps, "" if loss == target else "<")
            (s0, l0), (s1, l1) = pairs[i - 1], (steps, loss)
            frac = (l0 - target) / (l0 - l1)
            return IsoLoss(math.exp(math.log(s0) + frac * (math.log(s1) - math.log(s0))), "")
    return IsoLoss(pairs[-1][0], ">")


def format_speedup(value: float, bound: str = "") -> str:
    return f"{bound + ' ' if bound else ''}{value:.2f}x"


def switch_to_tokens(rows: Sequence[dict[str, Any]]) -> int | None:
    """The 1-based step of the first next-token (bag 1) step after the last superposition stage, if any."""
    for prev, row in zip(reversed(rows[:-1]), reversed(rows)):
        if row["bag"] == 1 and prev["bag"] > 1:
            return row["step"]
    return None


def measure_spike(tst_rows: Sequence[dict[str, Any]], base_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The loss spike at the switch to next-token training, measured against the baseline at the same steps.

    Measured on the validation loss (fixed held-out windows), the only loss comparable between the runs: after
    phase 1 the TST run reads other parts of the corpus than the baseline at the same step, and phase-1 train losses
    are multi-hot. ``height``: TST minus baseline validation loss at the switch (an eval on the last phase-1 step
    measures the next-token loss the first phase-2 step starts from; without one, the first eval after it).
    ``half_recovery_steps`` / ``recovery_steps``: phase-2 steps until that excess has halved / reached 0, to the
    resolution of ``eval.every`` (``None``: not within the run); ``final_gap``: the excess at the end. ``jump``: the
    run's own train loss at its first next-token step minus its last phase-1 (multi-hot) train losses.
    """
    switch = switch_to_tokens(tst_rows)
    base = {r["step"]: r["val_loss"] for r in base_rows if "val_loss" in r}
    excess = [(r["step"], r["val_loss"] - base[r["step"]]) for r in tst_rows
              if switch is not None and r["step"] >= switch - 1 and "val_loss" in r and r["step"] in base]
    if not excess:
        return {}
    height = excess[0][1]
    half = next((step - switch + 1 for step, e in excess if e <= height / 2), None) if height > 0 else 0
    recovered = next((step - switch + 1 for step, e in excess if e <= 0), None)
    before = [r["train_loss"] for r in tst_rows if r["step"] < switch][-SMOOTH:]
    after = next(r["train_loss"] for r in tst_rows if r["step"] == switch)
    return {"switch_step": switch, "height": height, "measured_at": excess[0][0],
            "jump": after - statistics.fmean(before), "half_recovery_steps": half, "recovery_steps": recovered,
            "final_gap": excess[-1][1]}


# --------------------------------------------------------------------------- runs


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


def _derive(base: RunConfig, name: str, runs: Path, **sections: dict[str, Any]) -> RunConfig:
    """A config that differs from ``base`` only in the named sections' keys (validated like a file)."""
    data = base.to_dict()
    data.update(name=name, out_dir=str(runs))
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return config_from_dict(data)


_BASELINE_TST = {"bag": 1, "ratio": 0.0, "schedule": [], "mode": "both", "rewarmup_steps": 0, "rescale_mean": False}


def _same_run(cfg: RunConfig, ignore_steps: bool = False) -> None:
    """Refuse to reuse a run folder whose run was made with a different config."""
    saved = load_config(cfg.run_dir / "config.toml").to_dict()
    mine = cfg.to_dict()
    if ignore_steps:
        saved["train"]["steps"] = mine["train"]["steps"]
    if saved != mine:
        raise SuperposeError(f"{cfg.run_dir} holds a run with a different config; use another --out or --runs folder")


def _finished(cfg: RunConfig) -> bool:
    path = cfg.run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []
    return bool(rows) and rows[-1]["step"] == cfg.train.steps and "val_loss" in rows[-1]


def _train(cfg: RunConfig, resume: bool | Path, progress: bool) -> None:
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
            _train(cfg, True, progress)
            return
    _train(cfg, fork or False, progress)


def fork_step(cfg: RunConfig, steps: int) -> int:
    """Where a baseline of ``steps`` steps leaves the constant-LR trunk: its decay start (0: no shared prefix)."""
    if cfg.optim.lr_schedule != "wsd":
        return 0
    return wsd_decay_start(steps, cfg.optim.decay_fraction)


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
    trunk = _derive(base, "trunk", runs, tst=_BASELINE_TST, optim={"decay_fraction": 0.0}, checkpoint={"every": 0})
    forks = {steps: fork_step(base, steps) for steps in lengths}
    for fork in sorted({f for f in forks.values() if f > 0}):
        have = {int(p.name.removeprefix("step-")) for p in list_checkpoints(trunk.run_dir)}
        if fork in have:
            continue
        if have and max(have) > fork:
            raise SuperposeError(f"{trunk.run_dir} passed step {fork} without a checkpoint; use a fresh --runs folder")
        segment = _derive(trunk, "trunk", runs, train={"steps": fork})
        if have:
            _same_run(segment, ignore_steps=True)
        _train(segment, bool(have), progress)
    trunk_rows = read_metrics(trunk.run_dir / "metrics.jsonl") if any(forks.values()) else []
    members = []
    for steps in sorted(set(lengths)):
        cfg = _derive(base, f"baseline-{steps}", runs, tst=_BASELINE_TST, train={"steps": steps},
                      checkpoint={"every": 0})
        fork = forks[steps]
        _ensure_run(cfg, trunk.run_dir / "checkpoints" / checkpoint_name(fork) if fork else None, progress)
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
    tst = {**_BASELINE_TST, **{k: v for k, v in asdict(base.tst).items() if k in ("weighting", "alpha")},
           **variant.tst}
    cfg = _derive(base, f"{variant.label}-T{base.train.steps}", runs, tst=tst, checkpoint={"every": 0})
    _ensure_run(cfg, None, progress)
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    last = rows[-1]
    iso = iso_loss_steps([m.steps for m in family], [m.final_val_loss for m in family], last["val_loss"])
    lengths = [m.steps for m in family]
    base_wall = float(np.interp(iso.baseline_steps, lengths, [m.wall_time for m in family]))
    base_flops = float(np.interp(iso.baseline_steps, lengths, [m.flops for m in family]))
    extra = overhead_flops(cfg)
    same_length = next((m for m in family if m.steps == cfg.train.steps), None)
    return Arm(
        label=variant.label, seed=cfg.seed, steps=cfg.train.steps, mode=cfg.tst.mode,
        final_val_loss=last["val_loss"], flops=last["flops"], overhead_flops=extra, wall_time=last["wall_time"],
        text_tokens=last["text_tokens"], baseline_steps=iso.baseline_steps, bound=iso.bound,
        speedup=iso.speedup(cfg.train.steps), flops_speedup=base_flops / (last["flops"] + extra),
        wall_speedup=base_wall / last["wall_time"],
        spike=measure_spike(rows, same_length.rows) if same_length else {},
        run_dir=str(cfg.run_dir), rows=rows,
    )


# --------------------------------------------------------------------------- comparisons


def summarize(arms: Sequence[Arm]) -> dict[str, Any]:
    """Mean and spread (sample std) over seeds of one variant; bounds are kept as bounds, never averaged."""
    values = [a.speedup for a in arms]
    losses = [a.final_val_loss for a in arms]
    bounds = {a.bound for a in arms}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    if bounds == {""}:
        text = format_speedup(statistics.fmean(values)) + (f" ± {std:.2f}" if len(values) > 1 else "")
    elif len(bounds) == 1:
        bound = bounds.pop()
        text = format_speedup((min if bound == ">" else max)(values), bound)
    else:
        text = "mixed: " + ", ".join(format_speedup(a.speedup, a.bound) for a in arms)
    spikes = [a.spike["height"] for a in arms if a.spike]
    halves = [a.spike["half_recovery_steps"] for a in arms if a.spike and a.spike["half_recovery_steps"] is not None]
    return {
        "label": arms[0].label, "mode": arms[0].mode, "seeds": len(arms), "speedup_text": text,
        "speedup_mean": statistics.fmean(values), "speedup_std": std, "bounded": bounds != {""},
        "wall_speedup_mean": statistics.fmean(a.wall_speedup for a in arms),
        "final_val_loss_mean": statistics.fmean(losses),
        "final_val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "spike_height_mean": statistics.fmean(spikes) if spikes else None,
        "half_recovery_steps_mean": statistics.fmean(halves) if halves else None,
    }


def recommend(summaries: Sequence[dict[str, Any]]) -> str:
    """Name the best TST setting only if its speedup beats 1 by more than its seed spread; otherwise say so."""
    candidates = [s for s in summaries if s["mode"] == "both"]
    if not candidates:
        return "no recommendation: no full-TST (mode both) arm was run"
    best = max(candidates, key=lambda s: s["speedup_mean"])
    beyond_noise = best["speedup_mean"] - best["speedup_std"] > 1.0
    clears = beyond_noise and (not best["bounded"] or best["speedup_text"].startswith(">"))
    if clears and best["seeds"] > 1:
        return f"recommended: {best['label']} (iso-loss speedup {best['speedup_text']} over {best['seeds']} seeds)"
    if clears:
        return (f"promising but unconfirmed: {best['label']} ({best['speedup_text']}, one seed); "
                "rerun with --seeds 2 or more before relying on it")
    return (f"no recommendation: the best setting, {best['label']}, reaches {best['speedup_text']}, which does not "
            "beat the baseline at this scale; train without TST here, or measure at a larger model or a longer run")


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
    if not family or any(m <= 0 for m in family) or 1.0 not in family:
        raise SuperposeError(f"--family must be positive multiples of the run length that include 1, "
                             f"got {list(family)}")
    data = open_dataset(base.data.path, tokenizer=base.data.tokenizer or None)
    try:
        val = data.split("val")
    except SuperposeError:
        raise SuperposeError(f"{base.data.path} has no validation split, and iso-loss needs validation losses; "
                             "prepare it with --val-fraction > 0") from None
    validation_windows(val, base.micro_batch_size(1), base.train.seq_len, base.eval.batches)
    for variant in variants:
        cfg = _derive(base, "check", Path(base.out_dir), tst={**_BASELINE_TST, **variant.tst})
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
    lengths = sorted({max(1, round(m * base.train.steps)) for m in family})
    families, arms = {}, []
    for k in range(seeds):
        seeded = _with_seed(base, base.seed + k)
        folder = runs / f"seed-{seeded.seed}"
        families[seeded.seed] = baseline_family(seeded, lengths, folder, progress)
        arms += [run_arm(seeded, v, families[seeded.seed], folder, progress) for v in variants]
    summaries = [summarize([a for a in arms if a.label == v.label]) for v in variants]
    return Comparison(base.to_dict(), str(runs), families, arms, summaries, recommend(summaries), _setup(base, arms))


def _with_seed(base: RunConfig, seed: int) -> RunConfig:
    data = base.to_dict()
    data["seed"] = seed
    return config_from_dict(data)


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


def variants_for(base: RunConfig, modes: Sequence[str] = ("both",), **tst: Any) -> list[Variant]:
    """One variant per objective (``both``/``input``/``output``) over the base config's TST keys plus ``tst``."""
    out = []
    for mode in modes:
        keys = {k: v for k, v in asdict(base.tst).items() if k not in ("weighting", "alpha")}
        keys.update(tst, mode=mode)
        cfg = _derive(base, "check", Path(base.out_dir), tst=keys)
        out.append(Variant(variant_label(cfg.tst), keys))
    return out


# --------------------------------------------------------------------------- report


def _json_ready(comparison: Comparison) -> dict[str, Any]:
    def member(m: Member) -> dict[str, Any]:
        return {k: v for k, v in asdict(m).items() if k != "rows"}

    return {
        "method": METHOD,
        "setup": comparison.setup,
        "config": comparison.config,
        "runs": comparison.runs,
        "family": {str(seed): [member(m) for m in ms] for seed, ms in comparison.family.items()},
        "arms": [{k: v for k, v in asdict(a).items() if k != "rows"} for a in comparison.arms],
        "summaries": comparison.summaries,
        "recommendation": comparison.recommendation,
        **comparison.extra,
    }


METHOD = (
    "Iso-loss speedup = (baseline steps that reach the TST run's final validation loss) / (TST steps). All runs share "
    "model, initialisation, batch, positions, optimizer and LR schedule, so a step costs the same model FLOPs in both "
    "and the steps ratio is the FLOPs ratio (the superposition overhead is added to the TST side for the FLOPs "
    "speedup). The baseline steps are read off a family of finished baselines (each with its own LR decay), linearly "
    "in log(steps) between the two members that bracket the TST loss; WSD members are forked from one constant-LR "
    "trunk at their decay start. A TST loss below every member gives a lower bound (> longest/T), above every "
    "member an upper bound (< shortest/T). Wall-clock speedup: baseline wall time interpolated at those steps over "
    "the TST run's wall time. Spread: sample standard deviation over seeds (each seed has its own family)."
)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def report_markdown(comparison: Comparison, title: str, command: str, plots: Sequence[str]) -> str:
    """The human-readable report: setup, method, family, every arm, summaries, ablations, the switch, verdict."""
    s = comparison.setup
    out = [f"# {title}", "", f"Command: `{command}`", "",
           f"Model `{s['preset']}`{' ' + str(s['overrides']) if s['overrides'] else ''}: "
           f"{s['parameters']:,} parameters "
           f"(vocab {s['vocab_size']}), batch {s['batch_size']} x {s['seq_len']} positions, {s['steps']} steps, "
           f"{s['lr_schedule']} LR {s['lr']:g} (warmup {s['warmup_steps']}, decay {s['decay_fraction']:g}), "
           f"device {s['device']}. Model FLOPs per step {s['flops_per_step']:.3e}, the same for TST and baseline; the "
           f"superposition overhead adds at most {s['overhead_fraction_of_run_flops']:.1e} of a run's FLOPs.",
           "", f"**Verdict:** {comparison.recommendation}.", "", "## How the speedup is computed", "", METHOD, ""]
    out += ["## Summary", "", _table(
        ["variant", "seeds", "final val loss", "iso-loss speedup (steps = FLOPs)", "wall-clock speedup",
         "spike (nat)", "half-recovery (steps)"],
        [[x["label"], x["seeds"], f"{x['final_val_loss_mean']:.4f} ± {x['final_val_loss_std']:.4f}", x["speedup_text"],
          f"{x['wall_speedup_mean']:.2f}x", _fmt(x["spike_height_mean"], ".3f"),
          _fmt(x["half_recovery_steps_mean"], ".0f")] for x in comparison.summaries])]
    base_losses = [m.final_val_loss for ms in comparison.family.values() for m in ms if m.steps == s["steps"]]
    if len({a.mode for a in comparison.arms}) > 1 and base_losses:
        base_loss = statistics.fmean(base_losses)
        out += ["", "## Ablation (equal steps and model FLOPs)", "", _table(
            ["objective", "final val loss", "vs baseline", "iso-loss speedup"],
            [["baseline (bag 1)", f"{base_loss:.4f}", "–", "1.00x"]] + [
                [f"{x['mode']} ({x['label']})", f"{x['final_val_loss_mean']:.4f}",
                 f"{x['final_val_loss_mean'] - base_loss:+.4f}", x["speedup_text"]] for x in comparison.summaries])]
    out += ["", "## Runs", "", _table(
        ["variant", "seed", "final val loss", "baseline steps at that loss", "speedup", "FLOPs speedup",
         "wall s", "wall speedup", "text tokens", "spike", "own jump", "half-recovery", "recovered", "final gap"],
        [[a.label, a.seed, f"{a.final_val_loss:.4f}", f"{a.bound} {a.baseline_steps:.0f}".strip(),
          format_speedup(a.speedup, a.bound), format_speedup(a.flops_speedup, a.bound), f"{a.wall_time:.0f}",
          format_speedup(a.wall_speedup, a.bound), f"{a.text_tokens:,}", _fmt(a.spike.get("height"), ".3f"),
          _fmt(a.spike.get("jump"), "+.3f"),
          _fmt(a.spike.get("half_recovery_steps"), "d"), _fmt(a.spike.get("recovery_steps"), "d"),
          _fmt(a.spike.get("final_gap"), "+.3f")] for a in comparison.arms])]
    out += ["", "Spike: TST minus baseline validation loss at the switch (an eval on the last phase-1 step; the "
            "validation windows are the only loss both runs see alike); own jump: the run's first next-token train "
            "loss minus its last phase-1 (multi-hot) train losses; half-recovery / recovered: phase-2 steps until the "
            "validation excess has halved / reached 0, to the resolution of eval.every (– = not within the run); "
            "final gap: the excess at the end.",
            "", "## Baseline family", "", _table(
                ["seed", "steps", "forked at", "final val loss", "wall s"],
                [[seed, m.steps, m.fork, f"{m.final_val_loss:.4f}", f"{m.wall_time:.0f}"]
                 for seed, ms in comparison.family.items() for m in ms])]
    out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def write_report(comparison: Comparison, out: Path, title: str, command: str,
                 extra_md: str = "", extra_plots: Sequence[str] = ()) -> Path:
    """Write report.md, report.json and the PNG plots into ``out``; returns the report.md path."""
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    first_seed = min(comparison.family)
    family = comparison.family[first_seed]
    reference = next(m for m in family if m.steps == comparison.setup["steps"])
    tst = {f"{a.label} seed {a.seed}": a.rows for a in comparison.arms}
    files = [
        plots.plot_curves(out / "loss_curves.png",
                          {f"baseline {m.steps} seed {first_seed}": m.rows for m in family}, tst),
        plots.plot_family(out / "family.png",
                          {seed: [(m.steps, m.final_val_loss) for m in ms] for seed, ms in comparison.family.items()},
                          [(f"{a.label} seed {a.seed}", a.steps, a.final_val_loss, a.baseline_steps,
                            format_speedup(a.speedup, a.bound)) for a in comparison.arms]),
    ]
    switching = [a for a in comparison.arms if a.spike and a.seed == first_seed]
    if switching:
        files.append(plots.plot_switch(out / "switch.png", reference.rows,
                                       {a.label: (a.rows, a.spike) for a in switching}))
    files += list(extra_plots)
    (out / "report.json").write_text(json.dumps({"title": title, "command": command, **_json_ready(comparison)},
                                                 indent=2))
    path = out / "report.md"
    path.write_text(report_markdown(comparison, title, command, [str(f) for f in files]) + extra_md)
    return path


# --------------------------------------------------------------------------- sweep


def sweep(base: RunConfig, bags: Sequence[int], ratios: Sequence[float], seeds: int = 1,
          family: Sequence[float] = DEFAULT_FAMILY, runs: Path | None = None, progress: bool = True) -> Comparison:
    """A compare over the grid bags x ratios (two-phase TST), sharing each seed's baseline family."""
    if not bags or not ratios:
        raise SuperposeError("sweep needs at least one bag and one ratio")
    variants = [v for bag in bags for ratio in ratios for v in variants_for(base, ("both",), bag=bag, ratio=ratio,
                                                                             schedule=[])]
    result = compare(base, variants, seeds, family, runs, progress)
    result.extra["grid"] = {"bags": list(bags), "ratios": list(ratios)}
    return result


def sweep_extras(result: Comparison, out: Path) -> tuple[str, list[str]]:
    """The sweep's grid table (final loss and speedup per bag x ratio) and its heatmap."""
    from . import plots

    bags, ratios = result.extra["grid"]["bags"], result.extra["grid"]["ratios"]
    by_label = {x["label"]: x for x in result.summaries}
    cells = [[by_label[f"s{bag}-r{ratio:g}"] for ratio in ratios] for bag in bags]
    table = _table(["bag \\ ratio", *[f"{r:g}" for r in ratios]],
                   [[bag, *[f"{c['final_val_loss_mean']:.4f} / {c['speedup_text']}" for c in row]]
                    for bag, row in zip(bags, cells)])
    heat = plots.plot_heatmaps(out / "sweep_heatmap.png", bags, ratios,
                               [[c["final_val_loss_mean"] for c in row] for row in cells],
                               [[c["speedup_mean"] for c in row] for row in cells],
                               [[c["speedup_text"] for c in row] for row in cells])
    return "\n## Grid: final val loss / iso-loss speedup\n\n" + table + "\n", [str(heat)]
