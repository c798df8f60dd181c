"""Step time of a TST phase-1 step against a baseline step, and of ``superpose train`` against a plain loop.

(1) Phase 1 vs baseline: one training run alternates blocks of phase-1 steps (bag s) and baseline steps (bag 1)
through a multi-stage schedule; the ratio is the median over pairs of neighbouring blocks of their median step times,
so load changes on a shared machine cancel. The first pair (warm-up) and the first steps of each block (the window
length changes there) are dropped. Target: phase-1 / baseline step time <= 1.03, and text tokens per second ~ s x.

(2) ``--plain``: the trainer at bag 1 (``train()``, as ``superpose train`` runs it: its defaults for logging,
TensorBoard, prefetching and the optimizer) against the loop a user would write (the same preset as a transformers
model, numpy windows, ``torch.optim.AdamW``, gradient clipping), in alternating rounds (plain first in even rounds,
the trainer first in odd ones), each arm in a fresh process, ``--warmup`` steps then ``--steps`` timed steps; the
ratio is the median over rounds. Target: ratio <= 1.02.

    python bench/step_time.py --data data/embedded --bag 4 --out bench/results/step_time.json
    python bench/step_time.py --data data/embedded --bag 4 8 --plain --steps 200 --warmup 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from superpose.models import build_model, model_config, use_causal_sdpa
from superpose.provenance import provenance
from superpose.train.config_load import config_from_dict
from superpose.train.loop import train
from superpose.train.metrics import read_metrics


def measure(data: Path, bag: int, preset: str, batch: int, seq_len: int, blocks_n: int, block: int, skip: int,
            device: str) -> dict:
    """Run the alternating schedule in a scratch folder; return median step times and token rates per bag."""
    schedule = [[(i + 1) * block, bag if i % 2 == 0 else 1] for i in range(2 * blocks_n)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict({
            "name": "step-time", "out_dir": tmp, "model": {"preset": preset}, "data": {"path": str(data)},
            "tst": {"schedule": schedule}, "optim": {"warmup_steps": 0},
            "train": {"steps": 2 * blocks_n * block, "batch_size": batch, "seq_len": seq_len, "device": device,
                      "log_every": 1},
            "eval": {"every": 0, "batches": 1}, "checkpoint": {"every": 0},
        })
        result = train(cfg, progress=False)
        rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "step_time" in r]  # not the warm-up

    def per_block(b: int, key: str) -> list[float]:
        """Median of ``key`` in each block at bag ``b``, its first ``skip`` steps dropped; the first block dropped."""
        kept = [[r[key] for r in rows if (r["step"] - 1) // block == i and (r["step"] - 1) % block >= skip]
                for i in range(2 * blocks_n) if (i % 2 == 0) == (b == bag)]
        return [statistics.median(x) for x in kept[1:]]

    times = {b: per_block(b, "step_time") for b in (bag, 1)}
    rates = {b: per_block(b, "tokens_per_s") for b in (bag, 1)}
    pairs = [t / u for t, u in zip(times[bag], times[1])]  # each phase-1 block against the baseline block after it
    out = {b: {"blocks": len(times[b]), "step_time_s": statistics.median(times[b]),
               "text_tokens_per_s": statistics.median(rates[b])} for b in (bag, 1)}
    return {
        "preset": preset, "bag": bag, "batch_size": batch, "seq_len": seq_len, "device": device,
        "phase1": out[bag], "baseline": out[1],
        "step_time_ratio": statistics.median(pairs), "step_time_ratio_per_pair": pairs,
        "text_tokens_per_s_ratio": out[bag]["text_tokens_per_s"] / out[1]["text_tokens_per_s"],
        "target_step_time_ratio": 1.03,
    }


def _train_config(data: Path, out_dir: str, preset: str, batch: int, seq_len: int, steps: int) -> dict:
    """``superpose train`` at bag 1 with its defaults (logging, TensorBoard, optimizer); no eval, no checkpoint."""
    return {"name": "step-time-plain", "out_dir": out_dir, "model": {"preset": preset}, "data": {"path": str(data)},
            "tst": {"bag": 1, "ratio": 0.0}, "optim": {"warmup_steps": 0},
            "train": {"steps": steps, "batch_size": batch, "seq_len": seq_len, "device": "cpu"},
            "eval": {"every": 0, "batches": 1}, "checkpoint": {"every": 0}}


def trainer_seconds_per_step(data: Path, preset: str, batch: int, seq_len: int, warmup: int, steps: int) -> float:
    """Mean seconds per step of ``train()`` over the steps after ``warmup``, read off the logged wall times (the
    trainer logs every ``train.log_every`` steps, so ``warmup`` and ``warmup + steps`` must be multiples of it)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(_train_config(data, tmp, preset, batch, seq_len, warmup + steps))
        every = cfg.train.log_every
        if warmup % every or steps % every:
            raise SystemExit(f"step_time: --warmup and --steps must be multiples of train.log_every ({every})")
        result = train(cfg, progress=False)
        wall = {r["step"]: r["wall_time"] for r in read_metrics(result.run_dir / "metrics.jsonl")}
    return (wall[warmup + steps] - wall[warmup]) / steps


def plain_seconds_per_step(data: Path, preset: str, batch: int, seq_len: int, warmup: int, steps: int,
                           lr: float = 2e-3, clip: float = 1.0) -> float:
    """Mean seconds per step over the steps after ``warmup`` of the loop a user would write (nanoGPT-style windows
    from a memmap, logits then ``F.cross_entropy``, ``AdamW``, clipping, the LR set every step), with the
    trainer's attention kernel (SDPA with ``is_causal``, no mask)."""
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.memmap(data / meta["splits"]["train"]["shards"][0]["file"], dtype=meta["dtype"], mode="r")
    rng = np.random.default_rng(0)
    model = build_model(model_config(preset, meta["vocab_size"]))
    use_causal_sdpa(model)  # the trainer's attention kernel, so the ratio measures the trainer's own work
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
        window = torch.from_numpy(np.stack([tokens[i:i + seq_len + 1] for i in starts]).astype(np.int64))
        logits = model(input_ids=window[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            loss.item()  # a user prints the loss now and then
    return (time.perf_counter() - t0) / steps


ARMS = {"plain": plain_seconds_per_step, "superpose": trainer_seconds_per_step}


def _in_fresh_process(arm: str, data: Path, preset: str, batch: int, seq_len: int, warmup: int, steps: int,
                      threads: int) -> float:
    """Seconds per step of one arm in a process of its own, so neither arm runs on a heap the other left behind."""
    argv = [sys.executable, __file__, "--measure", arm, "--data", str(data), "--preset", preset, "--batch-size",
            str(batch), "--seq-len", str(seq_len), "--warmup", str(warmup), "--steps", str(steps),
            "--threads", str(threads)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def against_plain(data: Path, preset: str, batch: int, seq_len: int, warmup: int, steps: int, rounds: int,
                  threads: int) -> dict:
    """The trainer at bag 1 against the plain loop, each run in a fresh process, alternating which goes first; the
    ratio is the median of the rounds' ratios (a load change hits one round, not the result)."""
    per_round = []
    for r in range(rounds):
        order = ("plain", "superpose") if r % 2 == 0 else ("superpose", "plain")
        times = {}
        for arm in order:
            times[arm] = _in_fresh_process(arm, data, preset, batch, seq_len, warmup, steps, threads)
            print(f"round {r}: {arm} {times[arm] * 1e3:.1f} ms/step", flush=True)
        per_round.append({"order": list(order), "plain_s": times["plain"], "superpose_s": times["superpose"],
                          "ratio": times["superpose"] / times["plain"]})
    plain = statistics.mean(r["plain_s"] for r in per_round)
    ours = statistics.mean(r["superpose_s"] for r in per_round)
    return {"preset": preset, "batch_size": batch, "seq_len": seq_len, "warmup_steps": warmup, "steps": steps,
            "rounds": per_round, "plain_step_s": plain, "superpose_step_s": ours,
            "ratio": statistics.median(r["ratio"] for r in per_round), "ratio_of_means": ours / plain,
            "threads": threads, "fresh_process_per_arm": True, "target_ratio": 1.02}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/embedded"))
    parser.add_argument("--bag", type=int, nargs="*", default=[4], help="phase-1 bags to time (none: skip (1))")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4, help="blocks of each kind (alternating)")
    parser.add_argument("--block", type=int, default=12, help="steps per block")
    parser.add_argument("--skip", type=int, default=2, help="steps dropped at the start of each block")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plain", action="store_true", help="also time the trainer at bag 1 against a plain loop")
    parser.add_argument("--steps", type=int, default=200, help="--plain: timed steps per arm and round")
    parser.add_argument("--warmup", type=int, default=20, help="--plain: untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="--plain: alternating rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (intra-op)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_time.json"))
    parser.add_argument("--measure", choices=list(ARMS), help=argparse.SUPPRESS)  # one --plain arm, in its process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(ARMS[args.measure](args.data, args.preset, args.batch_size, args.seq_len, args.warmup, args.steps))
        return
    results = [measure(args.data, bag, args.preset, args.batch_size, args.seq_len, args.blocks, args.block, args.skip,
                       args.device) for bag in args.bag]
    for r in results:
        print(f"bag {r['bag']}: phase-1 step {r['phase1']['step_time_s'] * 1e3:.1f} ms vs baseline "
              f"{r['baseline']['step_time_s'] * 1e3:.1f} ms (ratio {r['step_time_ratio']:.3f}, target <= 1.03); "
              f"text tokens/s ratio {r['text_tokens_per_s_ratio']:.2f} (bag {r['bag']})")
    report = {"provenance": provenance(), "results": results}
    if args.plain:
        plain = against_plain(args.data, args.preset, args.batch_size, args.seq_len, args.warmup, args.steps,
                              args.rounds, args.threads)
        print(f"superpose train at bag 1: {plain['superpose_step_s'] * 1e3:.1f} ms/step vs plain loop "
              f"{plain['plain_step_s'] * 1e3:.1f} ms/step (ratio {plain['ratio']:.3f}, target <= 1.02)")
        report["plain_loop"] = plain
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
