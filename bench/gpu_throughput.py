"""Tokens/s and MFU of a baseline step vs a TST phase-1 step on one GPU (bf16 autocast, compile on and off).

One command, JSON out; needs CUDA (exits 2 with a one-line message otherwise). Random token windows are enough:
throughput does not depend on the text. Run it on the machine you will train on:

    python bench/gpu_throughput.py --preset llama-270m --bag 6 --out bench/results/gpu_throughput.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from superpose import method
from superpose.flops import flops_per_step
from superpose.models import build_model, parameter_counts
from superpose.train.config import config_from_dict
from superpose.train.step import TrainModule

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by device-name fragment.
PEAKS = {"H200": 989e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def measure(module: TrainModule, batch: int, seq_len: int, bag: int, vocab: int, steps: int, warmup: int) -> float:
    """Median seconds per optimizer step at this bag size (windows of (L+1)*bag random tokens)."""
    window = torch.randint(0, vocab, (batch, method.window_length(seq_len, bag)))
    sync = torch.cuda.synchronize if module.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        module.train_step(window, bag, lr=1e-4)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-270m")
    p.add_argument("--bag", type=int, default=6)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--compile", choices=["both", "on", "off"], default="both")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    p.add_argument("--out", default="bench/results/gpu_throughput.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: error: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    results = []
    for compile_ in {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]:
        cfg = config_from_dict({"model": {"preset": args.preset},
                                "tst": {"bag": args.bag},
                                "train": {"batch_size": args.batch, "seq_len": args.seq_len, "device": args.device,
                                          "dtype": "bf16", "compile": compile_, "loss_chunk": args.loss_chunk}})
        model = build_model(args.preset, seed=0, device=device)
        module = TrainModule(model, cfg, device)
        step_flops = flops_per_step(model.config, args.batch, args.seq_len)
        row = {"compile": compile_}
        for bag in (1, args.bag):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sec = measure(module, args.batch, args.seq_len, bag, model.config.vocab_size, args.steps, args.warmup)
            text = args.batch * method.window_length(args.seq_len, bag)
            peak = peak_flops(name)
            row[f"bag{bag}"] = {"step_s": sec, "text_tokens_per_s": text / sec,
                                "positions_per_s": args.batch * args.seq_len / sec,
                                "mfu": step_flops / sec / peak if peak else None,
                                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        row["step_time_ratio"] = row[f"bag{args.bag}"]["step_s"] / row["bag1"]["step_s"]
        row["text_tokens_per_s_ratio"] = row[f"bag{args.bag}"]["text_tokens_per_s"] / row["bag1"]["text_tokens_per_s"]
        results.append(row)
        del module, model
        if cuda:
            torch.cuda.empty_cache()
    report = {"command": " ".join(["python", *sys.argv]), "device": name, "preset": args.preset,
              "parameters": parameter_counts(build_model(args.preset, device="meta"))[0],
              "batch": args.batch, "seq_len": args.seq_len, "bag": args.bag, "flops_per_step": step_flops,
              "peak_flops_assumed": peak_flops(name), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
