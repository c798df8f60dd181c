"""Where a comparison stands (compare/standing.py) and the trend study that measures it (bench/trend.py): the
nearest-point arithmetic, the verdict's paragraph, the shipped reference, and the study's jobs being exactly the
runs each point's comparison collects."""

from __future__ import annotations

import concurrent.futures as cf
import json
import sys
import threading
from pathlib import Path

import pytest

from superpose.compare.jobs import plan_jobs
from superpose.compare.standing import PAPER, REFERENCE, nearest_point, read_reference, standing, tokens_per_parameter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import trend  # noqa: E402  (bench/ is not a package)


def _point(steps: int, tpp: float, speedup: float, bounded: bool = False) -> dict:
    return {"preset": "tiny", "arm": "s4-r0.3", "steps": steps, "parameters": 1_000_000, "tokens_per_parameter": tpp,
            "seeds": 2, "speedup_mean": speedup, "speedup_std": 0.02, "bounded": bounded,
            "speedup_text": f"{'>' if bounded else ''}{speedup:.2f}x"}


SETUP = {"batch_size": 16, "seq_len": 128, "steps": 600, "parameters": 1_000_000}
REFERENCE_POINTS = {"measured": "the test trend", "points": [_point(300, 0.6, 0.55), _point(600, 1.2, 0.7),
                                                              _point(4800, 9.8, 0.9)]}


def _summary(speedup: float, bounded: bool = False, mode: str = "both") -> dict:
    return {"label": "s4-r0.3", "mode": mode, "speedup_mean": speedup, "bounded": bounded,
            "speedup_text": f"{speedup:.2f}x"}


def test_tokens_per_parameter_counts_positions_not_text():
    assert tokens_per_parameter(SETUP) == pytest.approx(16 * 128 * 600 / 1e6)


def test_nearest_point_weighs_tokens_per_parameter_and_length_in_log_space():
    points = REFERENCE_POINTS["points"]
    assert nearest_point(points, 1.1, 650)["steps"] == 600
    assert nearest_point(points, 50.0, 20000)["steps"] == 4800
    assert nearest_point([], 1.0, 100) is None


def test_standing_quotes_nearest_point_and_the_gap():
    text = standing(SETUP, [_summary(0.6), _summary(0.9, mode="input")], REFERENCE_POINTS)
    assert "1,000,000 parameters for 600 steps" in text
    assert "best arm s4-r0.3 reaches 0.60x" in text  # the best full-TST arm, not the input-only one
    assert "the test trend, s4-r0.3 on the tiny preset" in text
    assert "at 600 steps and 1.2 tokens per parameter, measured 0.70x" in text
    assert "0.10 below it" in text
    assert text.endswith(PAPER + ".")


def test_standing_prefers_a_point_of_the_same_bag_and_ratio():
    other = {**_point(300, 0.5, 0.9), "arm": "s2-r0.2"}
    reference = {"points": [*REFERENCE_POINTS["points"], other]}
    assert "s2-r0.2 on the tiny preset" in standing(SETUP, [{**_summary(0.8), "label": "s2-r0.2"}], reference)
    assert "s4-r0.3 on the tiny preset" in standing(SETUP, [{**_summary(0.8), "label": "s8-r0.1"}], reference)


def test_standing_says_when_the_run_is_beyond_the_trend_and_skips_a_gap_from_a_bound():
    long = {**SETUP, "steps": 100_000}
    text = standing(long, [_summary(1.3, bounded=True)], REFERENCE_POINTS)
    assert "4,800 steps" in text and "beyond the trend's longest point (9.8 tokens per parameter)" in text
    assert "above it" not in text and "below it" not in text


def test_standing_without_a_measured_trend_still_quotes_the_paper():
    text = standing(SETUP, [], {"points": []})
    assert "nearest" not in text and PAPER in text


def test_shipped_reference_is_well_formed():
    ref = read_reference(REFERENCE)
    assert ref["points"], "src/superpose/compare/trend_reference.json is missing or empty"
    for p in ref["points"]:
        assert set(trend.REFERENCE_KEYS) <= set(p)
        assert p["tokens_per_parameter"] == pytest.approx(16 * 128 * p["steps"] / p["parameters"])


def test_study_jobs_are_the_runs_each_point_collects(tmp_path):
    """Every run a point's comparison reads (plan_jobs of that length) is trained by the study with the same config
    (a trunk may differ only in its length and kept steps), and each job comes after the job it waits for."""
    data = tmp_path / "data"
    jobs = trend.study_jobs(data, tmp_path / "runs")
    by_dir = {}
    for preset, job in jobs:
        by_dir.setdefault((job.cfg.run_dir, job.cfg.train.stop_at), job)
    position = {(preset, job.id): i for i, (preset, job) in enumerate(jobs)}
    assert len(position) == len(jobs)  # each job once
    for i, (preset, job) in enumerate(jobs):
        assert not job.after or position[preset, job.after] < i
    for p in trend.POINTS:
        base = trend.base_config(data, p.preset, p.steps)
        for job in plan_jobs(base, trend.variants(base, p.arms), p.seeds, p.family, tmp_path / "runs" / p.preset):
            ours = by_dir[job.cfg.run_dir, job.cfg.train.stop_at].cfg.to_dict()
            theirs = job.cfg.to_dict()
            if job.kind == "trunk":
                for cfg in (ours, theirs):
                    cfg["train"]["steps"], cfg["checkpoint"]["keep_steps"] = 0, []
            assert ours == theirs, job.id


def test_study_seeds_and_family_as_the_issue_asks(tmp_path):
    jobs = trend.study_jobs(tmp_path / "data", tmp_path / "runs")
    arms = {(preset, job.seed, job.cfg.train.steps, job.cfg.tst.bag) for preset, job in jobs if job.kind == "tst"}
    for steps in (300, 600, 1200, 2400, 4800):
        for bag in (4, 2):
            assert ("tiny", 0, steps, bag) in arms
            assert (("tiny", 1, steps, bag) in arms) == (steps <= 1200)
    assert ("small", 0, 1200, 4) in arms


def test_run_parallel_waits_for_dependencies_and_stops_on_failure(tmp_path):
    jobs = trend.study_jobs(tmp_path / "data", tmp_path / "runs")[:12]
    started: list[tuple[str, str]] = []
    lock = threading.Lock()
    finished: set[str] = set()

    def run(job):
        with lock:
            assert not job.after or job.after in finished, f"{job.id} started before {job.after}"
            started.append(job.id)
        with lock:
            finished.add(job.id)

    trend.run_parallel([(p, j) for p, j in jobs if p == "tiny"], 2, cf.ThreadPoolExecutor(2), run)
    assert sorted(started) == sorted(j.id for p, j in jobs if p == "tiny")

    def fail(job):
        raise RuntimeError(f"boom {job.id}")

    with pytest.raises(RuntimeError, match="boom"):
        trend.run_parallel(jobs, 1, cf.ThreadPoolExecutor(1), fail)


def test_trend_fit_reads_the_slope_per_doubling():
    rows = [{"preset": "tiny", "arm": "s4-r0.3", "steps": s, "per_seed": [
        {"speedup": 0.5 + 0.1 * k + d, "bound": ""} for d in (-0.01, 0.01)]} for k, s in enumerate((300, 600, 1200))]
    fit = trend.trend_fit(rows, "s4-r0.3")
    assert fit["slope_per_doubling"] == pytest.approx(0.1) and fit["speedup_at_shortest"] == pytest.approx(0.5)
    assert fit["steps_to_1x"]["at_slope"] == pytest.approx(300 * 2 ** 5)
    assert fit["steps_to_1x"]["at_slope_minus_2se"] > fit["steps_to_1x"]["at_slope"]
    assert trend.trend_fit(rows[:2], "s4-r0.3") is None  # two lengths cannot show a trend
    json.dumps(fit)
