"""Where does TST pay off? The iso-loss speedup against run length and tokens per parameter, on a CPU.

Every run is ``configs/tiny-tst.toml`` as it is (its defaults: WSD, warmup 50, B=16, L=128, eval every 100 steps on
4 batches) except the model preset, the run length, the seed and the arm's bag and ratio. Per model preset and seed
there is one baseline family (multiples 0.25, 0.5, 1 of every length, and 2 where that member is trained anyway)
forked from one constant-LR trunk, so the doubling lengths share their members and the trunk is trained once. Jobs
run ``--workers`` at a time, each in its own process (``OMP_NUM_THREADS=1`` per job), in a fixed priority order:
trunk segments as soon as they can start, then the points shortest first, so a stopped study has its short points
complete. Rerunning reuses every finished
run; ``--summarize`` only collects what has finished into ``trend.json``, ``trend.md`` and ``trend.png``.

    OMP_NUM_THREADS=1 python bench/trend.py --runs RUNS --data data/embedded --out bench/results --workers 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from superpose.compare import arm_config, collect, family_jobs, run_job, variants_for, write_report
from superpose.compare.isoloss import family_lengths
from superpose.compare.jobs import Job, Variant, derive
from superpose.compare.standing import PAPER, tokens_per_parameter
from superpose.errors import SuperposeError
from superpose.plots import plot_trend
from superpose.provenance import provenance
from superpose.train.config import RunConfig
from superpose.train.config_load import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny-tst.toml"
FAMILY = (0.25, 0.5, 1.0)
"""0.25 costs one extra member (a quarter of the shortest length): the other quarters are a shorter length's halves."""
ARMS = {"s4-r0.3": {"bag": 4, "ratio": 0.3}, "s2-r0.2": {"bag": 2, "ratio": 0.2}}


@dataclass(frozen=True)
class Point:
    """One comparison of the study: a preset at one run length, with its arms and seeds."""

    preset: str
    steps: int
    arms: tuple[str, ...]
    seeds: int
    family: tuple[float, ...] = FAMILY


POINTS = (
    *(Point("tiny", steps, tuple(ARMS), 2) for steps in (300, 600, 1200)),
    Point("tiny", 4800, ("s4-r0.3",), 1),
    Point("small", 1200, ("s4-r0.3",), 1),
    Point("tiny", 2400, tuple(ARMS), 1, (*FAMILY, 2.0)),  # 2x: the 4,800-step member, trained for that point
    Point("tiny", 4800, ("s2-r0.2",), 1),
)
"""In priority order: a study stopped early has its short tiny points (both seeds), then the longest s4 run (it
starts early so that it does not hold one worker alone at the end), the small s4 point, 2,400 steps. (The small
preset's s2 arm was planned last and dropped for time on 2026-12-02.)"""


def base_config(data: Path, preset: str, steps: int) -> RunConfig:
    return load_config(CONFIG, [f"data.path='{data}'", f"model.preset='{preset}'", f"train.steps={steps}"])


def variants(base: RunConfig, arms: Sequence[str]) -> list[Variant]:
    return [variants_for(base, ("both",), **ARMS[arm], schedule=[])[0] for arm in arms]


def study_jobs(data: Path, runs: Path) -> list[tuple[str, Job]]:
    """Every job of the study once, as (preset, job), in priority order: per preset and seed one trunk and family
    covering every length that preset/seed is compared at, then each point's arms after its members."""
    lengths: dict[tuple[str, int], set[int]] = {}
    for p in POINTS:
        for seed in range(p.seeds):
            lengths.setdefault((p.preset, seed), set()).update(family_lengths(p.family, p.steps))
    family: dict[tuple[str, int], list[Job]] = {}
    for (preset, seed), steps in lengths.items():
        base = derive(base_config(data, preset, max(steps)), seed=seed)
        family[preset, seed] = family_jobs(base, sorted(steps), runs / preset / f"seed-{seed}")
    ordered = [(preset, job) for (preset, _), jobs in family.items() for job in jobs if job.kind == "trunk"]
    for p in POINTS:
        base = base_config(data, p.preset, p.steps)
        for seed in range(p.seeds):
            members = set(family_lengths(p.family, p.steps))
            ordered += [(p.preset, job) for job in family[p.preset, seed]
                        if job.kind == "baseline" and job.cfg.train.steps in members]
            seeded = derive(base, seed=seed)
            ordered += [(p.preset, Job(seed, "tst", arm_config(seeded, v, runs / p.preset / f"seed-{seed}"),
                                       label=v.label)) for v in variants(base, p.arms)]
    seen: set[tuple[str, str]] = set()
    return [(preset, job) for preset, job in ordered if (preset, job.id) not in seen
            and not seen.add((preset, job.id))]  # type: ignore[func-returns-value]


def run_parallel(jobs: list[tuple[str, Job]], workers: int, pool: cf.Executor | None = None,
                 run: Callable[[Job], None] = run_job) -> None:
    """Start each job (``run``, in a process of its own by default) once the job it waits for has ended, ``workers``
    at a time, the first ready one in ``jobs``' order; a failed job stops new starts and is raised once the running
    ones end."""
    done: set[tuple[str, str]] = set()
    waiting = list(jobs)
    running: dict[cf.Future, tuple[str, Job]] = {}
    failed: BaseException | None = None
    pool = pool or cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    with pool:
        while waiting or running:
            while failed is None and len(running) < workers:
                ready = next((pj for pj in waiting if not pj[1].after or (pj[0], pj[1].after) in done), None)
                if ready is None:
                    break
                waiting.remove(ready)
                running[pool.submit(run, ready[1])] = ready
                print(f"start {ready[0]} {ready[1].id}", flush=True)
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                preset, job = running.pop(future)
                if future.exception() is not None:
                    failed = failed or future.exception()
                    print(f"FAILED {preset} {job.id}: {future.exception()}", flush=True)
                else:
                    done.add((preset, job.id))
                    print(f"done {preset} {job.id}", flush=True)
    if failed is not None:
        raise failed
    if waiting:
        raise SuperposeError(f"{len(waiting)} jobs wait for a job that is not in the study")


SUMMARY_KEYS = ("speedup_mean", "speedup_std", "speedup_text", "bounded", "final_val_loss_mean", "spike_height_mean",
                "half_recovery_steps_mean", "wall_speedup_mean")


def _row(p: Point, arm: str, summary: dict[str, Any], result: Any) -> dict[str, Any]:
    """One finished arm of a point: its summary over seeds, each seed's speedup, and the point's scale."""
    setup = result.setup
    seeds = [a for a in result.arms if a.label == summary["label"]]
    return {"preset": p.preset, "arm": arm, "steps": p.steps, "family": list(p.family),
            "parameters": setup["parameters"],
            "tokens_per_parameter": tokens_per_parameter(setup),
            "seeds": len(seeds), **{k: summary[k] for k in SUMMARY_KEYS},
            "per_seed": [{"seed": a.seed, "speedup": a.speedup, "bound": a.bound, "final_val_loss": a.final_val_loss,
                          "text_tokens": a.text_tokens} for a in seeds]}


def collect_points(data: Path, runs: Path, out: Path) -> list[dict[str, Any]]:
    """One row per (point, arm) from whatever has finished, with the per-seed speedups; full reports under
    OUT/trend/PRESET-T{steps}."""
    rows = []
    for p in POINTS:
        base = base_config(data, p.preset, p.steps)
        arm_of = {v.label: arm for v, arm in zip(variants(base, p.arms), p.arms)}
        try:
            result = collect(base, variants(base, p.arms), p.seeds, p.family, runs / p.preset, partial=True)
        except SuperposeError as exc:
            print(f"{p.preset} T{p.steps}: {exc}")
            continue
        write_report(result, out / "trend" / f"{p.preset}-T{p.steps}-{'-'.join(p.arms)}",
                     f"trend: {p.preset} preset, {p.steps} steps", "python bench/trend.py")
        rows += [_row(p, arm_of[summary["label"]], summary, result) for summary in result.summaries]
    return rows


def trend_fit(rows: list[dict[str, Any]], arm: str) -> dict[str, Any] | None:
    """Least squares of speedup on doublings of the run length over one arm's tiny-preset seeds (bounds left out):
    the speedup the line gives at the shortest length, its slope per doubling with the standard error, and the run
    length at which the line would reach 1x at the slope and at slope +- 2 s.e. (None where it would not rise)."""
    pts = [(r["steps"], s["speedup"]) for r in rows if r["preset"] == "tiny" and r["arm"] == arm
           for s in r["per_seed"] if not s["bound"]]
    if len({steps for steps, _ in pts}) < 3:
        return None
    shortest = min(steps for steps, _ in pts)
    x, y = np.array([(math.log2(steps / shortest), speedup) for steps, speedup in pts]).T
    (slope, at_shortest), cov = np.polyfit(x, y, 1, cov=True)
    err = math.sqrt(cov[0, 0])
    to_1x = {name: (shortest * 2 ** ((1 - at_shortest) / s) if s > 0 else None)
             for name, s in (("at_slope", slope), ("at_slope_plus_2se", slope + 2 * err),
                             ("at_slope_minus_2se", slope - 2 * err))}
    return {"arm": arm, "points": len(pts), "shortest_steps": shortest, "speedup_at_shortest": at_shortest,
            "slope_per_doubling": slope, "slope_se": err, "steps_to_1x": to_1x}


REFERENCE_KEYS = ("preset", "arm", "steps", "parameters", "tokens_per_parameter", "seeds", "speedup_mean",
                  "speedup_std", "speedup_text", "bounded")


def write_reference(path: Path, rows: list[dict[str, Any]], made: dict[str, Any]) -> None:
    """The trend as ``superpose compare`` quotes it (``superpose.compare.standing``): one entry per point and arm."""
    measured = (f"superpose's CPU trend (bench/trend.py, {made['date'][:10]}, "
                f"{made['commit'][:12] or 'uncommitted'})")
    points = [{k: r[k] for k in REFERENCE_KEYS} for r in rows]
    path.write_text(json.dumps({"measured": measured, "points": points}, indent=1) + "\n")


def summarize(data: Path, runs: Path, out: Path, reference: Path | None) -> None:
    rows = collect_points(data, runs, out)
    fits = [f for arm in ARMS if (f := trend_fit(rows, arm))]
    made = provenance()
    (out / "trend.json").write_text(json.dumps({"provenance": made, "config": str(CONFIG.relative_to(ROOT)),
                                                "points": rows, "fits": fits,
                                                "paper_smallest": PAPER}, indent=2))
    if reference is not None:
        write_reference(reference, rows, made)
    panels = []
    for key, xlabel in (("steps", "run length (optimizer steps)"),
                        ("tokens_per_parameter", "training tokens per parameter (B x L x steps / params)")):
        series = {f"{r_arm} {preset}": [(r[key], r["speedup_mean"], r["speedup_std"]) for r in rows
                                        if r["arm"] == r_arm and r["preset"] == preset]
                  for r_arm in ARMS for preset in ("tiny", "small")}
        panels.append((f"iso-loss speedup vs {key.replace('_', ' ')}", xlabel, {k: v for k, v in series.items() if v}))
    if rows:
        plot_trend(out / "trend.png", panels)
    lines = ["# Where does TST pay off? (trend study, bench/trend.py)", "",
             "| preset | arm | steps | params | tokens/param | seeds | final val loss | iso-loss speedup | per seed |"
             " spike (nat) |", "|---" * 10 + "|"]
    for r in sorted(rows, key=lambda r: (r["preset"] != "tiny", r["arm"], r["steps"])):
        spike = "–" if r["spike_height_mean"] is None else f"{r['spike_height_mean']:.2f}"
        per_seed = ", ".join(f"{s['bound']}{s['speedup']:.2f}" for s in r["per_seed"])
        lines.append(f"| {r['preset']} | {r['arm']} | {r['steps']} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['tokens_per_parameter']:.2f} | {r['seeds']} | {r['final_val_loss_mean']:.4f} | "
                     f"{r['speedup_text']} | {per_seed} | {spike} |")
    for f in fits:
        reach = ", ".join(f"{k.replace('_', ' ')}: {'never' if v is None else f'{v:,.0f} steps'}"
                          for k, v in f["steps_to_1x"].items())
        lines.append(f"\nFit ({f['arm']}, tiny, {f['points']} seed points): {f['speedup_at_shortest']:.3f} at "
                     f"{f['shortest_steps']} steps, {f['slope_per_doubling']:+.3f} ± {f['slope_se']:.3f} (1 s.e.) per "
                     f"doubling of the run length; the line reaches 1x {reach}.")
    (out / "trend.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "trend")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "embedded")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--workers", type=int, default=1, help="jobs trained at once (one process each)")
    parser.add_argument("--summarize", action="store_true", help="only collect what has finished")
    parser.add_argument("--reference", type=Path, help="also write the trend superpose compare quotes here "
                        "(src/superpose/compare/trend_reference.json)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    if not args.summarize:
        run_parallel(study_jobs(data, args.runs.resolve()), args.workers)
    summarize(data, args.runs.resolve(), args.out, args.reference)


if __name__ == "__main__":
    main()
