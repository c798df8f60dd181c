"""Where does TST pay off? Iso-loss speedup against run length, model width, and the switch-softening options.

Each study is a set of ``superpose.compare`` comparisons on one config (the headline's tiny setup by default);
runs are shared through ``--runs`` so baselines are trained once. Studies can run as separate processes (their
results land in ``OUT/trend-STUDY.json``); ``--summarize`` then writes ``trend.md``, ``trend.json`` and
``trend.png`` from whatever studies have finished.

    python bench/trend.py --study soften --runs RUNS --data DATA --out bench/results
    python bench/trend.py --summarize --out bench/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from superpose.compare import compare, variants_for, write_report
from superpose.plots import plot_trend
from superpose.provenance import provenance
from superpose.train.config import RunConfig
from superpose.train.config_load import load_config

ROOT = Path(__file__).resolve().parent.parent
BASE_OVERRIDES = ["optim.warmup_steps=30", "eval.every=30", "eval.batches=8", "train.log_every=1",
                  "checkpoint.every=0"]
"""The headline compare's overrides of configs/tiny-tst.toml (bag 4, ratio 0.3, lr 2e-3, B=16, L=128, WSD 20%)."""
FAMILY = (0.5, 1.0, 2.0)
SHORT_FAMILY = (0.5, 1.0)
"""For the costliest points (a 2x baseline would double their price); a TST loss beyond the 1x member is a bound."""
STEPS = {150: FAMILY, 300: FAMILY, 600: SHORT_FAMILY}
WIDTHS = {64: SHORT_FAMILY, 128: FAMILY, 256: SHORT_FAMILY}
"""hidden_size of a 4-layer Llama (intermediate 3x) at 150 steps; 128 is the tiny preset."""
SOFTENING = {
    "paper recipe (s4, r0.3)": {},
    "LR re-warmup 15 steps": {"rewarmup_steps": 15},
    "bag mean rescaled": {"rescale_mean": True},
    "multi-stage 8-4-2-1": {"schedule": [[0.1, 8], [0.2, 4], [0.3, 2], [1.0, 1]]},
}


def base_config(data: Path, steps: int, width: int | None = None) -> RunConfig:
    overrides = [f"data.path='{data}'", f"train.steps={steps}", *BASE_OVERRIDES]
    if width is not None and width != 128:
        overrides.append(f"model.overrides={{hidden_size = {width}, intermediate_size = {3 * width}}}")
    return load_config(ROOT / "configs" / "tiny-tst.toml", overrides)


def _point(result: Any, label: str, **extra: Any) -> dict[str, Any]:
    summary = result.summaries[0]
    return {"label": label, **extra, **{k: summary[k] for k in (
        "speedup_mean", "speedup_std", "speedup_text", "bounded", "final_val_loss_mean", "spike_height_mean",
        "half_recovery_steps_mean", "wall_speedup_mean")}, "parameters": result.setup["parameters"],
        "recommendation": result.recommendation}


def run_study(study: str, runs: Path, data: Path, out: Path, seeds: int, only: list[int]) -> list[dict[str, Any]]:
    """Train (or reuse) one study's comparisons (``only``: a subset of its steps/widths); full reports go under
    OUT/trend/STUDY-*."""
    points = []

    def one(cfg: RunConfig, label: str, runs_dir: Path, tst: dict[str, Any], family: tuple[float, ...] = FAMILY,
            **extra: Any) -> None:
        result = compare(cfg, variants_for(cfg, ("both",), **tst), seeds, family, runs_dir, progress=False)
        slug = label.split(" (")[0].replace(" ", "-")
        name = "-".join([study, slug, *(f"{k}{v}" for k, v in extra.items() if k != "steps"), f"T{cfg.train.steps}"])
        write_report(result, out / "trend" / name, f"trend study {study}: {label}",
                     f"python bench/trend.py --study {study}")
        points.append(_point(result, label, **extra))
        print(f"{study} {label} {extra}: {points[-1]['speedup_text']}", flush=True)

    if study == "steps":
        for steps, family in STEPS.items():
            if not only or steps in only:
                one(base_config(data, steps), "s4-r0.3", runs, {}, family, steps=steps)
    elif study == "width":
        for width, family in WIDTHS.items():
            if not only or width in only:
                one(base_config(data, 150, width), "s4-r0.3", runs / f"width-{width}" if width != 128 else runs, {},
                    family, width=width)
    elif study == "soften":
        for label, tst in SOFTENING.items():
            one(base_config(data, 150), label, runs, tst)
    return points


def summarize(out: Path) -> None:
    """trend.md / trend.json / trend.png from the finished studies."""
    studies: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("trend-*.json")):  # trend-STUDY.json or trend-STUDY-PART.json
        studies.setdefault(path.stem.split("-")[1], []).extend(json.loads(path.read_text()))
    (out / "trend.json").write_text(json.dumps({"provenance": provenance(), **studies}, indent=2))
    panels = []
    for study, key, xlabel in (("steps", "steps", "run length (optimizer steps), tiny preset, s=4 r=0.3"),
                               ("width", "width", "hidden size (4 layers, 150 steps), s=4 r=0.3")):
        if study in studies:
            bounds = "".join(f"; {key} {p[key]}: bound {p['speedup_text']}" for p in studies[study] if p["bounded"])
            series = {f"TST s=4 r=0.3{bounds}": [(p[key], p["speedup_mean"], p["speedup_std"]) for p in studies[study]]}
            if study == "steps":  # the softening options were run at 150 steps: show them beside that point
                series.update({f"{p['label']} (150 steps){' = bound ' + p['speedup_text'] if p['bounded'] else ''}":
                               [(150, p["speedup_mean"], p["speedup_std"])]
                               for p in studies.get("soften", [])[1:]})
            panels.append((f"speedup vs {key}", xlabel, series))
    if panels:
        plot_trend(out / "trend.png", panels)
    lines = ["# Where does TST pay off? (trend study)", ""]
    for study, points in studies.items():
        keys = [k for k in ("steps", "width", "parameters") if k in points[0]]
        lines += [f"## {study}", "", "| setting | " + " | ".join(keys) + " | final val loss | iso-loss speedup | "
                  "wall speedup | spike (nat) | half-recovery (steps) |", "|---" * (len(keys) + 6) + "|"]
        for p in sorted(points, key=lambda p: [p[k] for k in keys[:1]]):
            spike = "–" if p["spike_height_mean"] is None else f"{p['spike_height_mean']:.3f}"
            half = "–" if p["half_recovery_steps_mean"] is None else f"{p['half_recovery_steps_mean']:.0f}"
            lines.append(f"| {p['label']} | " + " | ".join(str(p[k]) for k in keys) +
                         f" | {p['final_val_loss_mean']:.4f} | {p['speedup_text']} | {p['wall_speedup_mean']:.2f}x"
                         f" | {spike} | {half} |")
        lines.append("")
    (out / "trend.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=["steps", "width", "soften"])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "embedded")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", type=int, nargs="*", default=[], help="a subset of the study's steps or widths")
    parser.add_argument("--summarize", action="store_true", help="only rebuild trend.md/json/png")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.study:
        points = run_study(args.study, args.runs, args.data, args.out, args.seeds, args.only)
        part = "-".join([args.study, *map(str, args.only)])
        (args.out / f"trend-{part}.json").write_text(json.dumps(points, indent=2))
    summarize(args.out)


if __name__ == "__main__":
    main()
