"""MFU, tokens/s and peak memory of the trainer itself on one GPU, at bag 1 (baseline) and bag s (TST phase 1).

It drives ``TrainModule`` exactly as a run does: FSDP2 on a one-rank group (bf16 compute, fp32 master weights),
gradient accumulation, activation checkpointing, per-block ``torch.compile`` and the fused loss, all as the config
sets them, on one of the paper's configs with fewer layers so it fits one GPU. Random token windows: throughput does
not depend on the text. Needs CUDA (exits 2 with a one-line message otherwise).

    python bench/gpu_throughput.py configs/llama-600m-8gpu.toml --bag 4 --out bench/results/gpu/throughput-600m.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from superpose import method
from superpose.provenance import provenance
from superpose.flops import flops_per_step, mfu, peak_bf16_flops
from superpose.models import get_preset, parameter_counts
from superpose.train.config_load import load_config
from superpose.train.distributed import init_one_rank_group, shutdown
from superpose.train.step import TrainModule


def gpu_environment() -> dict[str, str | None]:
    """The GPU, its driver and the CUDA runtime torch was built with, for every result file."""
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False)
    return {"gpu": torch.cuda.get_device_name(), "driver": smi.stdout.strip().splitlines()[0] if smi.stdout else None,
            "cuda": torch.version.cuda}


def measure(module: TrainModule, bag: int, vocab: int, steps: int, warmup: int) -> dict[str, float]:
    """Median step time (and its spread) and peak memory at one bag size; warm-up steps (compile) not counted."""
    cfg = module.cfg
    window = torch.randint(0, vocab, (cfg.train.batch_size, method.window_length(cfg.train.seq_len, bag)),
                           device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        module.train_step(window, bag, lr=1e-4)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path, help="a paper config, e.g. configs/llama-600m-8gpu.toml")
    p.add_argument("--layers", type=int, default=0, help="transformer blocks (0: the preset's)")
    p.add_argument("--bag", type=int, default=0, help="phase-1 bag (0: the config's tst.bag)")
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches of the config's size per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps per bag before timing (the first ones compile)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu/throughput.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_throughput: error: no CUDA device", file=sys.stderr)
        return 2
    base = load_config(args.config)
    micro = base.train.micro_batch_size
    overrides = ["train.device='cuda'", "train.dtype='bf16'", "train.parallel='fsdp'",
                 f"train.batch_size={micro * args.accumulation}", *args.set]
    if args.layers:
        overrides.append(f"model.overrides={{num_hidden_layers = {args.layers}}}")
    cfg = load_config(args.config, overrides)
    bag = args.bag or cfg.tst.bag
    vocab = get_preset(cfg.model.preset).vocab_size
    device = torch.device("cuda")
    init_one_rank_group(device)
    try:
        module = TrainModule(cfg, vocab, device)
        step_flops = flops_per_step(module.model.config, cfg.train.batch_size, cfg.train.seq_len)
        results = {}
        for b in (1, bag):
            row = measure(module, b, vocab, args.steps, args.warmup)
            text = cfg.train.batch_size * method.window_length(cfg.train.seq_len, b)
            row |= {"text_tokens_per_s": text / row["step_s"],
                    "positions_per_s": cfg.train.batch_size * cfg.train.seq_len / row["step_s"],
                    "mfu": mfu(step_flops, row["step_s"], torch.cuda.get_device_name())}
            results[f"bag{b}"] = row
            print(f"bag {b}: {row['step_s'] * 1e3:.1f} ms/step, MFU {row['mfu'] or float('nan'):.3f}, "
                  f"{row['text_tokens_per_s']:.0f} text tokens/s, peak {row['peak_memory_gib']:.1f} GiB", flush=True)
    finally:
        shutdown()
    total, active = parameter_counts(module.model)
    report = {
        "command": shlex.join(["python", *sys.argv]), **provenance(), **gpu_environment(),
        "config": str(args.config), "model": cfg.model.describe(), "layers": module.model.config.num_hidden_layers,
        "parameters": total, "active_parameters": active, "batch_size": cfg.train.batch_size,
        "micro_batch_size": micro, "seq_len": cfg.train.seq_len, "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing, "loss_chunk": cfg.train.loss_chunk,
        "bag": bag, "flops_per_step": step_flops, "peak_bf16_flops": peak_bf16_flops(torch.cuda.get_device_name()),
        "results": results,
        "phase1_over_baseline_step_time": results[f"bag{bag}"]["step_s"] / results["bag1"]["step_s"],
        "targets": {"mfu_600m": 0.45, "phase1_over_baseline_step_time": 1.03},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"phase-1 / baseline step time: {report['phase1_over_baseline_step_time']:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
