"""PNG figures for compare/sweep reports and the trend study; plain data in, a file out (no training imports).

Each figure is meant to be read on its own: axes name their units, the baseline is grey, TST is coloured, and
measured numbers (speedups, spike height, recovery) are written on the plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Rows = Sequence[Mapping[str, Any]]
_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _val(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    pts = [(r[key], r["val_loss"]) for r in rows if "val_loss" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _color(labels: Sequence[str], label: str) -> str:
    """One colour per variant (the label up to ' seed'), so seeds of a variant share it."""
    variants = list(dict.fromkeys(x.split(" seed")[0] for x in labels))
    return _COLORS[variants.index(label.split(" seed")[0]) % len(_COLORS)]


def plot_curves(path: Path, baselines: Mapping[str, Rows], tst: Mapping[str, Rows]) -> Path:
    """Validation loss against model FLOPs, wall-clock and text tokens: baselines grey, TST runs coloured."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), sharey=True)
    panels = [("flops", "model FLOPs (forward + backward)"), ("wall_time", "wall-clock (s)"),
              ("text_tokens", "text tokens read")]
    n = len(baselines)
    for ax, (key, xlabel) in zip(axes, panels):
        for i, (label, rows) in enumerate(baselines.items()):
            ax.plot(*_val(rows, key), color=str(0.75 - 0.5 * i / max(1, n - 1)), lw=1.5, marker=".", label=label)
        for label, rows in tst.items():
            first = label == next(x for x in tst if x.split(" seed")[0] == label.split(" seed")[0])
            ax.plot(*_val(rows, key), color=_color(list(tst), label), lw=2 if first else 1,
                    alpha=1 if first else 0.5, marker=".", label=label)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    lows = [v for rows in [*baselines.values(), *tst.values()] for v in _val(rows, "step")[1]]
    axes[0].set_ylim(min(lows) - 0.05, sorted(lows)[int(0.9 * (len(lows) - 1))] + 0.2)
    axes[0].set_ylabel("validation loss (nat/token)")
    axes[0].set_title("equal model FLOPs per step")
    axes[1].set_title("wall-clock")
    axes[2].set_title("TST reads bag x more text in phase 1")
    axes[2].legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_family(path: Path, family: Mapping[int, Sequence[tuple[int, float]]],
                arms: Sequence[tuple[str, int, float, float, str]]) -> Path:
    """Final loss of each baseline against its length (log steps); each TST run marked at the iso-loss point.

    ``arms``: (label, TST steps, TST final loss, baseline steps at that loss, speedup text).
    """
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, points in enumerate(family.values()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, color="0.4", marker="o", lw=1.5, alpha=1 if i == 0 else 0.5,
                label="baseline family (each decayed to its own end)" if i == 0 else None)
    labels = [a[0] for a in arms]
    seeds = list(dict.fromkeys(label.split(" seed")[-1] for label in labels))
    for label, steps, loss, base_steps, text in arms:
        c = _color(labels, label)
        marker = "*oD^vs"[seeds.index(label.split(" seed")[-1]) % 6]
        ax.plot([steps], [loss], marker=marker, ms=11, color=c, ls="none", label=f"{label}: {text}")
        ax.plot([steps, base_steps], [loss, loss], color=c, ls="--", lw=1)
        ax.plot([base_steps], [loss], marker="|", ms=14, color=c)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sorted({x for points in family.values() for x, _ in points}))
    ax.set_xlabel("optimizer steps (log) = model FLOPs / FLOPs per step")
    ax.set_ylabel("final validation loss")
    ax.set_title("iso-loss: baseline steps (|) that reach each TST run's final loss (marker = TST run)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_switch(path: Path, baseline: Rows, arms: Mapping[str, tuple[Rows, Mapping[str, Any]]]) -> Path:
    """Around the switch to next-token training: validation loss (markers, the measured curve) over faint train
    losses, TST against the baseline, with the spike height and its half-recovery marked."""
    fig, ax = plt.subplots(figsize=(10, 5.5))
    switches = [spike["switch_step"] for _, spike in arms.values()]
    total = baseline[-1]["step"]
    lo, hi = max(1, min(switches) - total // 8), total

    def draw(rows: Rows, color: str, label: str) -> None:
        pts = [r for r in rows if lo <= r["step"] <= hi]
        ax.plot([r["step"] for r in pts], [r["train_loss"] for r in pts], color=color, lw=0.7, alpha=0.3)
        vals = [r for r in pts if "val_loss" in r]
        ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], color=color, lw=2, marker="o", ms=4,
                label=label)

    draw(baseline, "0.3", "baseline (validation; faint: train loss)")
    for i, (label, (rows, spike)) in enumerate(arms.items()):
        c = _COLORS[i % len(_COLORS)]
        half = spike["half_recovery_steps"]
        draw(rows, c, f"{label}: spike {spike['height']:+.2f} nat at step {spike['measured_at']}, halved after "
                      f"{'>' + str(total - spike['switch_step'] + 1) if half is None else half} steps, "
                      f"gap at end {spike['final_gap']:+.3f}")
        ax.axvline(spike["switch_step"] - 0.5, color=c, ls=":", lw=1.2)
        if half is not None:
            ax.axvline(spike["switch_step"] + half - 1, color=c, ls="--", lw=0.8, alpha=0.6)
    ax.set_xlabel("optimizer step (dotted: switch to bag 1; dashed: excess over the baseline halved; the spike is "
                  "read at the first eval at or after the last phase-1 step)")
    ax.set_ylabel("loss (nat/token)")
    ax.set_title("the phase switch (validation loss is next-token loss on fixed held-out windows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_heatmaps(path: Path, bags: Sequence[int], ratios: Sequence[float], loss: Sequence[Sequence[float]],
                  speedup: Sequence[Sequence[float]], speedup_text: Sequence[Sequence[str]]) -> Path:
    """Final validation loss and iso-loss speedup over the bag x ratio grid, numbers written in each cell."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 * len(bags) + 2.5))
    panels = [(loss, [[f"{v:.3f}" for v in row] for row in loss], "final validation loss", "viridis_r", None),
              (speedup, speedup_text, "iso-loss speedup (1 = baseline)", "RdBu", 1.0)]
    for ax, (grid, text, title, cmap, centre) in zip(axes, panels):
        kwargs = {}
        if centre is not None:
            span = max(abs(v - centre) for row in grid for v in row) or 0.1
            kwargs = {"vmin": centre - span, "vmax": centre + span}
        im = ax.imshow(grid, cmap=cmap, aspect="auto", **kwargs)
        for i, row in enumerate(text):
            for j, t in enumerate(row):
                ax.text(j, i, t, ha="center", va="center", fontsize=9,
                        bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        ax.set_yticks(range(len(bags)), [str(b) for b in bags])
        ax.set_xlabel("ratio r (fraction of steps in superposition)")
        ax.set_ylabel("bag size s")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_trend(path: Path, panels: Sequence[tuple[str, str, Mapping[str, Sequence[tuple[float, float, float]]]]],
               log_x: bool = True) -> Path:
    """Iso-loss speedup against a scale axis, one panel per study: (title, x label, {series: [(x, mean, std)]})."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, (title, xlabel, series) in zip(axes[0], panels):
        for i, (label, points) in enumerate(series.items()):
            xs, ys, es = zip(*sorted(points))
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=_COLORS[i % len(_COLORS)], label=label)
        ax.axhline(1.0, color="0.3", ls="--", lw=1, label="break-even (1x)")
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks(sorted({x for points in series.values() for x, _, _ in points}))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("iso-loss speedup (baseline steps / TST steps)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path)
