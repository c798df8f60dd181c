"""Comparisons as cluster jobs: the plan (run configs, dependency graph, launchers), forks that start from the
trunk's kept checkpoints, the report of whatever has finished, the paper's configs; and, end to end, a plan whose
jobs run out of order in separate processes, one killed and rerun, reporting exactly what the in-process compare
reports."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import make_tiny_config, run_error
import superpose.compare.plan
import superpose.compare.runner
from superpose.cli import main
from superpose.compare import (
    IsoLoss,
    compare,
    iso_loss_partial,
    iso_loss_steps,
    launch_order,
    plan_jobs,
    run_jobs,
    variants_for,
    write_report,
)
from superpose.compare.jobs import derive
from superpose.compare.plan import write_plan
from superpose.errors import SuperposeError
from superpose.train.config_load import load_config
from superpose.schedule import lr_at
from superpose.train.checkpoint import list_checkpoints
from superpose.train.faults import KILL_ENV
from superpose.train.loop import train
from superpose.train.metrics import read_metrics
from superpose.train.callbacks import CheckpointCadence

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
SUPERPOSE = [sys.executable, "-m", "superpose"]


def _plan(tmp_path, base, name="plan", **kw):
    write_plan(tmp_path / name, base, variants_for(base, ("both",)), kw.pop("seeds", 1), kw.pop("family", (0.5, 1.0)),
               **kw)
    return tmp_path / name, json.loads((tmp_path / name / "plan.json").read_text())


# ------------------------------------------------------------------ pure parts and the plan (nothing trained)


def test_iso_loss_over_a_partly_finished_family():
    lengths, losses = [100, 200, 400, 800], {100: 5.0, 200: 4.7, 400: 4.4, 800: 4.1}
    assert iso_loss_partial(lengths, losses, 4.55) == iso_loss_steps(list(losses), list(losses.values()), 4.55)
    del losses[200]
    assert iso_loss_partial(lengths, losses, 4.55) == IsoLoss(100, ">")  # 200 could still cross first: a bound
    assert iso_loss_partial(lengths, losses, 4.3).bound == ""  # 400 and 800 are neighbours: a number
    assert iso_loss_partial(lengths, {100: 5.0}, 4.0) == IsoLoss(100, ">")  # below the only finished member
    assert iso_loss_partial(lengths, {400: 4.4}, 4.9) == IsoLoss(400, "<")


def test_kept_steps_are_checkpointed_and_never_pruned():
    cadence = CheckpointCadence(every=4, switches={5}, total=12, keep_steps={3, 6}, save=lambda keep: None)
    assert [cadence.kind(s) for s in range(1, 13)] == [
        None, None, "keep", "periodic", "keep", "keep", None, "periodic", None, None, None, "keep"]


JOBS = ("trunk-3", "trunk-6", "baseline-4", "baseline-8", "s4-r0.5-T8")
"""The jobs of a seed of the tiny plan (T = 8, family 0.5, 1): the trunk's segments to the fork steps 3 and 6, the
family, the arm."""


def test_stop_at_ends_the_process_at_that_step_with_a_kept_checkpoint(tiny_config, capsys):
    """``train.stop_at``: the run ends after that step with a checkpoint kept forever and no stop signal, its LR still
    that of the whole run; --resume continues it. Out of range, one line."""
    cfg = tiny_config("seg", tst={"bag": 1, "ratio": 0.0}, train={"steps": 8, "stop_at": 3},
                      checkpoint={"every": 2, "keep": 1})
    result = train(cfg, progress=False)
    assert (result.steps, result.stopped) == (3, None)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-0000002", "step-0000003"]
    assert json.loads((cfg.run_dir / "checkpoints" / "step-0000003" / "state.json").read_text())["keep_always"]
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and "val_loss" not in rows[-1]  # no final evaluation at 3
    assert [r["lr"] for r in rows] == [lr_at(s, 8, peak=3e-3, warmup_steps=2) for s in range(3)]
    assert train(derive(cfg, train={"stop_at": 0}), resume=True, progress=False).steps == 8
    config = cfg.run_dir.parent / "seg.toml"
    config.write_text(cfg.to_toml())
    assert "train.stop_at: must be a step from 1 to train.steps (8), or 0 (off); got 9" in run_error(
        capsys, ["train", str(config), "train.stop_at=9"])


def test_plan_writes_run_configs_a_graph_and_launchers(tiny_config, tmp_path):
    base = tiny_config("cmp", train={"steps": 8})
    folder, plan = _plan(tmp_path, base, seeds=2)
    jobs = {j["id"]: j for j in plan["jobs"]}
    assert list(jobs) == [f"seed-{s}/{n}" for s in (0, 1) for n in JOBS]
    runs = folder / "runs" / "seed-0"
    for job in plan["jobs"]:  # each an ordinary config, trained by the command plan.json names
        cfg = load_config(job["config"])
        assert job["command"] == f"superpose train {job['config']} --resume" and job["config"] in job["torchrun"]
        assert cfg.run_dir == Path(job["run_dir"]) and (cfg.train.stop_at or cfg.train.steps) == job["steps"]
    for stop, after, wait in ((3, "", 0), (6, "seed-0/trunk-3", 3)):  # one run, stopped at each fork step
        trunk = load_config(jobs[f"seed-0/trunk-{stop}"]["config"])
        assert (trunk.name, trunk.train.steps, trunk.train.stop_at) == ("trunk", 6, stop)
        assert (trunk.checkpoint.keep_steps, trunk.optim.decay_fraction) == ([3, 6], 0.0)
        assert (jobs[f"seed-0/trunk-{stop}"]["after"], jobs[f"seed-0/trunk-{stop}"]["wait_step"]) == (after, wait)
    for steps, fork in ((4, 3), (8, 6)):
        job = jobs[f"seed-0/baseline-{steps}"]
        assert (job["after"], job["wait_step"]) == (f"seed-0/trunk-{fork}", fork)
        assert jobs[job["after"]]["steps"] == job["wait_step"]  # the segment that writes its fork checkpoint
        assert job["fork_from"] == str(runs / "trunk" / "checkpoints" / f"step-{fork:07d}")
        assert load_config(job["config"]).checkpoint.fork_from == job["fork_from"]
    arm = load_config(jobs["seed-1/s4-r0.5-T8"]["config"])
    assert (arm.seed, arm.tst.bag, arm.checkpoint.fork_from, jobs["seed-1/s4-r0.5-T8"]["after"]) == (1, 4, "", "")
    # each member ends at its own length, not after the whole trunk (that was 6 + 1 for baseline-4)
    assert [jobs[f"seed-0/{n}"]["finish_step"] for n in JOBS] == [3, 6, 4, 8, 8]
    assert plan["makespan_steps"] == 8
    for script in ("run_local.sh", "torchrun.sh", "slurm.sh", "jobs/seed-0/trunk-3/job.sbatch"):
        subprocess.run(["bash", "-n", str(folder / script)], check=True)
    with pytest.raises(SuperposeError, match="plan folder .* is not empty"):
        _plan(tmp_path, base)


def _fake(tmp_path, name, body):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_slurm_script_chains_the_trunk_segments_and_forks_each_after_its_segment(tiny_config, tmp_path):
    folder, plan = _plan(tmp_path, tiny_config("cmp", train={"steps": 8, "batch_size": 8}), gpus=4, nodes=2)
    log = tmp_path / "sbatch.log"
    _fake(tmp_path, "sbatch", f"""\
        n=$(( $(wc -l < {log} 2>/dev/null || echo 0) + 101 ))
        echo "$n $*" >> {log}
        echo "$n;cluster"
        """)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(folder / "slurm.sh"), "--partition=gpu"], check=True, env=env, capture_output=True)
    calls = [line.split() for line in log.read_text().splitlines()]
    submitted = {Path(c[-1]).parent.relative_to(folder / "jobs").as_posix(): c for c in calls}
    jobs = {j["id"]: j for j in plan["jobs"]}
    waits_for = {}
    for job in plan["jobs"]:
        call = submitted[job["id"]]
        assert "--parsable" in call and "--partition=gpu" in call
        dependency = [a for a in call if a.startswith("--dependency")]
        waits_for[job["id"]] = next(i for i, c in submitted.items() if dependency == [f"--dependency=afterok:{c[0]}"]
                                    ) if dependency else ""
    assert waits_for == {"seed-0/trunk-3": "", "seed-0/trunk-6": "seed-0/trunk-3",  # the segments chain
                         "seed-0/baseline-4": "seed-0/trunk-3", "seed-0/baseline-8": "seed-0/trunk-6",
                         "seed-0/s4-r0.5-T8": ""}
    for fork in ("seed-0/baseline-4", "seed-0/baseline-8"):  # the segment that ends at its fork step
        assert jobs[waits_for[fork]]["steps"] == jobs[fork]["wait_step"]
    sbatch = (folder / "jobs" / "seed-0" / "baseline-8" / "job.sbatch").read_text()
    for line in ("#SBATCH --signal=TERM@900", "#SBATCH --requeue", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                 "--shutdown-timeout 840", "--nproc_per_node 4", "scontrol requeue", "--resume"):
        assert line in sbatch


STUB = """\
import json, sys, time, tomllib
from pathlib import Path
cfg = tomllib.loads(Path(sys.argv[2]).read_text())
log = Path(sys.argv[0]).with_suffix(".log")
stop = cfg["train"]["stop_at"]
name = cfg["name"] + (f"-{stop}" if stop else "")  # the job's id in its seed
def note(event):
    with log.open("a") as f:
        f.write(json.dumps([event, name, time.time()]) + "\\n")
source = cfg["checkpoint"]["fork_from"]
if source and not (Path(source) / "state.json").is_file():
    note("early")
    sys.exit(2)
note("start")
run = Path(cfg["out_dir"]) / cfg["name"]
for step in cfg["checkpoint"]["keep_steps"]:  # a trunk segment: its fork checkpoints appear while it runs
    if step > stop or (run / "checkpoints" / f"step-{step:07d}").exists():
        continue
    time.sleep(0.4)
    if cfg["name"] == "trunk" and "FAIL" in str(log.parent):
        sys.exit(1)
    (run / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    (run / "checkpoints" / f"step-{step:07d}" / "state.json").write_text("{}")
time.sleep(0.4)
note("end")
"""


def _local(tmp_path, folder, *args):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    env = {**os.environ, "SUPERPOSE": f"{sys.executable} {stub}"}
    done = subprocess.run(["bash", str(folder / "run_local.sh"), *args], env=env, capture_output=True, text=True)
    log = tmp_path / "stub.log"
    return done, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _most_at_once(events):
    live = most = 0
    for kind, _, _ in sorted(events, key=lambda e: e[2]):
        live += {"start": 1, "end": -1}.get(kind, 0)
        most = max(most, live)
    return most


@pytest.mark.parametrize("at_once", [1, 2])
def test_run_local_respects_the_graph(tiny_config, tmp_path, at_once):
    folder, _ = _plan(tmp_path, tiny_config("cmp", train={"steps": 8}))
    done, events = _local(tmp_path, folder, "-j", str(at_once))
    assert done.returncode == 0, done.stderr
    assert "early" not in [e[0] for e in events]  # no fork started before its checkpoint existed
    assert sorted(e[1] for e in events if e[0] == "end") == sorted(JOBS)
    assert _most_at_once(events) == at_once
    start = {e[1]: e[2] for e in events if e[0] == "start"}
    end = {e[1]: e[2] for e in events if e[0] == "end"}
    assert end["trunk-3"] < start["trunk-6"]  # a segment continues the run once the one before it has ended
    if at_once == 2:  # baseline-4 forks at step 3 and starts while the trunk's next segment still runs
        assert start["baseline-4"] < end["trunk-6"]


def test_run_local_does_not_start_forks_of_a_failed_trunk(tiny_config, tmp_path):
    failing = tmp_path / "FAIL"
    failing.mkdir()
    folder, _ = _plan(failing, tiny_config("cmp", train={"steps": 8}))
    done, events = _local(failing, folder, "-j", "2")
    assert done.returncode == 1
    assert "seed-0/baseline-4: not started: seed-0/trunk-3 ended without writing" in done.stderr
    assert "seed-0/trunk-6: not started: seed-0/trunk-3 did not finish" in done.stderr
    assert {e[1] for e in events if e[0] == "start"} == {"trunk-3", "s4-r0.5-T8"}


def test_compare_and_the_launchers_start_jobs_in_one_order(tiny_config, tmp_path, monkeypatch):
    """The order of starts is derived from the job list and its ``after`` alone, in one place: a plan whose list is
    permuted and one of whose dependencies is altered starts in the same, changed, order in this process, in
    run_local.sh and in slurm.sh."""
    base = tiny_config("cmp", train={"steps": 8})
    jobs = plan_jobs(base, variants_for(base, ("both",)), 2, (0.5, 1.0), tmp_path / "runs")
    arm0, arm1 = "seed-0/s4-r0.5-T8", "seed-1/s4-r0.5-T8"
    assert [j.id for j in jobs] == [f"seed-{s}/{n}" for s in (0, 1) for n in JOBS]
    altered = [replace(j, after=arm1) if j.id == "seed-0/trunk-3" else j for j in reversed(jobs)]
    expected = [arm1, "seed-1/trunk-3", arm0,  # wait for none, in the altered list's order
                "seed-1/baseline-4", "seed-1/trunk-6", "seed-0/trunk-3",  # wait for one of those
                "seed-1/baseline-8", "seed-0/baseline-4", "seed-0/trunk-6",  # and so on
                "seed-0/baseline-8"]

    trained = []
    monkeypatch.setattr(superpose.compare.runner, "train", lambda cfg, **_: trained.append(
        f"seed-{cfg.seed}/{cfg.name}" + (f"-{cfg.train.stop_at}" if cfg.train.stop_at else ""))
        or SimpleNamespace(stopped=False))
    run_jobs(altered, progress=False)

    monkeypatch.setattr(superpose.compare.plan, "plan_jobs", lambda *args: altered)
    folder, plan = _plan(tmp_path, base, seeds=2)
    assert [j["id"] for j in plan["jobs"]] == [j.id for j in altered]  # plan.json holds the altered description
    done, _ = _local(tmp_path, folder)
    assert done.returncode == 0, done.stderr
    started = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("start ")]
    submitted = [line.split()[1] for line in (folder / "slurm.sh").read_text().splitlines()
                 if line.startswith("submit ")]
    assert trained == started == submitted == expected


def test_launch_order_refuses_a_broken_graph():
    assert launch_order({"b": "a", "a": "", "c": ""}) == ["a", "c", "b"]
    with pytest.raises(ValueError, match="not a job of the plan"):
        launch_order({"b": "a"})
    with pytest.raises(ValueError, match="in a circle: a -> b -> a"):
        launch_order({"a": "b", "b": "a"})


def test_every_paper_config_plans(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the data need not exist to plan: each run checks it when it starts
    files = sorted(PAPER.glob("*.toml"))
    assert {f.stem for f in files} >= {"llama-270m", "llama-600m", "smollm3-3b", "qwen3-moe-10b-a1b", "ablation-270m",
                                       "sweep-270m"}
    for path in files:
        section = tomllib.loads(path.read_text())["compare"]
        command = "sweep" if "bags" in section else "compare"
        assert main([command, str(path), "--plan", str(tmp_path / path.stem), "--quiet"]) == 0
        plan = json.loads((tmp_path / path.stem / "plan.json").read_text())
        assert (plan["gpus"], plan["nodes"], plan["family"]) == (section["gpus"], section["nodes"], section["family"])
        labels = {v["label"] for v in plan["variants"]}
        # one trunk segment per fork step, the family, the arms (one seed)
        assert len(plan["jobs"]) == 2 * len(section["family"]) + len(labels)
    assert {v["label"] for v in json.loads((tmp_path / "smollm3-3b" / "plan.json").read_text())["variants"]} == {
        "s6-r0.3"}
    assert {v["label"] for v in json.loads((tmp_path / "qwen3-moe-10b-a1b" / "plan.json").read_text())["variants"]} == {
        "s16-r0.25"}
    assert len(json.loads((tmp_path / "sweep-270m" / "plan.json").read_text())["variants"]) == 12
    ablation = json.loads((tmp_path / "ablation-270m" / "plan.json").read_text())
    assert {v["tst"]["mode"] for v in ablation["variants"]} == {"both", "input", "output"}
    # family 0.5,1,2,4 of 20k steps: each member ends at its own length (the whole trunk first: 66k, 68k, 72k, 80k);
    # the makespan stays the longest member's 80k, its fork at 64k plus its decay (docs/cluster.md)
    recipe = json.loads((tmp_path / "llama-270m" / "plan.json").read_text())
    assert {j["id"]: j["finish_step"] for j in recipe["jobs"] if j["kind"] == "baseline"} == {
        f"seed-0/baseline-{n}": n for n in (10000, 20000, 40000, 80000)}
    assert recipe["makespan_steps"] == 80000


@pytest.mark.parametrize("section, fragment", [
    ("[compare]\nbags = [2, 4]\n", "compare.bags is for superpose sweep"),
    ("[compare]\nseeds = 0\n", "compare.seeds: expected an integer >= 1"),
    ("[compare]\nnodess = 2\n", "unknown config key compare.nodess"),
])
def test_bad_compare_section_is_one_line(tiny_config, tmp_path, capsys, section, fragment):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config("bad").to_toml() + section)
    assert fragment in run_error(capsys, ["compare", str(cfg), "--plan", str(tmp_path / "plan")])
    assert not (tmp_path / "plan").exists()


def test_report_and_plan_refuse_bad_input_in_one_line(tiny_config, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config("cmp", train={"steps": 8}).to_toml())
    assert "--out is required" in run_error(capsys, ["compare", str(cfg)])
    assert "holds no plan.json" in run_error(capsys, ["compare", "--report", str(tmp_path)])
    assert main(["compare", str(cfg), "--family", "0.5,1", "--plan", str(tmp_path / "plan")]) == 0
    assert "give no CONFIG" in run_error(capsys, ["compare", str(cfg), "--report", str(tmp_path / "plan")])
    assert "no baseline of the family has finished yet" in run_error(
        capsys, ["compare", "--report", str(tmp_path / "plan")])
    assert not (tmp_path / "plan" / "report").exists()


def test_a_fork_started_before_its_source_is_one_line(tiny_config, tmp_path, capsys):
    folder, plan = _plan(tmp_path, tiny_config("cmp", train={"steps": 8}))
    fork = next(j for j in plan["jobs"] if j["id"] == "seed-0/baseline-8")
    msg = run_error(capsys, ["train", fork["config"], "--resume", "--quiet"])
    assert f"checkpoint.fork_from: {fork['fork_from']} does not exist yet" in msg
    assert not Path(fork["run_dir"]).exists()


# ------------------------------------------------------------------ end to end: out of order, killed, collected


def _job(plan, job_id, **env):
    """Start a planned job's own command in its own process."""
    command = shlex.split(next(j for j in plan["jobs"] if j["id"] == job_id)["command"])
    assert command[0] == "superpose"
    return subprocess.Popen([*SUPERPOSE, *command[1:], "--quiet"], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(*procs):
    return [(p.wait(), p.stderr.read()) for p in procs]


def _numbers(report):
    """report.json without what differs between two collections of the same runs: timing, provenance, paths."""
    if isinstance(report, dict):
        return {k: _numbers(v) for k, v in report.items()
                if k not in ("provenance", "command", "runs", "run_dir") and "wall" not in k and "gpu_hours" not in k}
    if isinstance(report, list):
        return [_numbers(x) for x in report]
    return report


@pytest.mark.slow
def test_planned_jobs_out_of_order_killed_and_rerun_report_what_compare_reports(embedded_data, tmp_path, capsys):
    base = make_tiny_config(embedded_data, tmp_path / "unused", "cmp", train={"steps": 8})
    folder, plan = _plan(tmp_path, base)
    first, trunk, b4, b8, arm = (f"seed-0/{name}" for name in JOBS)

    (code, err), = _finish(_job(plan, b8))  # a fork before its trunk: refused in one line, nothing written
    assert code == 2 and "trunk/checkpoints/step-0000006 does not exist yet" in err
    # the arm and the trunk's first segment at once: it stops at the fork step 3 with its checkpoint, and succeeds
    (arm_code, _), (first_code, _) = _finish(_job(plan, arm), _job(plan, first))
    assert (arm_code, first_code) == (0, 0)
    checkpoints = folder / "runs" / "seed-0" / "trunk" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000003"]
    # the second segment continues the run and is SIGKILLed after step 5 (kept step 3, periodic step 4)
    (trunk_code, _), = _finish(_job(plan, trunk, **{KILL_ENV: "step:5"}))
    assert trunk_code == -signal.SIGKILL
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000003", "step-0000004"]

    # the short baseline forks from the kept step 3 while the killed trunk is rerun: it resumes at step 4
    (b4_code, _), (rerun_code, _) = _finish(_job(plan, b4), _job(plan, trunk))
    assert (b4_code, rerun_code) == (0, 0)
    assert main(["compare", "--report", str(folder), "--quiet"]) == 0  # baseline-8 not started: bounds, marked
    partial = json.loads((folder / "report" / "report.json").read_text())
    assert {s["run"]: s["state"] for s in partial["status"]}[b8] == "not started"
    assert partial["arms"][0]["bound"] in (">", "<") and partial["family"]["0"][0]["steps"] == 4
    assert "## Not finished yet" in (folder / "report" / "report.md").read_text()

    (code, _), = _finish(_job(plan, b8))
    assert code == 0
    out = tmp_path / "collected"
    assert main(["compare", "--report", str(folder), "--out", str(out), "--quiet"]) == 0
    in_process = compare(base, variants_for(base, ("both",)), family=(0.5, 1.0), runs=tmp_path / "in-process",
                         progress=False)
    write_report(in_process, tmp_path / "reference", json.loads((out / "report.json").read_text())["title"], "x")
    collected = json.loads((out / "report.json").read_text())
    reference = json.loads((tmp_path / "reference" / "report.json").read_text())
    assert all(s["state"] == "finished" for s in collected["status"])
    assert _numbers(collected) == _numbers(reference)
    assert collected["arms"][0]["gpu_hours"] > 0 and collected["family"]["0"][1]["gpu_hours"] > 0
    assert "GPU-hours speedup" in (out / "report.md").read_text()
    capsys.readouterr()


def test_a_sweep_collected_early_says_where_each_unfinished_cell_stands(tmp_path):
    from superpose.compare import sweep_extras

    cell = {"label": "s2-r0.2", "final_val_loss_mean": 4.5, "speedup_text": "> 1.50x", "speedup_mean": 1.5}
    arms = {"s4-r0.2": ["stopped", "running"], "s4-r0.4": ["stopped", "finished"], "s2-r0.4": ["not started"]}
    early = SimpleNamespace(summaries=[cell], status=[{"label": label, "state": state} for label, states in
                                                      arms.items() for state in states],
                            extra={"grid": {"bags": [2, 4], "ratios": [0.2, 0.4],
                                            "labels": [["s2-r0.2", "s2-r0.4"], ["s4-r0.2", "s4-r0.4"]]}})
    md, plots = sweep_extras(early, tmp_path)
    assert "| 2 | 4.5000 / > 1.50x | not started |" in md and "| 4 | running | stopped |" in md
    assert plots == [] and not (tmp_path / "sweep_heatmap.png").exists()  # the heatmap waits for every cell
