"""One command, one GPU, about 8 minutes: the largest matched-FLOPs compare that fits, on the embedded corpus.

    pip install -e . && python bench/gpu_compare.py            # CUDA build of torch already installed
    bash bench/gpu_check.sh                                    # runs it last, in the time the other checks leave

It prepares the embedded corpus (the Python standard library, offline) if missing, times a few baseline steps of
the model, picks the longest run whose comparison (a baseline trunk to 1.6 T, decays of 0.1/0.2/0.4 T, one TST run
of T: 3.3 T steps) fits the time left, runs ``superpose compare`` and writes the report to ``--out``. The model is
a ~30M-parameter Llama (d=512, 8 layers) at batch 32 x 512 positions, bf16 autocast; TST s=4, r=0.3.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_throughput import gpu_environment
from superpose.provenance import provenance
from superpose.data.prepare import prepare
from superpose.errors import SuperposeError
from superpose.train.config_load import load_config
from superpose.train.loop import train
from superpose.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["model.preset='small'", "model.overrides={hidden_size = 512, num_hidden_layers = 8, num_attention_heads = 8, "
         "num_key_value_heads = 4, intermediate_size = 1536}"]
SHAPE = ["train.batch_size=32", "train.seq_len=512", "train.device='cuda'", "optim.lr=1e-3"]
COST = 3.3
"""Steps of a compare with --family 0.5,1,2 in units of T: trunk 1.6 T + decays 0.7 T + the TST run T."""


def seconds_per_step(data: Path) -> float:
    """Median step time of the model at the compare's shapes (a 40-step throwaway run)."""
    overrides = [*MODEL, *SHAPE, f"data.path='{data}'", "train.steps=40", "train.log_every=1", "eval.every=0",
                 "eval.batches=1", "checkpoint.every=0", "tst.bag=1", "tst.ratio=0.0"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "tiny-tst.toml", [*overrides, f"out_dir='{tmp}'"])
        result = train(cfg, progress=False)
        rows = read_metrics(result.run_dir / "metrics.jsonl")[10:]
    return sorted(b["wall_time"] - a["wall_time"] for a, b in zip(rows, rows[1:]))[len(rows) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "embedded-gpu")
    parser.add_argument("--max-bytes", type=int, default=100_000_000, help="corpus size (~28M tokens at 100 MB)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    args = parser.parse_args()
    start = time.perf_counter()
    if not (args.data / "meta.json").is_file():
        prepare(["embedded"], args.data, vocab_size=8192, max_bytes=args.max_bytes, val_fraction=0.01, progress=False)
    try:
        step_s = seconds_per_step(args.data) * 1.1  # evals and checkpoints
    except SuperposeError as e:
        sys.exit(f"gpu_compare: {e}")
    left = args.budget - (time.perf_counter() - start) - 30
    steps = max(100, int(left / (COST * step_s)) // 50 * 50)
    print(f"{step_s * 1e3:.1f} ms/step, {left:.0f} s left -> T = {steps} steps", flush=True)
    command = [sys.executable, "-m", "superpose", "compare", str(ROOT / "configs" / "tiny-tst.toml"), *MODEL, *SHAPE,
               f"data.path='{args.data}'", f"train.steps={steps}", f"optim.warmup_steps={max(20, steps // 20)}",
               f"eval.every={max(10, steps // 20)}", "eval.batches=8", "train.log_every=1", "checkpoint.every=0",
               "--family", "0.5,1,2", "--out", str(args.out), "--quiet"]
    print(shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    (args.out / "gpu_command.json").write_text(json.dumps({
        "command": shlex.join(command), "ms_per_step": step_s * 1e3, "total_s": time.perf_counter() - start,
        **provenance(), **gpu_environment()}, indent=2))


if __name__ == "__main__":
    main()
