"""Where a comparison stands: the user's speedup beside the nearest point of superpose's measured trend and the
paper's smallest scale, so a 0.7x at a million parameters reads as what that scale gives, not as a bug.

The trend is ``trend_reference.json`` beside this module, written by ``bench/trend.py --summarize`` from its runs
(one entry per preset, arm and run length). Pure functions over numbers: no torch, no run folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .isoloss import best_full_tst

REFERENCE = Path(__file__).with_name("trend_reference.json")
PAPER = ("The paper's smallest runs (270M parameters: the SmolLM2-135M shape with the 128k Llama-3 vocabulary, "
         "untied; 20k steps x 2M tokens = 42B tokens, about 155 tokens per parameter) end 0.070 nat below their "
         "baseline at equal steps, 0.044 nat at 100k steps; it reports speedups at 3B (1.8x) and 10B-A1B (2.5x) and "
         "nothing below 270M parameters")


def tokens_per_parameter(setup: Mapping[str, Any]) -> float:
    """Positions trained per parameter over the run (batch x sequence x steps / parameters): the same for a TST run
    and its baseline, whatever text the TST run reads in phase 1."""
    return setup["batch_size"] * setup["seq_len"] * setup["steps"] / setup["parameters"]


def read_reference(path: Path = REFERENCE) -> dict[str, Any]:
    """The measured trend (``points`` and where they came from); an empty one when the file is absent."""
    return json.loads(path.read_text()) if path.exists() else {"points": []}


def nearest_point(points: Sequence[Mapping[str, Any]], tpp: float, steps: int) -> Mapping[str, Any] | None:
    """The measured point closest in log tokens-per-parameter and log run length together (both scale alike)."""
    return min(points, default=None, key=lambda p: math.hypot(math.log(p["tokens_per_parameter"] / tpp),
                                                              math.log(p["steps"] / steps)))


def standing(setup: Mapping[str, Any], summaries: Sequence[Mapping[str, Any]],
             reference: Mapping[str, Any] | None = None) -> str:
    """One paragraph: the best full-TST arm here, the nearest trend point (of the same bag and ratio when the trend
    has it) and how far this result is from it, and the paper's smallest scale."""
    reference = read_reference() if reference is None else reference
    tpp = tokens_per_parameter(setup)
    here = (f"this comparison trains {setup['parameters']:,} parameters for {setup['steps']:,} steps, "
            f"{tpp:.3g} tokens per parameter")
    best = best_full_tst(summaries)
    if best is not None:
        here += f", and its best arm {best['label']} reaches {best['speedup_text']}"
    same_arm = [p for p in reference["points"] if best is not None and p["arm"] == best["label"]]
    point = nearest_point(same_arm or reference["points"], tpp, setup["steps"])
    if point is None:
        return f"Where this stands: {here}. {PAPER}."
    measured = reference.get("measured", "superpose's CPU trend (bench/trend.py)")
    near = (f"The nearest point of {measured}, {point['arm']} on the {point['preset']} preset "
            f"({point['parameters']:,} parameters) at {point['steps']:,} steps and "
            f"{point['tokens_per_parameter']:.3g} tokens per parameter, measured {point['speedup_text']}")
    if best is not None and not best["bounded"] and not point["bounded"]:
        gap = best["speedup_mean"] - point["speedup_mean"]
        near += f"; this result is {abs(gap):.2f} {'above' if gap >= 0 else 'below'} it"
    largest = max(p["tokens_per_parameter"] for p in reference["points"])
    if tpp > 2 * largest:
        near += (f". This run is beyond the trend's longest point ({largest:.3g} tokens per parameter), where it "
                 "was not measured")
    return f"Where this stands: {here}. {near}. {PAPER}."
