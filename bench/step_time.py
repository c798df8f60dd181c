"""Step time of a TST phase-1 step against a baseline step: same run, same model, batch and positions.

One training run alternates blocks of phase-1 steps (bag s) and baseline steps (bag 1) through a multi-stage
schedule; the ratio is the median over pairs of neighbouring blocks of their median step times, so load changes on a
shared machine cancel. The first pair (warm-up) and the first steps of each block (the window length changes there)
are dropped. Target: phase-1 / baseline step time <= 1.03, and text tokens per second ~ s x.

    python bench/step_time.py --data data/embedded --bag 4 --out bench/results/step_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from superpose.provenance import provenance
from superpose.train.config import config_from_dict
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
        rows = read_metrics(result.run_dir / "metrics.jsonl")
    for prev, r in zip([{"text_tokens": 0}, *rows], rows):
        r["dt"] = (r["text_tokens"] - prev["text_tokens"]) / r["tokens_per_s"]

    def per_block(b: int, key: str) -> list[float]:
        """Median of ``key`` in each block at bag ``b``, its first ``skip`` steps dropped; the first block dropped."""
        kept = [[r[key] for r in rows if (r["step"] - 1) // block == i and (r["step"] - 1) % block >= skip]
                for i in range(2 * blocks_n) if (i % 2 == 0) == (b == bag)]
        return [statistics.median(x) for x in kept[1:]]

    times = {b: per_block(b, "dt") for b in (bag, 1)}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/embedded"))
    parser.add_argument("--bag", type=int, nargs="+", default=[4])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4, help="blocks of each kind (alternating)")
    parser.add_argument("--block", type=int, default=12, help="steps per block")
    parser.add_argument("--skip", type=int, default=2, help="steps dropped at the start of each block")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_time.json"))
    args = parser.parse_args()
    results = [measure(args.data, bag, args.preset, args.batch_size, args.seq_len, args.blocks, args.block, args.skip,
                       args.device) for bag in args.bag]
    for r in results:
        print(f"bag {r['bag']}: phase-1 step {r['phase1']['step_time_s'] * 1e3:.1f} ms vs baseline "
              f"{r['baseline']['step_time_s'] * 1e3:.1f} ms (ratio {r['step_time_ratio']:.3f}, target <= 1.03); "
              f"text tokens/s ratio {r['text_tokens_per_s_ratio']:.2f} (bag {r['bag']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"provenance": provenance(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
