"""A comparison as cluster jobs: ``superpose compare|sweep ... --plan DIR`` writes every run as an ordinary run
config, the dependency graph and launchers; ``superpose compare --report DIR`` collects whatever has finished.

``DIR`` holds ``plan.json`` (the comparison and its jobs: id, config, command, torchrun command, the job it waits
for, the checkpoint it forks from and the step that checkpoint is written at, the step it ends at and when it would
finish; the plan's makespan), ``jobs/seed-N/NAME/config.toml`` (one run config per job, trained with
``superpose train CONFIG --resume``) and ``job.sbatch`` beside it, ``run_local.sh`` (every job on this machine, one
after another or ``-j N`` at a time), ``torchrun.sh JOB`` and ``slurm.sh`` (every job submitted with sbatch; a trunk
segment after the one before it, a fork after the segment that writes its fork checkpoint), and ``runs/`` unless
``--runs`` says where.
The jobs are the ones the in-process ``compare`` trains (``jobs.plan_jobs``), started in the same order
(``jobs.launch_order``, from the jobs' ``after`` alone), so both give the same numbers.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import SuperposeError
from ..files import atomic_dir, read_json_object, require_empty
from ..train.config import RunConfig
from ..train.config_load import config_from_dict, read_toml
from .isoloss import DEFAULT_FAMILY
from .jobs import Job, Variant, check_comparison, finish_steps, launch_order, plan_jobs
from .results import Comparison, collect

SECTION_DEFAULTS: dict[str, Any] = {"seeds": 1, "family": list(DEFAULT_FAMILY), "ablation": ["both"],
                                    "bags": [2, 4, 8], "ratios": [0.1, 0.2, 0.3], "gpus": 1, "nodes": 1}
"""The keys of a config's ``[compare]`` section and their defaults (the command line's options override them)."""
ONLY_FOR = {"ablation": "compare", "bags": "sweep", "ratios": "sweep"}
KINDS = ("compare", "sweep")
"""What a plan holds: one comparison, or a sweep (a comparison over a grid, which its report draws)."""

STOP_LEAD_S = 900
"""SIGTERM this long before the time limit, and torchrun's wait before SIGKILL just under it (docs/distributed.md)."""


def load_comparison(path: str | Path, overrides: Sequence[str] = (),
                    command: str = "compare") -> tuple[RunConfig, dict[str, Any]]:
    """A run config file with an optional ``[compare]`` section (configs/paper/): the validated run config, and the
    section with defaults filled in. A key of the other command (a sweep's bags with compare) is refused."""
    path = Path(path)
    data = read_toml(path)
    section = data.pop("compare", {})
    if not isinstance(section, dict):
        raise SuperposeError(f"{path}: compare must be a table")
    unknown = sorted(set(section) - set(SECTION_DEFAULTS))
    if unknown:
        raise SuperposeError(f"unknown config key compare.{unknown[0]} (known: {', '.join(sorted(SECTION_DEFAULTS))})")
    for key, value in section.items():
        if ONLY_FOR.get(key, command) != command:
            raise SuperposeError(f"{path}: compare.{key} is for superpose {ONLY_FOR[key]}, not {command}")
        default = SECTION_DEFAULTS[key]
        if isinstance(default, int) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SuperposeError(f"compare.{key}: expected an integer >= 1, got {value!r}")
        if isinstance(default, list) and not isinstance(value, list):
            raise SuperposeError(f"compare.{key}: expected a list, got {value!r}")
    return config_from_dict(data, list(overrides)), {**SECTION_DEFAULTS, **section}


def _sh(path: Path | str) -> str:
    return shlex.quote(str(path))


def _job_json(job: Job, config: Path, gpus: int, nodes: int) -> dict[str, Any]:
    train = f"superpose train {_sh(config)} --resume"
    return {"id": job.id, "kind": job.kind, "seed": job.seed, "label": job.label, "config": str(config),
            "run_dir": str(job.cfg.run_dir), "steps": job.steps, "after": job.after,
            "fork_from": job.cfg.checkpoint.fork_from, "wait_step": job.wait_step, "command": train,
            "torchrun": f"torchrun --nnodes {nodes} --nproc_per_node {gpus} -m {train}"}


def _in_launch_order(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's jobs in the order every launcher starts them (the in-process compare too)."""
    by_id = {job["id"]: job for job in plan["jobs"]}
    return [by_id[i] for i in launch_order({job["id"]: job["after"] for job in plan["jobs"]})]


def _set_finish_steps(jobs: list[dict[str, Any]]) -> int:
    """Set each plan.json job's ``finish_step`` (:func:`~.jobs.finish_steps`); returns the plan's makespan."""
    finish = finish_steps({j["id"]: j["after"] for j in jobs}, {j["id"]: j["steps"] - j["wait_step"] for j in jobs})
    for job in jobs:
        job["finish_step"] = finish[job["id"]]
    return max(finish.values())


_RUN_LOCAL_FUNCTIONS = r"""superpose=${SUPERPOSE:-superpose}
at_once=1
while getopts j: opt; do
    case $opt in
        j) at_once=$OPTARG ;;
        *) echo "usage: $0 [-j N]" >&2; exit 2 ;;
    esac
done
mkdir -p "$plan/logs"
declare -A pid rc
failed=0

running() {
    local n=0 p
    for p in "${pid[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
    echo "$n"
}

ended() {  # JOB: wait for it to end (once); its exit status
    [ -n "${rc[$1]:-}" ] || { wait "${pid[$1]}"; rc[$1]=$?; }
    return "${rc[$1]}"
}

start() {  # JOB CONFIG AFTER FORK_FROM
    local job=$1 config=$2 after=$3 source=$4
    if [ -z "$source" ] && [ -n "$after" ] && ! { [ -n "${pid[$after]:-}" ] && ended "$after"; }; then
        echo "$job: not started: $after did not finish" >&2
        failed=1
        return
    fi
    if [ -n "$source" ]; then
        until [ -f "$source/state.json" ]; do
            if [ -z "${pid[$after]:-}" ] || ! kill -0 "${pid[$after]}" 2>/dev/null; then
                [ -f "$source/state.json" ] && break
                echo "$job: not started: $after ended without writing $source" >&2
                failed=1
                return
            fi
            sleep 1
        done
    fi
    while [ "$(running)" -ge "$at_once" ]; do sleep 1; done
    echo "start $job"
    $superpose train "$config" --resume --quiet >>"$plan/logs/${job//\//_}.log" 2>&1 &
    pid[$job]=$!
}

"""
"""run_local.sh after its header: the options, and `start JOB CONFIG AFTER FORK_FROM`, which waits for what the job
needs and then starts it in the background."""

_RUN_LOCAL_END = r"""
for job in "${!pid[@]}"; do
    if ! ended "$job"; then echo "$job failed: see $plan/logs/" >&2; failed=1; fi
done
exit $failed
"""


def _run_local(plan: dict[str, Any]) -> str:
    starts = "\n".join(f"start {_sh(j['id'])} {_sh(j['config'])} {_sh(j['after'])} {_sh(j['fork_from'])}"
                       for j in _in_launch_order(plan))
    return f"""#!/usr/bin/env bash
# Train every run of this plan on this machine, in dependency order: one after another, or -j N at a time. A
# baseline forked from its trunk starts once the trunk has written the checkpoint it starts from; a trunk segment
# once the segment before it has ended. Every run is `superpose train CONFIG --resume`, so running this again
# continues what was stopped and skips nothing finished twice (a finished run resumes at its end). Logs: logs/.
# SUPERPOSE overrides the command (default: superpose).
set -u
plan={_sh(plan['dir'])}
cd {_sh(plan['workdir'])} || exit 2
""" + _RUN_LOCAL_FUNCTIONS + starts + _RUN_LOCAL_END


def _torchrun(plan: dict[str, Any]) -> str:
    return f"""#!/usr/bin/env bash
# One job of this plan under torchrun: torchrun.sh JOB [TORCHRUN OPTIONS...], JOB as in plan.json (e.g.
# seed-0/trunk). Run it again to continue a stopped run (--resume). Multi-node: add --nnodes, --rdzv_* options.
set -eu
[ $# -ge 1 ] || {{ echo "usage: $0 JOB [torchrun options]" >&2; exit 2; }}
config={_sh(plan['dir'])}/jobs/$1/config.toml
[ -f "$config" ] || {{ echo "$0: no job $1 in this plan (see plan.json)" >&2; exit 2; }}
shift
cd {_sh(plan['workdir'])}
exec torchrun --nproc_per_node {plan['gpus']} --shutdown-timeout {STOP_LEAD_S - 60} "$@" \\
    -m superpose train "$config" --resume
"""


def _sbatch(plan: dict[str, Any], job: dict[str, Any]) -> str:
    log = f"{plan['dir']}/logs/{job['id'].replace('/', '_')}-%j.log"
    return f"""#!/bin/bash
#SBATCH --job-name={job['id'].replace('/', '_')}
#SBATCH --nodes={plan['nodes']}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={plan['gpus']}
#SBATCH --signal=TERM@{STOP_LEAD_S}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={log}
# SIGTERM reaches every training process {STOP_LEAD_S} s before the time limit (no "B:"); they checkpoint and exit
# 143, and the job requeues itself to continue (--resume). Preemption requeues it too (--requeue).
cd {_sh(plan['workdir'])}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {plan['gpus']} \\
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head:29500" \\
    --shutdown-timeout {STOP_LEAD_S - 60} \\
    -m superpose train {_sh(job['config'])} --resume --quiet
rc=$?
if [ "$rc" -ne 0 ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt "${{SUPERPOSE_REQUEUES:-20}}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""


def _slurm(plan: dict[str, Any]) -> str:
    submits = "\n".join(f"submit {_sh(j['id'])}" + (f" {_sh(j['after'])}" if j["after"] else "")
                        for j in _in_launch_order(plan))
    return f"""#!/usr/bin/env bash
# Submit every run of this plan to SLURM: bash slurm.sh [SBATCH OPTIONS...] (e.g. --partition=gpu --time=24:00:00,
# given to every job). The trunk is a chain of segment jobs, each ending at a fork step; a baseline starts after the
# segment that writes its fork checkpoint (afterok), so each member ends at its own length in steps, not after the
# whole trunk (plan.json: finish_step, makespan_steps = {plan['makespan_steps']}). Each job is jobs/JOB/job.sbatch;
# submitting one again continues it.
set -euo pipefail
plan={_sh(plan['dir'])}
options=("$@")
mkdir -p "$plan/logs"
declare -A id

submit() {{  # JOB [JOB IT WAITS FOR]
    local dependency=()
    if [ $# -ge 2 ]; then dependency=(--dependency="afterok:${{id[$2]}}"); fi
    id[$1]=$(sbatch --parsable ${{dependency[@]+"${{dependency[@]}}"}} ${{options[@]+"${{options[@]}}"}} \\
        "$plan/jobs/$1/job.sbatch")
    id[$1]=${{id[$1]%%;*}}
    echo "$1: job ${{id[$1]}}${{2:+ after $2}}"
}}

{submits}
"""


def write_plan(out: Path, base: RunConfig, variants: Sequence[Variant], seeds: int, family: Sequence[float],
               runs: Path | None = None, gpus: int = 1, nodes: int = 1, kind: str = "compare",
               extra: dict[str, Any] | None = None) -> Path:
    """Write the comparison's jobs, ``plan.json`` and launchers into ``out`` (empty or new); returns plan.json."""
    check_comparison(base, variants, seeds, family)
    if gpus < 1 or nodes < 1:
        raise SuperposeError(f"--gpus and --nodes must be >= 1, got {gpus} and {nodes}")
    out = Path(out).resolve()
    require_empty(out, "plan folder")
    runs = Path(runs).resolve() if runs else out / "runs"
    jobs = plan_jobs(base, variants, seeds, family, runs)
    for job in jobs:
        job.cfg.validate(gpus * nodes)  # the global batch must split over the ranks
    plan = {"version": 1, "kind": kind, "dir": str(out), "workdir": str(Path.cwd()), "runs": str(runs),
            "gpus": gpus, "nodes": nodes, "base": base.to_dict(), "seeds": seeds, "family": list(family),
            "variants": [{"label": v.label, "tst": v.tst} for v in variants], **(extra or {}),
            "jobs": [_job_json(job, out / "jobs" / job.id / "config.toml", gpus, nodes) for job in jobs]}
    plan["makespan_steps"] = _set_finish_steps(plan["jobs"])
    with atomic_dir(out) as tmp:
        for job in jobs:
            folder = tmp / "jobs" / job.id
            folder.mkdir(parents=True)
            (folder / "config.toml").write_text(job.cfg.to_toml())
        for job in plan["jobs"]:
            (tmp / "jobs" / job["id"] / "job.sbatch").write_text(_sbatch(plan, job))
        for name, text in (("run_local.sh", _run_local(plan)), ("torchrun.sh", _torchrun(plan)),
                           ("slurm.sh", _slurm(plan))):
            (tmp / name).write_text(text)
            (tmp / name).chmod(0o755)
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2))
    return out / "plan.json"


_MISSING = object()


def _require(path: Path, field: str, value: Any, ok: Callable[[Any], bool], what: str) -> None:
    """Refuse a plan.json field that is missing or not ``what``, in one line naming the file and the field."""
    if value is _MISSING:
        raise SuperposeError(f"{path}: {field} is missing; write the plan again with --plan")
    if not ok(value):
        shown = json.dumps(value)
        raise SuperposeError(f"{path}: {field} must be {what}, got {shown if len(shown) <= 60 else shown[:57] + '...'}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and not any(c in value for c in "/\\\0")


def _list_of(ok: Callable[[Any], bool], size: int | None = None) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and bool(value) and all(map(ok, value)) and size in (None, len(value))


def _check_plan(path: Path, plan: dict[str, Any]) -> None:
    """Every field the report reads, by type and required keys: a tampered plan.json is refused in one line."""
    fields = [("kind", lambda v: v in KINDS, '"compare" or "sweep"'),
              ("runs", lambda v: isinstance(v, str) and v != "", "the runs folder's path"),
              ("base", lambda v: isinstance(v, dict), "a run config (a JSON object)"),
              ("seeds", _is_int, "an integer >= 1"),
              ("family", _list_of(_is_number), "a list of numbers"),
              ("variants", _list_of(lambda v: isinstance(v, dict)), 'a list of {"label": ..., "tst": {...}}')]
    for field, ok, what in fields:
        _require(path, field, plan.get(field, _MISSING), ok, what)
    for i, variant in enumerate(plan["variants"]):
        _require(path, f"variants[{i}].label", variant.get("label", _MISSING), _is_name, "a folder-safe name")
        _require(path, f"variants[{i}].tst", variant.get("tst", _MISSING), lambda v: isinstance(v, dict),
                 "a JSON object of [tst] keys")
    if plan["kind"] == "sweep":
        _require(path, "grid", plan.get("grid", _MISSING), lambda v: isinstance(v, dict), "an object (a sweep's)")
        grid = plan["grid"]
        _require(path, "grid.bags", grid.get("bags", _MISSING), _list_of(_is_int), "a list of integers >= 1")
        _require(path, "grid.ratios", grid.get("ratios", _MISSING), _list_of(_is_number), "a list of numbers")
        bags, ratios = len(grid["bags"]), len(grid["ratios"])
        _require(path, "grid.labels", grid.get("labels", _MISSING),
                 _list_of(_list_of(lambda v: isinstance(v, str), ratios), bags),
                 f"{bags} lists (one per bag) of {ratios} labels (one per ratio)")


def read_plan(folder: Path) -> dict[str, Any]:
    """``folder``'s plan.json with every field the report reads checked (a damaged or tampered file is refused in
    one line naming it and the field)."""
    path = Path(folder) / "plan.json"
    if not path.is_file():
        raise SuperposeError(f"{folder} holds no plan.json; write one with superpose compare CONFIG --plan {folder}")
    plan = read_json_object(path)
    if plan.get("version") != 1:
        raise SuperposeError(f"{path} is not a superpose plan (version 1)")
    _check_plan(path, plan)
    return plan


def collect_plan(folder: Path) -> tuple[Comparison, dict[str, Any]]:
    """The comparison of a plan as far as its runs have finished, and the plan (its ``base`` as validated, every key
    filled in). A stopped run's status names the command that continues it."""
    plan = read_plan(folder)
    path = Path(folder) / "plan.json"
    try:
        base = config_from_dict(plan["base"])
    except SuperposeError as e:
        raise SuperposeError(f"{path}: base: {e}") from None
    variants = [Variant(v["label"], v["tst"]) for v in plan["variants"]]
    try:
        check_comparison(base, variants, plan["seeds"], plan["family"])
    except SuperposeError as e:
        raise SuperposeError(f"{path}: {e}") from None
    plan["base"] = base.to_dict()
    result = collect(base, variants, plan["seeds"], plan["family"], Path(plan["runs"]), partial=True)
    jobs = Path(folder).resolve() / "jobs"
    for status in result.status:
        if status["state"] == "stopped":
            status["resume"] = f"superpose train {_sh(jobs / status['run'] / 'config.toml')} --resume"
    if plan["kind"] == "sweep":
        result.extra["grid"] = plan["grid"]
    return result, plan
