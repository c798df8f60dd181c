"""Compare: the iso-loss arithmetic on curves with known answers (pure, nothing trained), the spike measure and where
it was read, exact forking, matched FLOPs, report contents and provenance, one tiny compare and sweep end to end,
and bad input as one line with exit code 2 before anything is written."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from datetime import datetime
from types import ModuleType, SimpleNamespace

import pytest

import superpose.compare
from conftest import make_tiny_config, run_error
from superpose.cli import build_parser, main
from superpose.compare import (
    DEFAULT_FAMILY,
    Variant,
    compare,
    format_speedup,
    iso_loss_steps,
    measure_spike,
    recommend,
    summarize,
    sweep,
    variant_label,
    variants_for,
    write_report,
)
from superpose.compare.isoloss import at_steps, family_lengths
from superpose.compare.plan import SECTION_DEFAULTS
from superpose.compare.jobs import BASELINE_TST, check_warmup_fits, derive, plan_jobs
from superpose.compare.results import collect, gpu_seconds
from superpose.errors import SuperposeError
from superpose.train.config import TSTConfig
from superpose.train.config_load import load_config
from superpose.train.loop import train
from superpose.train.metrics import read_metrics

# ------------------------------------------------------------------ arithmetic on synthetic curves (nothing trained)


def test_the_arithmetic_loads_without_torch():
    code = "import sys, superpose.compare.isoloss; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _log_linear(steps: float) -> float:
    """A family whose final loss falls 0.3 nat per doubling: interpolation in log(steps) is exact on it."""
    return 5.0 - 0.3 * math.log2(steps / 100)


LENGTHS = [100, 200, 400, 800]


@pytest.mark.parametrize("true_steps", [100, 150, 300, 333, 799])
def test_iso_loss_recovers_known_steps(true_steps):
    iso = iso_loss_steps(LENGTHS, [_log_linear(t) for t in LENGTHS], _log_linear(true_steps))
    assert iso.bound == ""
    assert iso.baseline_steps == pytest.approx(true_steps, rel=1e-9)
    # a TST run of 400 steps that reaches the loss the baseline reaches at 300 steps: 0.75x
    assert iso.speedup(400) == pytest.approx(true_steps / 400)


def test_iso_loss_outside_the_family_is_a_bound():
    losses = [_log_linear(t) for t in LENGTHS]
    below = iso_loss_steps(LENGTHS, losses, losses[-1] - 0.1)  # better than the longest baseline
    assert (below.bound, below.baseline_steps) == (">", 800)
    above = iso_loss_steps(LENGTHS, losses, losses[0] + 0.1)  # worse than the shortest
    assert (above.bound, above.baseline_steps) == ("<", 100)
    assert format_speedup(below.speedup(200), below.bound) == "> 4.00x"
    assert format_speedup(above.speedup(200), above.bound) == "< 0.50x"
    exact = iso_loss_steps(LENGTHS, losses, losses[0])  # the shortest member's own loss is inside, not a bound
    assert (exact.bound, exact.baseline_steps) == ("", 100)
    with pytest.raises(SuperposeError, match="empty"):
        iso_loss_steps([], [], 1.0)


def test_iso_loss_takes_the_first_crossing_of_a_noisy_family():
    # 400 is noisy (worse than 200): the first member at or below the target ends the search
    iso = iso_loss_steps([100, 200, 400, 800], [5.0, 4.0, 4.2, 3.0], 4.5)
    assert iso.baseline_steps == pytest.approx(math.sqrt(100 * 200))  # half-way in log steps


def test_family_quantities_between_members_and_clamped():
    assert at_steps([200, 100, 400], [20.0, 10.0, 40.0], 150) == pytest.approx(15.0)  # order of members irrelevant
    assert at_steps([100, 200], [10.0, 20.0], 800) == 20.0  # a bound reads the longest member, never beyond


def test_family_lengths_round_and_refuse():
    assert family_lengths(DEFAULT_FAMILY, 12) == [6, 12, 24, 48]
    assert family_lengths((1.0, 0.5, 0.5, 0.01), 30) == [1, 15, 30]  # sorted, merged, at least one step
    for bad in ((), (0.5, 2.0), (1.0, 0.0), (1.0, -2.0), (1.0, float("inf")), (1.0, float("nan")), (1.0, 1e308)):
        with pytest.raises(SuperposeError, match="include 1"):
            family_lengths(bad, 12)


def _rows(switch, excess, first_eval=None):
    """Rows of a run switching to bag 1 at step ``switch`` (1-based), evals every 5 steps from ``first_eval`` (default
    ``switch - 1``, the last phase-1 step) whose validation excess over a flat baseline is ``excess``; phase-1 train
    loss 9.0, phase-2 4.0; the baseline evaluates at the same steps."""
    first = switch - 1 if first_eval is None else first_eval
    evals = dict(zip(range(first, first + 5 * len(excess), 5), excess))
    last = max(evals)
    tst = [{"step": s, "bag": 4 if s < switch else 1, "train_loss": 9.0 if s < switch else 4.0}
           for s in range(1, last + 1)]
    base = [{"step": s, "bag": 1, "train_loss": 3.0} for s in range(1, last + 1)]
    for row in tst:
        if row["step"] in evals:
            row["val_loss"] = 3.0 + evals[row["step"]]
    for row in base:
        if row["step"] % 5 == first % 5:
            row["val_loss"] = 3.0
    return tst, base


def test_spike_height_and_recovery_known_answer():
    tst, base = _rows(31, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, -0.1])
    spike = measure_spike(tst, base)
    assert (spike["switch_step"], spike["measured_at"], spike["measured_after"]) == (31, 30, 0)
    assert spike["height"] == pytest.approx(1.0)
    assert spike["half_recovery_steps"] == 15  # excess 0.4 <= 0.5 at step 45: 15 next-token steps after the switch
    assert spike["recovery_steps"] == 25
    assert spike["final_gap"] == pytest.approx(-0.1)
    assert spike["jump"] == pytest.approx(4.0 - 9.0)  # its own loss falls: multi-hot CE 9.0 -> next-token 4.0


def test_spike_without_an_eval_at_the_switch_says_where_it_was_measured():
    # evals at 33, 38, ...: the switch (last phase-1 step 30) had none, so the spike is read 3 steps into phase 2
    tst, base = _rows(31, [0.6, 0.2, 0.0], first_eval=33)
    spike = measure_spike(tst, base)
    assert (spike["measured_at"], spike["measured_after"]) == (33, 3)
    assert spike["height"] == pytest.approx(0.6)
    assert (spike["half_recovery_steps"], spike["recovery_steps"]) == (8, 13)  # counted from the switch, not step 33


def test_spike_that_never_recovers_and_no_switch():
    tst, base = _rows(11, [1.0] + [0.7] * 5)
    spike = measure_spike(tst, base)
    assert spike["half_recovery_steps"] is None and spike["recovery_steps"] is None
    assert spike["final_gap"] == pytest.approx(0.7)
    assert measure_spike(base, base) == {}


def _arm(speedup, bound="", loss=5.0, spike=None, label="s4-r0.3", mode="both"):
    return SimpleNamespace(label=label, mode=mode, speedup=speedup, bound=bound, final_val_loss=loss,
                           wall_speedup=speedup / 2, gpu_hours_speedup=speedup / 4, spike=spike or {})


def test_summaries_average_seeds_and_keep_bounds():
    spike = {"height": 0.5, "measured_after": 0, "half_recovery_steps": 10}
    two = summarize([_arm(0.6, loss=5.0, spike=spike), _arm(0.8, loss=5.2, spike={**spike, "height": 0.7})])
    assert two["speedup_text"] == "0.70x ± 0.14" and two["speedup_mean"] == pytest.approx(0.7)
    assert two["gpu_hours_speedup_mean"] == pytest.approx(0.7 / 4)
    assert two["final_val_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert (two["spike_height_mean"], two["spike_measured_after_mean"]) == (pytest.approx(0.6), 0)
    assert summarize([_arm(4.0, ">"), _arm(3.0, ">")])["speedup_text"] == "> 3.00x"  # the weaker lower bound
    assert summarize([_arm(0.5, "<"), _arm(0.4, "<")])["speedup_text"] == "< 0.50x"  # the weaker upper bound
    mixed = summarize([_arm(0.9), _arm(4.0, ">")])
    assert mixed["bounded"] and mixed["speedup_text"] == "mixed: 0.90x, > 4.00x"
    assert summarize([_arm(1.1)])["spike_height_mean"] is None


def test_an_arm_is_what_summarize_reads():
    """The pure arithmetic declares what it reads of an arm (a Protocol) instead of importing the results module;
    the arm the results build must keep those fields, with the same types."""
    from superpose.compare.isoloss import ArmResult
    from superpose.compare.results import Arm

    fields = {f.name: f.type for f in dataclasses.fields(Arm)}
    assert {name: fields.get(name) for name in ArmResult.__annotations__} == ArmResult.__annotations__


def _summary(label, mean, std, seeds=2, bounded=False, text=None, mode="both"):
    return {"label": label, "mode": mode, "speedup_mean": mean, "speedup_std": std, "seeds": seeds,
            "bounded": bounded, "speedup_text": text or format_speedup(mean)}


def test_recommendation_needs_the_data():
    assert recommend([_summary("s4-r0.3", 0.7, 0.05)]).startswith("no recommendation")
    assert recommend([_summary("s4-r0.3", 1.05, 0.1)]).startswith("no recommendation")  # within seed spread
    assert recommend([_summary("s2-r0.2", 1.3, 0.1), _summary("s4-r0.3", 1.1, 0.0)]).startswith("recommended: s2-r0.2")
    assert recommend([_summary("s2-r0.2", 1.3, 0.0, seeds=1)]).startswith("promising but unconfirmed")
    assert recommend([_summary("s2-r0.2", 2.0, 0.0, bounded=True, text="< 2.00x")]).startswith("no recommendation")
    assert recommend([_summary("s2-r0.2", 2.0, 0.0, bounded=True, text="> 2.00x")]).startswith("recommended")
    assert recommend([_summary("x", 2.0, 0.0, mode="input")]).startswith("no recommendation")


def test_variant_labels_are_distinct_and_folder_safe():
    labels = [
        variant_label(TSTConfig(bag=4, ratio=0.3)),
        variant_label(TSTConfig(bag=4, ratio=0.3, mode="input")),
        variant_label(TSTConfig(schedule=[[0.1, 8], [0.2, 4], [1.0, 1]])),
        variant_label(TSTConfig(bag=4, ratio=0.3, rewarmup_steps=20, rescale_mean=True)),
    ]
    assert labels == ["s4-r0.3", "s4-r0.3-input", "s8@0.1-4@0.2", "s4-r0.3-rewarm20-rescale"]
    assert all("/" not in x and " " not in x for x in labels)


def test_derive_changes_only_what_it_is_given(tiny_config, tmp_path):
    base = tiny_config("base")
    seeded = derive(base, seed=7)
    assert seeded.to_dict() == {**base.to_dict(), "seed": 7}
    member = derive(base, "baseline-8", tmp_path, tst=BASELINE_TST, train={"steps": 8})
    assert (member.run_dir, member.tst.bag, member.train.steps) == (tmp_path / "baseline-8", 1, 8)
    assert member.train.batch_size == base.train.batch_size and member.optim == base.optim


def test_multi_stage_variants_derive_from_any_base(tiny_config):
    """A schedule replaces bag/ratio wherever it comes from (the base's file, a variant), and a bag/ratio variant
    replaces a base's schedule: every job of the comparison derives without the two colliding."""
    base = tiny_config("base")
    stages = [[0.1, 8], [0.2, 4], [0.3, 2], [1.0, 1]]
    staged = derive(base, tst={"schedule": stages})
    assert (staged.tst.schedule, staged.tst.bag) == (stages, TSTConfig().bag)
    for cfg, tst, label in ((base, {"schedule": stages}, "s8@0.1-4@0.2-2@0.3"), (staged, {}, "s8@0.1-4@0.2-2@0.3"),
                            (staged, {"bag": 2, "ratio": 0.2, "schedule": []}, "s2-r0.2")):
        variant, = variants_for(cfg, ("both",), **tst)
        assert variant.label == label
        arms = [job.cfg for job in plan_jobs(cfg, [variant], 1, (0.5, 1.0), cfg.run_dir) if job.kind == "tst"]
        assert [variant_label(arm.tst) for arm in arms] == [label]


@pytest.mark.parametrize("optim, multiples, refused", [
    ({"warmup_steps": 5}, (0.5, 1.0), 0.5),  # 6 steps decay from step 5, inside the warmup
    ({"warmup_steps": 4}, (0.5, 1.0), None),
    ({"warmup_steps": 4, "decay_fraction": 0.5}, (0.5, 1.0), 0.5),  # decay from step 3
    ({"warmup_steps": 6, "lr_schedule": "cosine"}, (0.5, 1.0, 2.0), 0.5),  # cosine: the warmup fills the whole run
    ({"warmup_steps": 5, "lr_schedule": "cosine"}, (0.5, 1.0, 2.0), None),
])
def test_a_member_whose_warmup_does_not_fit_is_refused(tiny_config, optim, multiples, refused):
    base = tiny_config("w", optim=optim)  # 12 steps, WSD 20% unless said
    if refused is None:
        check_warmup_fits(base, multiples)
    else:
        with pytest.raises(SuperposeError, match=f"--family {refused:g}: a .*warmup"):
            check_warmup_fits(base, multiples)


# ------------------------------------------------------------------ GPU-hours of runs that changed world size


def _fake_run(job, rows, world_size):
    """A run folder as training leaves it, written by hand: its config, run.json (``world_size``: the newest start's),
    and metrics rows ``(step, wall_time, world_size)`` (the last with a validation loss)."""
    job.cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (job.cfg.run_dir / "config.toml").write_text(job.cfg.to_toml())
    (job.cfg.run_dir / "run.json").write_text(json.dumps({
        "vocab_size": 512, "parameters": 1, "active_parameters": 1, "flops_per_step": 10, "device": "cpu",
        "world_size": world_size}))
    schedule = job.cfg.phase_schedule()
    lines = [{"step": step, "wall_time": wall, "world_size": ranks, "bag": schedule.bag_at(step - 1),
              "train_loss": 5.0, "flops": 10 * step, "text_tokens": 100 * step} for step, wall, ranks in rows]
    lines[-1]["val_loss"] = {"trunk": 5.5, "baseline-4": 5.0, "baseline-8": 4.5}.get(job.cfg.name, 4.7)
    with (job.cfg.run_dir / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def test_gpu_hours_sum_each_segment_between_resumes_at_its_world_size(tmp_path):
    """Runs resumed on another number of ranks: GPU-hours are world size x wall time per segment between resumes
    (each metrics row carries its process's world size), not the newest start's world size x the whole wall time;
    and a trunk segment that has not started yet is "not started" while the one before it has finished."""
    base = make_tiny_config(tmp_path / "no-data", tmp_path / "unused", "cmp", train={"steps": 8})
    variants = variants_for(base, ("both",))
    jobs = {job.id: job for job in plan_jobs(base, variants, 1, (0.5, 1.0), tmp_path / "runs")}
    trunk = jobs["seed-0/trunk-3"]
    _fake_run(trunk, [(1, 10.0, 1), (2, 20.0, 1), (3, 30.0, 1)], 1)  # segment 1 on 1 rank
    _fake_run(jobs["seed-0/baseline-4"], [(4, 40.0, 2)], 2)  # forked at 3 (the trunk's clock: 30 s) on 2 ranks
    _fake_run(jobs["seed-0/s4-r0.5-T8"], [(s, 5.0 * s, 4) for s in range(1, 5)] +  # 20 s on 4 ranks,
              [(s, 20.0 + 20 * (s - 4), 1) for s in range(5, 9)], 1)  # resumed on 1 rank for 80 s
    early = collect(base, variants, 1, (0.5, 1.0), tmp_path / "runs", partial=True)
    assert {s["run"]: s["state"] for s in early.status} == {
        "seed-0/trunk-3": "finished", "seed-0/trunk-6": "not started", "seed-0/baseline-4": "finished",
        "seed-0/baseline-8": "not started", "seed-0/s4-r0.5-T8": "finished"}

    _fake_run(trunk, [(4, 35.0, 4), (5, 40.0, 4), (6, 45.0, 4)], 4)  # segment 2 resumed on 4 ranks
    _fake_run(jobs["seed-0/baseline-8"], [(7, 55.0, 1), (8, 60.0, 2)], 2)  # forked at 6 (45 s), resumed on 2
    result = collect(base, variants, 1, (0.5, 1.0), tmp_path / "runs")
    hours = {m.steps: m.gpu_hours * 3600 for m in result.family[0]}
    assert hours[4] == pytest.approx(30 * 1 + 10 * 2)  # was 4 x 30 + 2 x 10: the trunk's newest world size
    assert hours[8] == pytest.approx(30 * 1 + 15 * 4 + 10 * 1 + 5 * 2)  # was 4 x 45 + 2 x 15
    assert result.arms[0].gpu_hours * 3600 == pytest.approx(20 * 4 + 80 * 1)  # was 1 x 100
    rows = [{"step": 1, "wall_time": 10.0}, {"step": 2, "wall_time": 30.0, "world_size": 2}]
    assert gpu_seconds(rows, 4) == 10 * 4 + 20 * 2  # a row from before rows carried world_size: run.json's


# ------------------------------------------------------------------ runs (one tiny compare, shared)


@pytest.fixture(scope="module")
def tiny_compare(embedded_data, tmp_path_factory):
    """One tiny compare: T = 8 steps (bag 4 for steps 1-4, evals at 4 and 8), 3 objectives, family 4/8 steps."""
    runs = tmp_path_factory.mktemp("compare") / "runs"
    base = make_tiny_config(embedded_data, runs, "cmp", train={"steps": 8})
    result = compare(base, variants_for(base, ("both", "input", "output")), seeds=1, family=(0.5, 1.0),
                     runs=runs, progress=False)
    return base, result, runs


@pytest.mark.slow
def test_tiny_compare_matches_flops_and_reads_more_text(tiny_compare):
    base, result, _ = tiny_compare
    (family,) = result.family.values()
    assert [(m.steps, m.fork) for m in family] == [(4, 3), (8, 6)]  # forked at each decay start
    baseline = next(m for m in family if m.steps == base.train.steps)
    both = next(a for a in result.arms if a.mode == "both")
    per_step = lambda rows, key: {b["step"]: b[key] - a[key] for a, b in zip(rows, rows[1:])}  # noqa: E731
    tst_flops, base_flops = per_step(both.rows, "flops"), per_step(baseline.rows, "flops")
    phase1 = [r["step"] for r in both.rows if r["bag"] == 4][1:]
    assert phase1 and all(tst_flops[s] == base_flops[s] for s in phase1)  # same model FLOPs per step at bag 4
    assert both.flops == baseline.flops
    assert 0 < both.overhead_flops / both.flops < 1e-3  # the bag mean and target gather are negligible
    tst_tokens, base_tokens = per_step(both.rows, "text_tokens"), per_step(baseline.rows, "text_tokens")
    assert all(tst_tokens[s] == 4 * base_tokens[s] for s in phase1)  # s x more text per step
    for arm in result.arms:  # the arithmetic the report prints is the one tested above
        iso = iso_loss_steps([m.steps for m in family], [m.final_val_loss for m in family], arm.final_val_loss)
        assert (arm.baseline_steps, arm.bound) == (iso.baseline_steps, iso.bound)
        assert arm.speedup == pytest.approx(iso.baseline_steps / base.train.steps)
        assert arm.flops_speedup < arm.speedup or arm.flops_speedup == pytest.approx(arm.speedup, rel=1e-3)
    assert (both.spike["switch_step"], both.spike["measured_at"], both.spike["measured_after"]) == (5, 4, 0)


@pytest.mark.slow
def test_forked_baseline_equals_an_independent_run(tiny_compare, tmp_path):
    base, result, _ = tiny_compare
    member = next(m for m in result.family[base.seed] if m.steps == 8)  # trunk 0-6 (kept 3 and 6), forked at 6
    alone = derive(base, "alone", tmp_path, tst=BASELINE_TST, checkpoint={"every": 0})
    run = train(alone, progress=False)
    forked = {r["step"]: (r["train_loss"], r["lr"]) for r in member.rows}
    independent = {r["step"]: (r["train_loss"], r["lr"]) for r in read_metrics(run.run_dir / "metrics.jsonl")}
    assert forked == independent  # bitwise: the fork resumes model, optimizer and loader exactly
    assert member.final_val_loss == run.final_val_loss
    assert member.rows[-1]["text_tokens"] == run.text_tokens


@pytest.mark.slow
def test_compare_reuses_finished_runs_and_refuses_foreign_ones(tiny_compare):
    base, first, runs = tiny_compare
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.jsonl")}
    again = compare(base, variants_for(base, ("both",)), seeds=1, family=(0.5, 1.0), runs=runs, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    assert again.arms[0].final_val_loss == first.arms[0].final_val_loss
    other = derive(base, optim={"lr": 1e-3})
    with pytest.raises(SuperposeError, match="different config"):
        compare(other, variants_for(other, ("both",)), family=(0.5, 1.0), runs=runs, progress=False)


@pytest.mark.slow
def test_a_longer_comparison_extends_the_shared_trunk(tiny_config, tmp_path):
    """Comparisons of different lengths share one runs folder: the second extends the first's constant-LR trunk (the
    kept fork steps of both) and reuses the baseline they share, with the numbers of a comparison run alone."""
    short, longer = tiny_config("cmp", train={"steps": 8}), tiny_config("cmp", train={"steps": 16})
    shared = tmp_path / "shared"
    compare(short, variants_for(short, ("both",)), family=(0.5, 1.0), runs=shared, progress=False)
    member = shared / f"seed-{short.seed}" / "baseline-8" / "metrics.jsonl"
    stamp = member.stat().st_mtime_ns
    extended = compare(longer, variants_for(longer, ("both",)), family=(0.5, 1.0), runs=shared, progress=False)
    alone = compare(longer, variants_for(longer, ("both",)), family=(0.5, 1.0), runs=tmp_path / "alone",
                    progress=False)
    assert member.stat().st_mtime_ns == stamp  # baseline-8 reused, not retrained
    trunk = load_config(shared / f"seed-{short.seed}" / "trunk" / "config.toml")
    assert trunk.checkpoint.keep_steps == [3, 6, 13]  # both comparisons' fork steps
    assert [(m.steps, m.fork, m.final_val_loss) for m in extended.family[short.seed]] == \
        [(m.steps, m.fork, m.final_val_loss) for m in alone.family[short.seed]]
    assert (extended.arms[0].final_val_loss, extended.arms[0].speedup) == \
        (alone.arms[0].final_val_loss, alone.arms[0].speedup)


@pytest.mark.slow
def test_report_contents(tiny_compare, tmp_path):
    _, result, _ = tiny_compare
    path = write_report(result, tmp_path / "report", "tiny", "superpose compare x")
    text = path.read_text()
    for heading in ("## How the speedup is computed", "## Summary", "## Ablation", "## Runs", "## Baseline family",
                    "**Verdict:**", "bound", "log(steps)", "superpose compare x", "with superpose "):
        assert heading in text
    for label in ("s4-r0.5", "s4-r0.5-input", "s4-r0.5-output", "baseline (bag 1)"):
        assert f"| {label}" in text
    assert "| step 4 [+0] |" in text and "measured at" in text  # where the spike was read, per run
    assert result.standing.startswith("Where this stands:") and f"\n{result.standing}\n" in text
    assert f"for {result.setup['steps']} steps" in result.standing and "The paper's smallest runs" in result.standing
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["standing"] == result.standing
    assert data["command"] == "superpose compare x"
    made = data["provenance"]
    assert all(made["versions"][p] for p in ("superpose", "torch", "transformers")) and made["cpu"]
    assert isinstance(made["gpus"], list) and "commit" in made
    assert datetime.fromisoformat(made["date"]).tzinfo is not None
    assert data["setup"]["flops_per_step"] > 0 and data["setup"]["overhead_fraction_of_run_flops"] < 1e-3
    assert {a["mode"] for a in data["arms"]} == {"both", "input", "output"}
    for arm in data["arms"]:
        assert {"speedup", "bound", "baseline_steps", "wall_speedup", "flops_speedup", "spike"} <= set(arm)
        assert "rows" not in arm
    assert data["arms"][0]["spike"]["switch_step"] == 5  # bag 4 for steps 1-4, next-token from step 5
    for name in ("loss_curves.png", "family.png", "switch.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"({name})" in text


@pytest.mark.slow
def test_tiny_sweep_shares_the_runs_and_writes_a_grid(tiny_compare, tmp_path, capsys):
    base, _, runs = tiny_compare
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(base.to_toml())
    reused = runs / f"seed-{base.seed}" / "s4-r0.5-T8" / "metrics.jsonl"
    stamp = reused.stat().st_mtime_ns
    out = tmp_path / "sweep"
    assert main(["sweep", str(cfg), "--bags", "2,4", "--ratios", "0.5", "--family", "0.5,1", "--runs", str(runs),
                 "--out", str(out), "--quiet"]) == 0
    assert reused.stat().st_mtime_ns == stamp  # the compare's s4 arm and family are reused; only s2 is trained
    text = (out / "report.md").read_text()
    assert "## Grid: final val loss / iso-loss speedup" in text and "| 2 |" in text and "| 4 |" in text
    assert json.loads((out / "report.json").read_text())["grid"]["labels"] == [["s2-r0.5"], ["s4-r0.5"]]
    assert (out / "sweep_heatmap.png").stat().st_size > 10_000
    assert "report:" in capsys.readouterr().out
    with pytest.raises(SuperposeError, match="at least one bag"):
        sweep(base, [], [0.3], runs=tmp_path / "x")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, fragment", [
    (["--bag", "1"], "bag >= 2"),
    (["--ratio", "0"], "ratio"),
    (["--schedule", "[[0.5, 4], [0.2, 2], [1.0, 1]]"], "in order"),
    (["--family", "0.5,2"], "include 1"),
    (["--seeds", "0"], "--seeds"),
    (["--ablation", "sideways"], "tst.mode"),
    (["optim.warmup_steps=5", "--family", "0.5,1,2"], "--family 0.5: a 6-step baseline has no room to decay"),
])
def test_compare_bad_input_is_one_line(tiny_config, tmp_path, capsys, args, fragment):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config("bad").to_toml())
    msg = run_error(capsys, ["compare", str(cfg), *args, "--out", str(tmp_path / "out"), "--quiet"])
    assert fragment in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_compare_without_validation_data_is_one_line(tiny_config, embedded_data, tmp_path, capsys):
    data = tmp_path / "noval"
    shutil.copytree(embedded_data, data)
    meta = json.loads((data / "meta.json").read_text())
    del meta["splits"]["val"]
    (data / "meta.json").write_text(json.dumps(meta))
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config("noval").to_toml())
    msg = run_error(capsys, ["compare", str(cfg), f"data.path='{data}'", "--out", str(tmp_path / "out"), "--quiet"])
    assert "no validation split" in msg
    assert not (tmp_path / "out").exists()


def test_compare_needs_a_variant(tiny_config, tmp_path):
    with pytest.raises(SuperposeError, match="no TST variant"):
        compare(tiny_config(), [], runs=tmp_path / "r")
    with pytest.raises(SuperposeError, match="bag >= 2"):
        compare(tiny_config(), [Variant("b1", {"bag": 1, "ratio": 0.3})], family=(1.0,), runs=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_package_exports_what_callers_import():
    for name in superpose.compare.__all__:  # a lazily loaded name is never shadowed by a submodule of that name
        assert not isinstance(getattr(superpose.compare, name), ModuleType), name
    with pytest.raises(AttributeError):
        superpose.compare.no_such_name


def test_cli_family_default_is_the_library_default(capsys):
    assert build_parser().parse_args(["compare", "c.toml", "--out", "o"]).family is None  # the config's, else:
    assert SECTION_DEFAULTS["family"] == list(DEFAULT_FAMILY)
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert f"(default {','.join(f'{m:g}' for m in DEFAULT_FAMILY)})" in " ".join(capsys.readouterr().out.split())
