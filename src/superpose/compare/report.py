"""The report of a comparison: ``report.md`` (setup, method, summary, ablation, runs, the switch, the family,
plots), ``report.json`` (the same numbers, the config and where they came from) and the PNG plots."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence


from .. import plots
from ..provenance import provenance
from .isoloss import format_speedup
from .results import Comparison, Member

METHOD = (
    "Iso-loss speedup = (baseline steps that reach the TST run's final validation loss) / (TST steps). All runs share "
    "model, initialisation, batch, positions, optimizer and LR schedule, so a step costs the same model FLOPs in both "
    "and the steps ratio is the FLOPs ratio (the superposition overhead is added to the TST side for the FLOPs "
    "speedup). The baseline steps are read off a family of finished baselines (each with its own LR decay), linearly "
    "in log(steps) between the two members that bracket the TST loss; WSD members are forked from one constant-LR "
    "trunk at their decay start. A TST loss below every member gives a lower bound (> longest/T), above every "
    "member an upper bound (< shortest/T); while a plan's runs are still going, a TST loss between two finished "
    "members with an unfinished one in between is a lower bound at the shorter one. Wall-clock and GPU-hours "
    "speedups: the baseline's wall time (GPU-hours) interpolated at those steps over the TST run's. Accounting: a "
    "run's wall time is its metrics' clock (training, evaluation and checkpoints; time lost to a kill after the last "
    "checkpoint is not counted); GPU-hours = wall time x world size, summed per segment between resumes at that "
    "segment's world size (each metrics row records it); a forked member "
    "costs the trunk's time up to its fork plus its own steps, as a baseline of that length trained alone would. "
    "Spread: sample standard deviation over seeds (each seed has its own family)."
)

SPIKE_NOTE = (
    "Spike: TST minus baseline validation loss at the first eval both runs made at or after the last phase-1 step "
    "(the validation windows are the only loss both runs see alike); measured at: that step, and in brackets how "
    "many next-token steps had already run there (+0: the eval saw the weights the first next-token step starts "
    "from; more: part of the spike may already have recovered, so the height is a lower bound; an eval.every that "
    "divides the last phase-1 step measures it at +0). Own jump: the run's first next-token train loss minus its "
    "last phase-1 (multi-hot) train losses; half-recovery / recovered: steps after the last phase-1 step until the "
    "validation excess has halved / reached 0, to the resolution of eval.every (– = not within the run); final gap: "
    "the excess at the end."
)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _header(comparison: Comparison, title: str, command: str, made: dict[str, Any]) -> list[str]:
    s, v = comparison.setup, made["versions"]
    machine = made["cpu"] + "".join(f", {gpu}" for gpu in made["gpus"])
    return [f"# {title}", "", f"Command: `{command}`", "",
            f"Made {made['date']} with superpose {v['superpose']}"
            f"{' (' + made['commit'] + ')' if made['commit'] else ''}, torch {v['torch']}, transformers "
            f"{v['transformers']} on {machine}.", "",
            f"Model `{s['model']}`{' ' + str(s['overrides']) if s['overrides'] else ''}: "
            f"{s['parameters']:,} parameters "
            f"(vocab {s['vocab_size']}), batch {s['batch_size']} x {s['seq_len']} positions, {s['steps']} steps, "
            f"{s['lr_schedule']} LR {s['lr']:g} (warmup {s['warmup_steps']}, decay {s['decay_fraction']:g}), "
            f"device {s['device']}. Model FLOPs per step {s['flops_per_step']:.3e}, the same for TST and baseline; the "
            f"superposition overhead adds at most {s['overhead_fraction_of_run_flops']:.1e} of a run's FLOPs.",
            "", f"**Verdict:** {comparison.recommendation}.", "", comparison.standing, "",
            "## How the speedup is computed", "", METHOD, ""]


def _spike_cell(height: float | None, after: float | None) -> str:
    return "–" if height is None else f"{height:.3f} [+{after:.0f}]"


def _summary(comparison: Comparison) -> list[str]:
    return ["## Summary", "", markdown_table(
        ["variant", "seeds", "final val loss", "iso-loss speedup (steps = FLOPs)", "wall-clock speedup",
         "GPU-hours speedup", "spike (nat) [steps after the switch]", "half-recovery (steps)"],
        [[x["label"], x["seeds"], f"{x['final_val_loss_mean']:.4f} ± {x['final_val_loss_std']:.4f}", x["speedup_text"],
          f"{x['wall_speedup_mean']:.2f}x", f"{x['gpu_hours_speedup_mean']:.2f}x",
          _spike_cell(x["spike_height_mean"], x["spike_measured_after_mean"]),
          _fmt(x["half_recovery_steps_mean"], ".0f")] for x in comparison.summaries])]


def _ablation(comparison: Comparison) -> list[str]:
    """Each objective against the baseline of the run's own length (only when more than one objective ran)."""
    steps = comparison.setup["steps"]
    base_losses = [m.final_val_loss for ms in comparison.family.values() for m in ms if m.steps == steps]
    if len({a.mode for a in comparison.arms}) < 2 or not base_losses:
        return []
    base_loss = statistics.fmean(base_losses)
    return ["", "## Ablation (equal steps and model FLOPs)", "", markdown_table(
        ["objective", "final val loss", "vs baseline", "iso-loss speedup"],
        [["baseline (bag 1)", f"{base_loss:.4f}", "–", "1.00x"]] + [
            [f"{x['mode']} ({x['label']})", f"{x['final_val_loss_mean']:.4f}",
             f"{x['final_val_loss_mean'] - base_loss:+.4f}", x["speedup_text"]] for x in comparison.summaries])]


def _runs(comparison: Comparison) -> list[str]:
    return ["", "## Runs", "", markdown_table(
        ["variant", "seed", "final val loss", "baseline steps at that loss", "speedup", "FLOPs speedup",
         "wall s", "wall speedup", "GPU-h", "GPU-h speedup", "text tokens", "spike", "measured at", "own jump",
         "half-recovery", "recovered", "final gap"],
        [[a.label, a.seed, f"{a.final_val_loss:.4f}", f"{a.bound} {a.baseline_steps:.0f}".strip(),
          format_speedup(a.speedup, a.bound), format_speedup(a.flops_speedup, a.bound), f"{a.wall_time:.0f}",
          format_speedup(a.wall_speedup, a.bound), f"{a.gpu_hours:.3g}", format_speedup(a.gpu_hours_speedup, a.bound),
          f"{a.text_tokens:,}", _fmt(a.spike.get("height"), ".3f"),
          f"step {a.spike['measured_at']} [+{a.spike['measured_after']}]" if a.spike else "–",
          _fmt(a.spike.get("jump"), "+.3f"), _fmt(a.spike.get("half_recovery_steps"), "d"),
          _fmt(a.spike.get("recovery_steps"), "d"), _fmt(a.spike.get("final_gap"), "+.3f")]
         for a in comparison.arms]), "", SPIKE_NOTE]


def _family(comparison: Comparison) -> list[str]:
    return ["", "## Baseline family", "", markdown_table(
        ["seed", "steps", "forked at", "final val loss", "wall s", "GPU-h (trunk share included)"],
        [[seed, m.steps, m.fork, f"{m.final_val_loss:.4f}", f"{m.wall_time:.0f}", f"{m.gpu_hours:.3g}"]
         for seed, ms in comparison.family.items() for m in ms])]


def _status(comparison: Comparison) -> list[str]:
    """The runs not finished yet (a plan collected early), and how to continue a stopped one; nothing when every run
    has finished."""
    waiting = [s for s in comparison.status if s["state"] != "finished"]
    if not waiting:
        return []
    resume = any("resume" in s for s in waiting)
    return ["", "## Not finished yet", "", f"{len(waiting)} of {len(comparison.status)} runs have not finished; "
            "their numbers are missing above, and a speedup the finished baselines do not bracket is a bound. "
            "Collect again when they have. Running: a live process holds the run folder's lock; stopped: it has "
            "steps but no live process (killed, or its job ended), and continues from its last checkpoint with the "
            "command shown (or the plan's launcher again).", "", markdown_table(
                ["run", "kind", "state", "step", *(["continue with"] if resume else [])],
                [[s["run"], s["kind"], s["state"], f"{s['step']} of {s['steps']}",
                  *([f"`{s['resume']}`" if "resume" in s else "–"] if resume else [])] for s in waiting])]


def report_markdown(comparison: Comparison, title: str, command: str, plot_files: Sequence[str],
                    made: dict[str, Any]) -> str:
    """The human-readable report: setup, provenance, method, summary, ablations, runs and the switch, the family."""
    out = _header(comparison, title, command, made) + _summary(comparison) + _ablation(comparison)
    out += _status(comparison) + _runs(comparison) + _family(comparison)
    out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plot_files]
    return "\n".join(out) + "\n"


def _member_json(m: Member) -> dict[str, Any]:
    return {k: v for k, v in asdict(m).items() if k != "rows"}


def report_json(comparison: Comparison, title: str, command: str, made: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers without the metrics rows (those stay in the run folders)."""
    return {
        "title": title, "command": command, "provenance": made, "method": METHOD, "setup": comparison.setup,
        "config": comparison.config, "runs": comparison.runs,
        "family": {str(seed): [_member_json(m) for m in ms] for seed, ms in comparison.family.items()},
        "arms": [{k: v for k, v in asdict(a).items() if k != "rows"} for a in comparison.arms],
        "summaries": comparison.summaries, "recommendation": comparison.recommendation,
        "standing": comparison.standing, "status": comparison.status,
        **comparison.extra,
    }


def _plots(comparison: Comparison, out: Path) -> list[Path]:
    """Loss curves and the family for every report; the switch when a run of the first seed switched."""
    first_seed = min(comparison.family)
    family = comparison.family[first_seed]
    files = [
        plots.plot_curves(out / "loss_curves.png", {f"baseline {m.steps} seed {first_seed}": m.rows for m in family},
                          {f"{a.label} seed {a.seed}": a.rows for a in comparison.arms}),
        plots.plot_family(out / "family.png",
                          {seed: [(m.steps, m.final_val_loss) for m in ms] for seed, ms in comparison.family.items()},
                          [(f"{a.label} seed {a.seed}", a.steps, a.final_val_loss, a.baseline_steps,
                            format_speedup(a.speedup, a.bound)) for a in comparison.arms]),
    ]
    switching = [a for a in comparison.arms if a.spike and a.seed == first_seed]
    if switching:
        reference = next(m for m in family if m.steps == comparison.setup["steps"])
        files.append(plots.plot_switch(out / "switch.png", reference.rows,
                                       {a.label: (a.rows, a.spike) for a in switching}))
    return files


def write_report(comparison: Comparison, out: Path, title: str, command: str,
                 extra_md: str = "", extra_plots: Sequence[str] = ()) -> Path:
    """Write report.md, report.json and the PNG plots into ``out``; returns the report.md path."""
    out.mkdir(parents=True, exist_ok=True)
    made = provenance(command)
    files = [str(f) for f in _plots(comparison, out)] + list(extra_plots)
    (out / "report.json").write_text(json.dumps(report_json(comparison, title, command, made), indent=2))
    path = out / "report.md"
    path.write_text(report_markdown(comparison, title, command, files, made) + extra_md)
    return path
