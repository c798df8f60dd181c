"""A compare over a bag x ratio grid of two-phase TST settings, sharing each seed's baseline family; its grid table
and heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .. import plots
from ..errors import SuperposeError
from ..train.config import RunConfig
from .isoloss import DEFAULT_FAMILY
from .report import markdown_table
from .jobs import Variant, variants_for
from .results import Comparison
from .runner import compare


def grid_variants(base: RunConfig, bags: Sequence[int], ratios: Sequence[float]) -> tuple[list[Variant], dict]:
    """The two-phase TST variants of the grid bags x ratios, and the grid (bags, ratios, labels) a report draws."""
    if not bags or not ratios:
        raise SuperposeError("sweep needs at least one bag and one ratio")
    grid = [[variants_for(base, ("both",), bag=bag, ratio=ratio, schedule=[])[0] for ratio in ratios] for bag in bags]
    labels = [[v.label for v in row] for row in grid]
    return [v for row in grid for v in row], {"bags": list(bags), "ratios": list(ratios), "labels": labels}


def sweep(base: RunConfig, bags: Sequence[int], ratios: Sequence[float], seeds: int = 1,
          family: Sequence[float] = DEFAULT_FAMILY, runs: Path | None = None, progress: bool = True) -> Comparison:
    """A compare over the grid bags x ratios (two-phase TST), sharing each seed's baseline family."""
    variants, grid = grid_variants(base, bags, ratios)
    result = compare(base, variants, seeds, family, runs, progress)
    result.extra["grid"] = grid
    return result


def _waiting(result: Comparison, label: str) -> str:
    """Where a cell without a finished arm stands: the liveliest state among its arms (one per seed)."""
    states = {s["state"] for s in result.status if s.get("label") == label}
    return next((state for state in ("running", "running or stopped", "stopped") if state in states), "not started")


def sweep_extras(result: Comparison, out: Path) -> tuple[str, list[str]]:
    """The sweep's grid table (final loss and speedup per bag x ratio; a cell without a finished arm says where its
    arms stand) and its heatmap (once every cell has an arm: a plan's report may be collected while some still
    run)."""
    bags, ratios = result.extra["grid"]["bags"], result.extra["grid"]["ratios"]
    by_label = {x["label"]: x for x in result.summaries}
    labels = result.extra["grid"]["labels"]
    cells = [[by_label.get(label) for label in row] for row in labels]

    def text(label: str) -> str:
        c = by_label.get(label)
        return f"{c['final_val_loss_mean']:.4f} / {c['speedup_text']}" if c else _waiting(result, label)

    table = markdown_table(["bag \\ ratio", *[f"{r:g}" for r in ratios]],
                           [[bag, *map(text, row)] for bag, row in zip(bags, labels)])
    md = "\n## Grid: final val loss / iso-loss speedup\n\n" + table + "\n"
    if any(c is None for row in cells for c in row):
        return md, []
    heat = plots.plot_heatmaps(out / "sweep_heatmap.png", bags, ratios,
                               [[c["final_val_loss_mean"] for c in row] for row in cells],
                               [[c["speedup_mean"] for c in row] for row in cells],
                               [[c["speedup_text"] for c in row] for row in cells])
    return md, [str(heat)]
