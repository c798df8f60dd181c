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

Runs live in ``RUNS/seed-N/NAME``; a finished run whose config matches is reused, an interrupted one continued, and
a trunk is extended to the fork steps a longer comparison needs, so comparisons that share a runs folder (a sweep, a
trend study over run lengths) train each baseline and the trunk's steps once.

Modules: ``isoloss`` (the arithmetic: pure, no files, no torch), ``jobs`` (the family and the arms as jobs, what
each waits for, and the one order they start in), ``runner`` (the jobs trained in this process, through the
trainer's public API), ``results`` (the finished runs read into a comparison), ``report`` (Markdown, JSON, plots),
``grid`` (the sweep over a bag x ratio grid), ``plan`` (the jobs as run configs, a dependency graph and launchers for
a cluster; the report of whatever has finished).
The pure names are imported here at once, the others on first use, so ``superpose.compare.isoloss`` and
``DEFAULT_FAMILY`` (read by the CLI's parser) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .isoloss import (
    DEFAULT_FAMILY,
    IsoLoss,
    format_speedup,
    iso_loss_partial,
    iso_loss_steps,
    measure_spike,
    recommend,
    summarize,
    switch_to_tokens,
)

_LAZY = {
    "jobs": ("Job", "Variant", "arm_config", "family_jobs", "launch_order", "plan_jobs", "variant_label",
             "variants_for"),
    "runner": ("compare", "run_job", "run_jobs"),
    "results": ("Arm", "Comparison", "Member", "collect"),
    "report": ("provenance", "report_markdown", "write_report"),
    "grid": ("grid_variants", "sweep", "sweep_extras"),
    "plan": ("collect_plan", "load_comparison", "read_plan", "write_plan"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["DEFAULT_FAMILY", "IsoLoss", "format_speedup", "iso_loss_partial", "iso_loss_steps", "measure_spike",
           "recommend", "summarize", "switch_to_tokens", *_MODULE_OF]


def __getattr__(name: str) -> Any:
    """Load the module behind a run/report/sweep name on first use (they import torch and the trainer).

    No module is named like a name it exports: importing a submodule sets the package attribute of its own name.
    """
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    return value
