"""Compare: the speedup arithmetic on curves with known answers, the spike measure, exact forking, matched FLOPs,
report contents, a tiny compare and sweep end to end, and bad input as one line with exit code 2."""

import json
import math
import shutil

import pytest

from superpose.cli import main
from superpose.compare import (
    Variant,
    baseline_family,
    compare,
    format_speedup,
    iso_loss_steps,
    measure_spike,
    recommend,
    sweep,
    variant_label,
    variants_for,
)
from superpose.errors import SuperposeError
from superpose.train.config import TSTConfig, config_from_dict
from superpose.train.loop import train
from superpose.train.metrics import read_metrics

# ------------------------------------------------------------------ arithmetic on synthetic curves


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


def test_iso_loss_takes_the_first_crossing_of_a_noisy_family():
    # 400 is noisy (worse than 200): the first member at or below the target ends the search
    iso = iso_loss_steps([100, 200, 400, 800], [5.0, 4.0, 4.2, 3.0], 4.5)
    assert iso.baseline_steps == pytest.approx(math.sqrt(100 * 200))  # half-way in log steps


def _rows(switch, excess):
    """Rows of a run switching to bag 1 at step ``switch`` (1-based), evals every 5 steps from ``switch - 1`` whose
    validation excess over a flat baseline is ``excess``; phase-1 train loss 9.0, phase-2 4.0."""
    evals = dict(zip(range(switch - 1, switch - 1 + 5 * len(excess), 5), excess))
    last = max(evals)
    tst = [{"step": s, "bag": 4 if s < switch else 1, "train_loss": 9.0 if s < switch else 4.0}
           for s in range(1, last + 1)]
    base = [{"step": s, "bag": 1, "train_loss": 3.0} for s in range(1, last + 1)]
    for row in tst:
        if row["step"] in evals:
            row["val_loss"] = 3.0 + evals[row["step"]]
    for row in base:
        if row["step"] % 5 == (switch - 1) % 5:
            row["val_loss"] = 3.0
    return tst, base


def test_spike_height_and_recovery_known_answer():
    tst, base = _rows(31, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, -0.1])
    spike = measure_spike(tst, base)
    assert (spike["switch_step"], spike["measured_at"]) == (31, 30)
    assert spike["height"] == pytest.approx(1.0)
    assert spike["half_recovery_steps"] == 15  # excess 0.4 <= 0.5 at step 45: 15 next-token steps after the switch
    assert spike["recovery_steps"] == 25
    assert spike["final_gap"] == pytest.approx(-0.1)
    assert spike["jump"] == pytest.approx(4.0 - 9.0)  # its own loss falls: multi-hot CE 9.0 -> next-token 4.0


def test_spike_that_never_recovers_and_no_switch():
    tst, base = _rows(11, [1.0] + [0.7] * 5)
    spike = measure_spike(tst, base)
    assert spike["half_recovery_steps"] is None and spike["recovery_steps"] is None
    assert spike["final_gap"] == pytest.approx(0.7)
    assert measure_spike(base, base) == {}


def _summary(label, mean, std, seeds=2, bounded=False, text=None, mode="both"):
    return {"label": label, "mode": mode, "speedup_mean": mean, "speedup_std": std, "seeds": seeds,
            "bounded": bounded, "speedup_text": text or format_speedup(mean)}


def test_recommendation_needs_the_data():
    assert recommend([_summary("s4-r0.3", 0.7, 0.05)]).startswith("no recommendation")
    assert recommend([_summary("s4-r0.3", 1.05, 0.1)]).startswith("no recommendation")  # within seed spread
    assert recommend([_summary("s2-r0.2", 1.3, 0.1), _summary("s4-r0.3", 1.1, 0.0)]).startswith("recommended: s2-r0.2")
    assert recommend([_summary("s2-r0.2", 1.3, 0.0, seeds=1)]).startswith("promising but unconfirmed")
    assert recommend([_summary("s2-r0.2", 2.0, 0.0, bounded=True, text="< 2.00x")]).startswith("no recommendation")
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


# ------------------------------------------------------------------ runs


def test_forked_baseline_equals_an_independent_run(tiny_config, tmp_path):
    base = tiny_config("base", optim={"decay_fraction": 0.25})
    members = baseline_family(base, [8, 16], tmp_path / "runs", progress=False)
    assert [(m.steps, m.fork) for m in members] == [(8, 6), (16, 12)]
    alone = tiny_config("alone", tst={"bag": 1, "ratio": 0.0}, optim={"decay_fraction": 0.25},
                        train={"steps": 16}, checkpoint={"every": 0})
    result = train(alone, progress=False)
    forked = {r["step"]: (r["train_loss"], r["lr"]) for r in members[1].rows}
    independent = {r["step"]: (r["train_loss"], r["lr"]) for r in read_metrics(result.run_dir / "metrics.jsonl")}
    assert forked == independent  # bitwise: the fork resumes model, optimizer and loader exactly
    assert members[1].final_val_loss == result.final_val_loss
    assert members[1].rows[-1]["text_tokens"] == result.text_tokens


@pytest.fixture(scope="module")
def tiny_compare(embedded_data, tmp_path_factory):
    """One tiny compare (3 objectives, family 6/12/24 steps) shared by the tests that read it."""
    runs = tmp_path_factory.mktemp("compare") / "runs"
    base = config_from_dict({
        "name": "cmp", "out_dir": str(runs), "data": {"path": str(embedded_data)}, "tst": {"bag": 4, "ratio": 0.5},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 12, "batch_size": 4, "seq_len": 16, "device": "cpu", "log_every": 1},
        "eval": {"every": 4, "batches": 2},
    })
    result = compare(base, variants_for(base, ("both", "input", "output")), seeds=1, family=(0.5, 1.0, 2.0),
                     runs=runs, progress=False)
    return base, result, runs


def test_tiny_compare_matches_flops_and_reads_more_text(tiny_compare):
    base, result, _ = tiny_compare
    (family,) = result.family.values()
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


def test_compare_reuses_finished_runs_and_refuses_foreign_ones(tiny_compare):
    base, first, runs = tiny_compare
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.jsonl")}
    again = compare(base, variants_for(base, ("both",)), seeds=1, family=(0.5, 1.0, 2.0), runs=runs, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    assert again.arms[0].final_val_loss == first.arms[0].final_val_loss
    other = config_from_dict({**base.to_dict(), "optim": {**base.to_dict()["optim"], "lr": 1e-3}})
    with pytest.raises(SuperposeError, match="different config"):
        compare(other, variants_for(other, ("both",)), family=(0.5, 1.0, 2.0), runs=runs, progress=False)


def test_report_contents(tiny_compare, tmp_path):
    from superpose.compare import write_report

    _, result, _ = tiny_compare
    path = write_report(result, tmp_path / "report", "tiny", "superpose compare x")
    text = path.read_text()
    for heading in ("## How the speedup is computed", "## Summary", "## Ablation", "## Runs", "## Baseline family",
                    "**Verdict:**", "bound", "log(steps)", "superpose compare x"):
        assert heading in text
    for label in ("s4-r0.5", "s4-r0.5-input", "s4-r0.5-output", "baseline (bag 1)"):
        assert f"| {label}" in text
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["setup"]["flops_per_step"] > 0 and data["setup"]["overhead_fraction_of_run_flops"] < 1e-3
    assert {a["mode"] for a in data["arms"]} == {"both", "input", "output"}
    for arm in data["arms"]:
        assert {"speedup", "bound", "baseline_steps", "wall_speedup", "flops_speedup", "spike"} <= set(arm)
    assert data["arms"][0]["spike"]["switch_step"] == 7  # bag 4 for steps 1-6, next-token from step 7
    for name in ("loss_curves.png", "family.png", "switch.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"({name})" in text


def test_tiny_sweep_writes_a_grid_and_heatmap(tiny_config, tmp_path, capsys):
    cfg = tmp_path / "sweep.toml"
    base = tiny_config("sw", train={"steps": 8})
    cfg.write_text(base.to_toml())
    out = tmp_path / "sweep"
    assert main(["sweep", str(cfg), "--bags", "2,4", "--ratios", "0.25", "--family", "1,2", "--out", str(out),
                 "--quiet"]) == 0
    text = (out / "report.md").read_text()
    assert "## Grid: final val loss / iso-loss speedup" in text and "| 4 |" in text
    assert (out / "sweep_heatmap.png").stat().st_size > 10_000
    assert "report:" in capsys.readouterr().out
    with pytest.raises(SuperposeError, match="at least one bag"):
        sweep(base, [], [0.3], runs=tmp_path / "x")


# ------------------------------------------------------------------ bad input


def _run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("superpose: error: ")
    return err[0]


@pytest.mark.parametrize("args, fragment", [
    (["--bag", "1"], "bag >= 2"),
    (["--ratio", "0"], "ratio"),
    (["--schedule", "[[0.5, 4], [0.2, 2], [1.0, 1]]"], "in order"),
    (["--family", "0.5,2"], "include 1"),
    (["--seeds", "0"], "--seeds"),
    (["--ablation", "sideways"], "tst.mode"),
])
def test_compare_bad_input_is_one_line(tiny_config, tmp_path, capsys, args, fragment):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config("bad").to_toml())
    msg = _run_error(capsys, ["compare", str(cfg), *args, "--out", str(tmp_path / "out"), "--quiet"])
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
    msg = _run_error(capsys, ["compare", str(cfg), f"data.path='{data}'", "--out", str(tmp_path / "out"), "--quiet"])
    assert "no validation split" in msg
    assert not (tmp_path / "out").exists()


def test_compare_needs_a_variant(tiny_config, tmp_path):
    with pytest.raises(SuperposeError, match="no TST variant"):
        compare(tiny_config(), [], runs=tmp_path / "r")
    with pytest.raises(SuperposeError, match="bag >= 2"):
        compare(tiny_config(), [Variant("b1", {"bag": 1, "ratio": 0.3})], family=(1.0,), runs=tmp_path / "r")
