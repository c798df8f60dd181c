"""One command, one GPU, about 8 minutes: the largest matched-FLOPs compare that fits, on the embedded corpus.

    pip install -e . && python bench/gpu_compare.py            # CUDA build of torch already installed
    bash bench/gpu_check.sh                                    # runs it last, in the time the other checks leave

It prepares the embedded corpus (the Python standard library, offline) if missing, times a few baseline steps of
the model, picks the longest run whose comparison (a baseline trunk to 1.6 T, decays of 0.1/0.2/0.4 T, one TST run
of T: 3.3 T steps) fits the time left, runs ``superpose compare`` and writes the report to ``--out``. The model is
a ~30M-parameter Llama (d=512, 8 layers) at batch 32 x 512 positions, bf16 autocast; TST s=4, r=0.3.
``--device cpu --toy`` is the rehearsal ``bench/gpu_check.sh --cpu`` runs: the same steps on a toy model (d=64, 2
layers, batch 4 x 64) and a 1 MB corpus, T capped by ``--max-steps``.
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

from gpu_env import bench_device, gpu_environment
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
TOY_MODEL = ["model.preset='small'", "model.overrides={hidden_size = 64, num_hidden_layers = 2, "
             "num_attention_heads = 4, num_key_value_heads = 2, intermediate_size = 128}"]
TOY_SHAPE = ["train.batch_size=4", "train.seq_len=64", "train.device='cpu'", "optim.lr=1e-3"]
COST = 3.3
"""Steps of a compare with --family 0.5,1,2 in units of T: trunk 1.6 T + decays 0.7 T + the TST run T."""


def seconds_per_step(data: Path, shape: list[str]) -> float:
    """Median step time of the model at the compare's shapes (a 40-step throwaway run)."""
    overrides = [*shape, f"data.path='{data}'", "train.steps=40", "optim.warmup_steps=4", "train.log_every=1",
                 "eval.every=0", "eval.batches=1", "checkpoint.every=0", "tst.bag=1", "tst.ratio=0.0"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "tiny-tst.toml", [*overrides, f"out_dir='{tmp}'"])
        result = train(cfg, progress=False)
        rows = read_metrics(result.run_dir / "metrics.jsonl")[10:]
    return sorted(b["wall_time"] - a["wall_time"] for a, b in zip(rows, rows[1:]))[len(rows) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    parser.add_argument("--data", type=Path, default=None, help="default data/embedded-gpu (data/embedded-toy)")
    parser.add_argument("--max-bytes", type=int, default=100_000_000, help="corpus size (~28M tokens at 100 MB)")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on T (0: none)")
    parser.add_argument("--toy", action="store_true", help="toy model and corpus on the CPU (the rehearsal)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    args = parser.parse_args()
    start = time.perf_counter()
    shape = [*TOY_MODEL, *TOY_SHAPE] if args.toy else [*MODEL, *SHAPE]
    data = args.data or ROOT / "data" / ("embedded-toy" if args.toy else "embedded-gpu")
    if not (data / "meta.json").is_file():
        prepare(["embedded"], data, vocab_size=512 if args.toy else 8192,
                max_bytes=1_000_000 if args.toy else args.max_bytes, val_fraction=0.01, progress=False)
    try:
        step_s = seconds_per_step(data, shape) * 1.1  # evals and checkpoints
    except SuperposeError as e:
        sys.exit(f"gpu_compare: {e}")
    left = args.budget - (time.perf_counter() - start) - 30
    # the shortest T, T's rounding, the fewest steps between evals and the eval batches
    least, unit, every, evals = (20, 10, 5, 2) if args.toy else (100, 50, 10, 8)
    steps = max(least, int(left / (COST * step_s)) // unit * unit)
    steps = min(steps, args.max_steps or steps)
    print(f"{step_s * 1e3:.1f} ms/step, {left:.0f} s left -> T = {steps} steps", flush=True)
    command = [sys.executable, "-m", "superpose", "compare", str(ROOT / "configs" / "tiny-tst.toml"), *shape,
               f"data.path='{data}'", f"train.steps={steps}", f"optim.warmup_steps={max(least // 5, steps // 20)}",
               f"eval.every={max(every, steps // 20)}", f"eval.batches={evals}", "train.log_every=1",
               "checkpoint.every=0", "--family", "0.5,1,2", "--out", str(args.out), "--quiet"]
    print(shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    (args.out / "gpu_command.json").write_text(json.dumps({
        **provenance(), "compare_command": shlex.join(command), "steps": steps, "ms_per_step": step_s * 1e3,
        "total_s": time.perf_counter() - start, **gpu_environment(bench_device("cpu" if args.toy else "cuda")),
    }, indent=2))


if __name__ == "__main__":
    main()
