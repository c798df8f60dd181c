"""MFU, tokens/s and peak memory of the trainer itself on one GPU, at bag 1 (baseline) and bag s (TST phase 1).

It drives ``TrainModule`` exactly as a run does: FSDP2 on a one-rank group (bf16 compute, fp32 master weights),
gradient accumulation, activation checkpointing, per-block ``torch.compile`` and the fused loss, all as the config
sets them, on one of the paper's configs with fewer layers so it fits one GPU. Random token windows: throughput does
not depend on the text. Needs CUDA (exits 2 with a one-line message otherwise), except ``--device cpu --toy``: the
same code on a toy shape, so ``bench/gpu_check.sh --cpu`` can rehearse it; the fields only a GPU gives (MFU against a
known peak, CUDA peak memory) are then null, each with its reason under ``null_reasons``.

    python bench/gpu_throughput.py configs/llama-600m-8gpu.toml --layers 8 --bag 4 --out bench/results/gpu/t.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gpu_env import bench_device, gpu_environment
from superpose import method
from superpose.flops import flops_per_step, mfu_both, peak_bf16_flops
from superpose.losses import loss_path
from superpose.models import get_preset, parameter_counts
from superpose.provenance import provenance
from superpose.train.config import RunConfig
from superpose.train.config_load import load_config
from superpose.train.distributed import init_one_rank_group, shutdown
from superpose.train.step import TrainModule

TOY_SHAPE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "intermediate_size": 128}
TOY_EXPERTS = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
TOY = {"vocab": 4096, "seq_len": 64, "micro_batch_size": 2}
"""``--toy``: a shape small enough for the CPU rehearsal; every code path of the real shape is kept."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(module: TrainModule, bag: int, vocab: int, steps: int, warmup: int) -> dict[str, Any]:
    """Median step time (and its spread) and peak memory at one bag size; warm-up steps (compile) not counted."""
    cfg, device = module.cfg, module.device
    window = torch.randint(0, vocab, (cfg.train.batch_size, method.window_length(cfg.train.seq_len, bag)),
                           device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        module.train_step(window, bag, lr=1e-4)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    cuda = device.type == "cuda"
    return {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
            "peak_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
            "loss_path": loss_path(cfg.train.loss_chunk, cfg.train.compile)}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path, help="a paper config, e.g. configs/llama-600m-8gpu.toml")
    p.add_argument("--layers", type=int, default=0, help="transformer blocks (0: the preset's)")
    p.add_argument("--bag", type=int, default=0, help="phase-1 bag (0: the config's tst.bag)")
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches of the config's size per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps per bag before timing (the first ones compile)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: only with --toy (rehearsal)")
    p.add_argument("--toy", action="store_true", help="toy shape: d=64, vocab 4096, 2 x 64 positions per micro-batch")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu/throughput.json"))
    return p.parse_args()


def _config(args: argparse.Namespace) -> tuple[RunConfig, int]:
    """The config with the benchmark's overrides, and the vocabulary size the windows draw from."""
    base = load_config(args.config)
    preset = get_preset(base.model.preset)
    micro = TOY["micro_batch_size"] if args.toy else base.train.micro_batch_size
    shape = {**TOY_SHAPE, **(TOY_EXPERTS if preset.num_experts else {})} if args.toy else {}
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    overrides = [f"train.device='{args.device}'", "train.dtype='bf16'", "train.parallel='fsdp'",
                 f"train.micro_batch_size={micro}", f"train.batch_size={micro * args.accumulation}"]
    if args.toy:
        overrides.append(f"train.seq_len={TOY['seq_len']}")
    if shape:
        overrides.append("model.overrides={" + ", ".join(f"{k} = {v}" for k, v in shape.items()) + "}")
    return load_config(args.config, [*overrides, *args.set]), TOY["vocab"] if args.toy else preset.vocab_size


def main() -> int:
    args = _parse()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: error: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.toy:
        print("gpu_throughput: error: --device cpu is the rehearsal: add --toy", file=sys.stderr)
        return 2
    cfg, vocab = _config(args)
    bag = args.bag or cfg.tst.bag
    device = bench_device(args.device)
    environment = gpu_environment(device)  # before measuring: a missing tool must not cost the measurement
    name = environment["gpu"] or "cpu"
    init_one_rank_group(device)
    try:
        module = TrainModule(cfg, vocab, device)
        model_config, batch, seq_len = module.model.config, cfg.train.batch_size, cfg.train.seq_len
        results = {}
        for b in (1, bag):
            row = measure(module, b, vocab, args.steps, args.warmup)
            text = batch * method.window_length(seq_len, b)
            row |= {"text_tokens_per_s": text / row["step_s"], "positions_per_s": batch * seq_len / row["step_s"],
                    **mfu_both(model_config, batch, seq_len, row["step_s"], name)}
            results[f"bag{b}"] = row
            peak = row["peak_memory_reserved_gib"]
            print(f"bag {b}: {row['step_s'] * 1e3:.1f} ms/step, MFU {row['mfu'] or float('nan'):.3f} (non-causal "
                  f"count {row['mfu_noncausal'] or float('nan'):.3f}), {row['text_tokens_per_s']:.0f} text tokens/s, "
                  f"peak reserved {peak or float('nan'):.1f} GiB, loss {row['loss_path']}", flush=True)
    finally:
        shutdown()
    total, active = parameter_counts(module.model)
    peak = peak_bf16_flops(name)
    report = {
        **provenance(shlex.join(["python", *sys.argv])), **environment, "device": str(device), "toy": args.toy,
        "config": str(args.config), "model": cfg.model.describe(), "layers": model_config.num_hidden_layers,
        "parameters": total, "active_parameters": active, "batch_size": batch,
        "micro_batch_size": cfg.train.micro_batch_size, "seq_len": seq_len, "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing, "loss_chunk": cfg.train.loss_chunk,
        "loss_path": results[f"bag{bag}"]["loss_path"], "bag": bag,
        "flops_per_step": flops_per_step(model_config, batch, seq_len, causal=True),
        "flops_per_step_noncausal": flops_per_step(model_config, batch, seq_len),
        "flops_convention": "mfu: causal attention counted as the half a causal kernel computes; mfu_noncausal: "
                            "PaLM/Megatron's full L x L count (see superpose.flops)",
        "peak_bf16_flops": peak, "results": results,
        "phase1_over_baseline_step_time": results[f"bag{bag}"]["step_s"] / results["bag1"]["step_s"],
        "null_reasons": _null_reasons(device, name, peak),
        "targets": {"mfu_600m": 0.45, "phase1_over_baseline_step_time": 1.03},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"phase-1 / baseline step time: {report['phase1_over_baseline_step_time']:.3f} -> {args.out}")
    return 0


def _null_reasons(device: torch.device, name: str, peak: float | None) -> dict[str, str]:
    """Why a field that only a GPU gives is null in this report (empty on a known GPU)."""
    reasons = {}
    if peak is None:
        reasons["mfu"] = reasons["mfu_noncausal"] = f"no known dense bf16 peak for device {name!r}"
    if device.type != "cuda":
        reasons["peak_memory_allocated_gib"] = reasons["peak_memory_reserved_gib"] = "CUDA allocator only (CPU run)"
    return reasons


if __name__ == "__main__":
    sys.exit(main())
