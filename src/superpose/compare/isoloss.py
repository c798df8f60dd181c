"""The iso-loss arithmetic: baseline steps at a target loss, speedups with bounds, the spike at the switch, seed
summaries and the verdict. Pure functions over numbers and metrics rows: no files, no torch, tested alone.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ..errors import SuperposeError

DEFAULT_FAMILY = (0.5, 1.0, 2.0, 4.0)
"""Baseline lengths as multiples of the TST run's steps; the CLI's ``--family`` default."""
SMOOTH = 5
"""Phase-1 train-loss rows averaged for the run's own jump at the switch (single-batch losses are noisy)."""


def member_steps(multiple: float, steps: int) -> int:
    """The length of the family member ``multiple`` times a run of ``steps`` steps (at least one step)."""
    return max(1, round(multiple * steps))


def family_lengths(multiples: Sequence[float], steps: int) -> list[int]:
    """The family's lengths in steps, shortest first; the multiples must be positive and include 1 (the TST run's
    own length, where the spike is measured and the ablation table reads its baseline)."""
    if not multiples or any(not m > 0 or not math.isfinite(m * steps) for m in multiples) or 1.0 not in multiples:
        raise SuperposeError(f"--family must be positive finite multiples of the run length that include 1, "
                             f"got {list(multiples)}")
    return sorted({member_steps(m, steps) for m in multiples})


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


def iso_loss_partial(lengths: Sequence[float], losses: Mapping[float, float], target: float) -> IsoLoss:
    """:func:`iso_loss_steps` over the finished members (``losses``: length -> final loss) of a family planned with
    ``lengths``. Outside them it is a bound as usual; between two finished members with an unfinished one in between,
    where the crossing lies is not known yet, so it is the lower bound at the shorter of the two."""
    iso = iso_loss_steps(list(losses), list(losses.values()), target)
    if iso.bound:
        return iso
    below = max(s for s in losses if s <= iso.baseline_steps)
    above = min(s for s in losses if s >= iso.baseline_steps)
    if any(below < s < above for s in lengths if s not in losses):
        return IsoLoss(below, ">")
    return iso


def at_steps(lengths: Sequence[float], values: Sequence[float], steps: float) -> float:
    """A family quantity (wall time, FLOPs) at ``steps``, linear between members, clamped to the family's range."""
    pairs = sorted(zip(lengths, values))
    return float(np.interp(steps, [p[0] for p in pairs], [p[1] for p in pairs]))


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
    are multi-hot. ``height``: TST minus baseline validation loss at the first eval both runs made at or after the
    last phase-1 step; ``measured_at`` is that step and ``measured_after``: how many next-token steps had already
    run there (0: the eval saw the weights the first next-token step starts from; more: part of the spike may have
    recovered, so the height is a lower bound). ``half_recovery_steps`` / ``recovery_steps``: phase-2 steps until
    that excess has halved / reached 0, to the resolution of ``eval.every`` (``None``: not within the run);
    ``final_gap``: the excess at the end. ``jump``: the run's own train loss at its first next-token step minus its
    last phase-1 (multi-hot) train losses.
    """
    switch = switch_to_tokens(tst_rows)
    if switch is None:
        return {}
    base = {r["step"]: r["val_loss"] for r in base_rows if "val_loss" in r}
    excess = [(r["step"], r["val_loss"] - base[r["step"]]) for r in tst_rows
              if r["step"] >= switch - 1 and "val_loss" in r and r["step"] in base]
    if not excess:
        return {}
    (measured_at, height), last_phase1 = excess[0], switch - 1
    half = next((step - last_phase1 for step, e in excess if e <= height / 2), None) if height > 0 else 0
    recovered = next((step - last_phase1 for step, e in excess if e <= 0), None)
    before = [r["train_loss"] for r in tst_rows if r["step"] < switch][-SMOOTH:]
    after = next(r["train_loss"] for r in tst_rows if r["step"] == switch)
    return {"switch_step": switch, "height": height, "measured_at": measured_at,
            "measured_after": measured_at - last_phase1, "jump": after - statistics.fmean(before),
            "half_recovery_steps": half, "recovery_steps": recovered, "final_gap": excess[-1][1]}


def _mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


class ArmResult(Protocol):
    """What :func:`summarize` reads of one finished TST arm (``results.Arm`` is one): declared here, so the pure
    arithmetic imports nothing from the modules that read runs."""

    label: str
    mode: str
    speedup: float
    bound: str
    final_val_loss: float
    wall_speedup: float
    gpu_hours_speedup: float
    spike: dict[str, Any]


def summarize(arms: Sequence[ArmResult]) -> dict[str, Any]:
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
    spikes = [a.spike for a in arms if a.spike]
    return {
        "label": arms[0].label, "mode": arms[0].mode, "seeds": len(arms), "speedup_text": text,
        "speedup_mean": statistics.fmean(values), "speedup_std": std, "bounded": bounds != {""},
        "wall_speedup_mean": statistics.fmean(a.wall_speedup for a in arms),
        "gpu_hours_speedup_mean": statistics.fmean(a.gpu_hours_speedup for a in arms),
        "final_val_loss_mean": statistics.fmean(losses),
        "final_val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "spike_height_mean": _mean_or_none([s["height"] for s in spikes]),
        "spike_measured_after_mean": _mean_or_none([s["measured_after"] for s in spikes]),
        "half_recovery_steps_mean": _mean_or_none([s["half_recovery_steps"] for s in spikes
                                                   if s["half_recovery_steps"] is not None]),
    }


def best_full_tst(summaries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The full-TST (mode ``both``) variant with the highest mean speedup, the one a verdict speaks of; None if none."""
    return max((s for s in summaries if s["mode"] == "both"), default=None, key=lambda s: s["speedup_mean"])


def recommend(summaries: Sequence[dict[str, Any]]) -> str:
    """Name the best TST setting only if its speedup beats 1 by more than its seed spread; otherwise say so."""
    best = best_full_tst(summaries)
    if best is None:
        return "no recommendation: no full-TST (mode both) arm was run"
    beyond_noise = best["speedup_mean"] - best["speedup_std"] > 1.0
    clears = beyond_noise and (not best["bounded"] or best["speedup_text"].startswith(">"))
    if clears and best["seeds"] > 1:
        return f"recommended: {best['label']} (iso-loss speedup {best['speedup_text']} over {best['seeds']} seeds)"
    if clears:
        return (f"promising but unconfirmed: {best['label']} ({best['speedup_text']}, one seed); "
                "rerun with --seeds 2 or more before relying on it")
    return (f"no recommendation: the best setting, {best['label']}, reaches {best['speedup_text']}, which does not "
            "beat the baseline at this scale; train without TST here, or measure at a larger model or a longer run")
