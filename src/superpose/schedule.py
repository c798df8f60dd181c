"""Schedules as data: which bag size a step trains at, and its learning rate.

A phase schedule is a list of stages ``(until, bag)``: a stage lasts until ``until`` (an absolute step when an
``int``, a fraction of the run when a ``float`` in [0, 1]) and trains at ``bag``. The paper's recipe is
``[(r, s), (1.0, 1)]``; multi-stage schedules (e.g. ``[(0.1, 8), (0.2, 4), (1.0, 1)]``) work the same way. The LR
schedules span the whole run, across phases, as the paper carries optimizer state and schedule over the switch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Stage:
    """One stage of a phase schedule: train at ``bag`` until ``until`` (exclusive end step, or run fraction)."""

    until: int | float
    bag: int


def two_phase_stages(bag: int, ratio: float) -> list[Stage]:
    """The stages of the paper's recipe: ``bag`` for the first ``ratio`` of the run, then bag 1."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return [Stage(float(ratio), bag), Stage(1.0, 1)]


class PhaseSchedule:
    """Resolved stages for a run of ``total_steps`` optimizer steps; ``bag_at(step)`` is the only query a loop needs.

    ``stages``/``ends`` hold the phases the run trains: each a bag and its exclusive end step, in order.
    """

    def __init__(self, stages: Sequence[Stage | tuple[int | float, int]], total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not stages:
            raise ValueError("a phase schedule needs at least one stage")
        self.total_steps = total_steps
        stages_in = [s if isinstance(s, Stage) else Stage(*s) for s in stages]
        ends: list[int] = []
        for i, stage in enumerate(stages_in):
            if isinstance(stage.bag, bool) or not isinstance(stage.bag, int) or stage.bag < 1:
                raise ValueError(f"stage {i}: bag must be an integer >= 1, got {stage.bag!r}")
            ends.append(self._end_step(i, stage.until))
            if ends[-1] < (ends[-2] if i else 0):
                raise ValueError(f"stage {i} ends at step {ends[-1]}, before the stage before it; stages must be in order")
        if ends[-1] < total_steps:
            raise ValueError(f"the last stage ends at step {ends[-1]} but the run has {total_steps} steps; end it at 1.0")
        # Phases are what a run actually trains: drop empty stages, merge neighbours with the same bag.
        self.stages, self.ends = [], []
        start = 0
        for stage, end in zip(stages_in, ends):
            end = min(end, total_steps)
            if end > start:
                if self.stages and self.stages[-1].bag == stage.bag:
                    self.stages[-1] = Stage(end, stage.bag)
                    self.ends[-1] = end
                else:
                    self.stages.append(Stage(end, stage.bag))
                    self.ends.append(end)
                start = end

    def _end_step(self, i: int, until: int | float) -> int:
        if isinstance(until, bool) or not isinstance(until, (int, float)):
            raise ValueError(f"stage {i}: until must be a step (int) or a fraction (float), got {until!r}")
        if isinstance(until, float):
            if not 0.0 <= until <= 1.0:
                raise ValueError(f"stage {i}: fraction {until} is outside [0, 1]")
            return round(until * self.total_steps)
        if until < 0:
            raise ValueError(f"stage {i}: step {until} is negative")
        return until

    @classmethod
    def two_phase(cls, bag: int, ratio: float, total_steps: int) -> "PhaseSchedule":
        """The paper's recipe: superposition at ``bag`` for the first ``ratio`` of steps, then ordinary training."""
        return cls(two_phase_stages(bag, ratio), total_steps)

    def stage_at(self, step: int) -> int:
        """Index of the phase (resolved stage) that step ``step`` (0-based) trains in."""
        for i, end in enumerate(self.ends):
            if step < end:
                return i
        return len(self.ends) - 1

    def bag_at(self, step: int) -> int:
        return self.stages[self.stage_at(step)].bag

    def switch_steps(self) -> list[int]:
        """Steps at which the bag size changes (the first step of a new phase)."""
        return self.ends[:-1]

    def bags(self) -> list[int]:
        """Bag sizes the run trains at, in phase order."""
        return [stage.bag for stage in self.stages]


def wsd_decay_start(total_steps: int, decay_fraction: float) -> int:
    """First step of the WSD decay (``total_steps`` when there is none); baseline forks leave the trunk here."""
    return total_steps - (max(1, round(decay_fraction * total_steps)) if decay_fraction > 0 else 0)


def lr_at(
    step: int,
    total_steps: int,
    *,
    peak: float,
    schedule: str = "wsd",
    warmup_steps: int = 0,
    decay_fraction: float = 0.2,
    min_ratio: float = 0.0,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    ``wsd``: linear warmup, constant, then linear decay to ``min_ratio * peak`` over the last ``decay_fraction``.
    ``cosine``: linear warmup, then cosine decay to ``min_ratio * peak`` at the last step.
    """
    floor = min_ratio * peak
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "wsd":
        decay_start = wsd_decay_start(total_steps, decay_fraction)
        decay_steps = total_steps - decay_start
        if decay_steps == 0 or step < decay_start:
            return peak
        progress = (step - decay_start + 1) / decay_steps
        return peak + (floor - peak) * progress
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps + 1) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {schedule!r}; choose 'wsd' or 'cosine'")


def rewarmup_factor(step: int, switch_steps: Sequence[int], rewarmup_steps: int) -> float:
    """LR multiplier that re-warms linearly over ``rewarmup_steps`` after the latest bag switch at or before ``step``.

    An option (off at 0) to soften the loss spike when the inputs change distribution at a switch.
    """
    since = [step - s for s in switch_steps if s <= step]
    if rewarmup_steps <= 0 or not since:
        return 1.0
    return min(1.0, (min(since) + 1) / rewarmup_steps)
