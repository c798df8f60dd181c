"""A plan folder under attack: a damaged or tampered ``plan.json`` gives ``compare --report`` a report or one line
(exit 2, naming the file and the field), never a traceback; a run killed mid-way is reported "stopped" with the
command that continues it, and only a run whose folder lock a live process holds is "running".

One plan is trained once per module: its trunk SIGKILLed at step 5 (a real kill, in its own process: the trunk's
last segment, which trains it from step 0 when run alone; the first segment, to step 3, has finished), the short
baseline forked from the trunk's kept step 3, the arm finished, the long baseline not started. Case count
(hypothesis max_examples): damaged plan files 30.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_config, run_error
from superpose.cli import main
from superpose.compare import collect_plan, grid_variants, variants_for, write_plan
from superpose.train.config_load import load_config
from superpose.train.faults import KILL_ENV
from superpose.train.loop import train

FIRST, TRUNK = "seed-0/trunk-3", "seed-0/trunk-6"
"""The trunk's segments: to the fork steps 3 and 6 (one run folder)."""
SHORT, LONG, ARM = "seed-0/baseline-4", "seed-0/baseline-8", "seed-0/s4-r0.5-T8"
HOLD = "import sys; from superpose.files import FolderLock\nwith FolderLock(sys.argv[1], 'run folder'):\n" \
       "    print('held', flush=True); sys.stdin.read()"
"""A live process that holds a run folder's lock as a training run does, until it is killed."""


@pytest.fixture(scope="module")
def plans(embedded_data, tmp_path_factory) -> dict[str, Path]:
    """A compare plan (trunk killed at step 5, baseline-4 and the arm finished, baseline-8 not started) and a sweep
    plan of the same one-cell grid over the same runs folder."""
    root = tmp_path_factory.mktemp("plans")
    base = make_tiny_config(embedded_data, root / "unused", "cmp", train={"steps": 8})
    folder = root / "compare"
    write_plan(folder, base, variants_for(base, ("both",)), 1, (0.5, 1.0))
    jobs = {job["id"]: job for job in json.loads((folder / "plan.json").read_text())["jobs"]}
    command = shlex.split(jobs[TRUNK]["command"])
    killed = subprocess.run([sys.executable, "-m", *command, "--quiet"], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", KILL_ENV: "step:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    for job in (SHORT, ARM):
        train(load_config(jobs[job]["config"]), resume=True, progress=False)
    variants, grid = grid_variants(base, [4], [0.5])
    write_plan(root / "sweep", base, variants, 1, (0.5, 1.0), runs=folder / "runs", kind="sweep", extra={"grid": grid})
    return {"compare": folder, "sweep": root / "sweep"}


def _states(folder: Path) -> dict[str, dict[str, Any]]:
    return {s["run"]: s for s in collect_plan(folder)[0].status}


# ------------------------------------------------------------------ running, stopped, not started


def test_a_killed_run_is_stopped_and_only_a_held_lock_is_running(plans, tmp_path, capsys):
    """The trunk was SIGKILLed at step 5: no live process holds its folder's lock, so it is "stopped", with the
    command that continues it; a live process holding the lock makes it "running"; SIGKILLed, "stopped" again."""
    folder = plans["compare"]
    resume = f"superpose train {folder.resolve() / 'jobs' / TRUNK / 'config.toml'} --resume"
    states = _states(folder)
    assert {run: s["state"] for run, s in states.items()} == {
        FIRST: "finished", TRUNK: "stopped", SHORT: "finished", LONG: "not started", ARM: "finished"}
    assert (states[TRUNK]["step"], states[TRUNK]["resume"]) == (5, resume)
    assert "resume" not in states[LONG]

    run_dir = folder / "runs" / "seed-0" / "trunk"  # the segments' one run folder
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline() == "held\n"
        held = _states(folder)[TRUNK]
        assert held["state"] == "running" and "resume" not in held
        assert _states(folder)[TRUNK]["state"] == "running"  # the probe changed nothing
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert _states(folder)[TRUNK]["state"] == "stopped"  # the kernel dropped the dead holder's lock

    assert main(["compare", "--report", str(folder), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| {TRUNK} | trunk | stopped | 5 of 6 | `{resume}` |" in md
    assert f"| {LONG} | baseline | not started | 0 of 8 | – |" in md
    saved = json.loads((tmp_path / "report" / "report.json").read_text())["status"]
    assert [s["state"] for s in saved] == ["finished", "stopped", "finished", "not started", "finished"]
    capsys.readouterr()


# ------------------------------------------------------------------ a tampered plan.json: one line naming the field


def _tamper(plans: dict[str, Path], tmp_path: Path, kind: str, edit: Any) -> Path:
    """A copy of ``kind``'s plan.json (the only file the report reads) with ``edit`` applied to its JSON."""
    plan = json.loads((plans[kind] / "plan.json").read_text())
    edit(plan)
    folder = tmp_path / "tampered"
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps(plan))
    return folder


def _drop(*keys: str | int):
    def edit(plan: dict) -> None:
        parent = plan
        for key in keys[:-1]:
            parent = parent[key]
        del parent[keys[-1]]
    return edit


@pytest.mark.parametrize("kind, edit, fragment", [
    ("compare", lambda p: p.update(family="abc"), "family must be a list of numbers, got \"abc\""),
    ("compare", lambda p: p.update(family=[0.5, 1.0, float("inf")]), "family must be a list of numbers"),
    ("compare", lambda p: p.update(family=[0.5]), "--family must be positive finite multiples"),
    ("compare", lambda p: p.update(seeds="2"), "seeds must be an integer >= 1, got \"2\""),
    ("compare", lambda p: p.update(seeds=True), "seeds must be an integer >= 1, got true"),
    ("compare", lambda p: p.update(variants="x"), "variants must be a list of"),
    ("compare", lambda p: p.update(variants=[]), "variants must be a list of"),
    ("compare", _drop("variants", 0, "tst"), "variants[0].tst is missing"),
    ("compare", lambda p: p["variants"][0].update(label="../x"), "variants[0].label must be a folder-safe name"),
    ("compare", lambda p: p["variants"][0]["tst"].update(bag="four"), "s4-r0.5: tst.bag"),
    ("compare", lambda p: p.update(runs=None), "runs must be the runs folder's path, got null"),
    ("compare", lambda p: p.update(base=None), "base must be a run config (a JSON object), got null"),
    ("compare", lambda p: p["base"]["train"].update(steps=-1), ": base: train.steps"),
    ("compare", _drop("kind"), "kind is missing"),
    ("compare", lambda p: p.update(kind="sweep"), "grid is missing"),
    ("sweep", lambda p: p["grid"].update(labels=[["s4-r0.5"], ["s8-r0.5"]]), "grid.labels must be 1 lists"),
    ("sweep", _drop("grid", "bags"), "grid.bags is missing"),
])
def test_a_tampered_plan_is_one_line_naming_the_field(plans, tmp_path, capsys, kind, edit, fragment):
    folder = _tamper(plans, tmp_path, kind, edit)
    line = run_error(capsys, ["compare", "--report", str(folder), "--quiet"])
    assert f"{folder / 'plan.json'}: " in line and fragment in line
    assert not (folder / "report").exists()


# ------------------------------------------------------------------ any damage: a report or one line


def _paths(node: Any, at: tuple = ()) -> list[tuple]:
    """Every key path inside a JSON value (the value itself excluded)."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    return [path for key, child in children for path in [(*at, key), *_paths(child, (*at, key))]]


OTHER_VALUES = [None, True, 0, -3, 2.5, "x", "", [], [1, "a"], {}, {"a": 1}]


def _json_type(value: Any) -> str:
    return "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else type(value).__name__


def _damage(text: str, action: str, pick: int, other: int) -> str:
    """The damage a drawn case describes, applied to plan.json's text. The key path is drawn per top-level key first
    (so base and jobs, which the report reads least, do not swamp the rest), then within it."""
    if action == "truncate":
        return text[: pick % len(text)]
    plan = json.loads(text)
    tops = sorted(plan)
    top = tops[pick % len(tops)]
    inner = [(top,), *[(top, *p) for p in _paths(plan[top])]]
    path = inner[(pick // len(tops)) % len(inner)]
    parent = plan
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        choices = [v for v in OTHER_VALUES if _json_type(v) != _json_type(parent[path[-1]])]
        parent[path[-1]] = choices[other % len(choices)]
    return json.dumps(plan)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["compare", "sweep"]), action=st.sampled_from(["delete", "retype", "truncate"]),
       pick=st.integers(0, 10**6), other=st.integers(0, len(OTHER_VALUES) - 1))
def test_any_damaged_plan_reports_or_is_one_line(plans, tmp_path_factory, capsys, kind, action, pick, other):
    """Delete any key, replace any value by one of another type, or truncate the file: ``compare --report`` writes
    a report or exits 2 with one line, never a traceback."""
    folder = tmp_path_factory.mktemp("damaged")
    (folder / "plan.json").write_text(_damage((plans[kind] / "plan.json").read_text(), action, pick, other))
    capsys.readouterr()
    code = main(["compare", "--report", str(folder), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    if code == 0:
        assert (folder / "report" / "report.md").is_file()
    else:
        assert code == 2 and len(err) == 1 and err[0].startswith("superpose: error: "), err


def test_the_undamaged_plans_report(plans, tmp_path, capsys):
    """The property above starts from plans that report (exit 0), so a refusal there is the damage's doing."""
    for kind, folder in plans.items():
        assert main(["compare", "--report", str(folder), "--out", str(tmp_path / kind), "--quiet"]) == 0, kind
    assert "## Grid" in (tmp_path / "sweep" / "report.md").read_text()
    capsys.readouterr()
