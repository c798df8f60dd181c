"""Peak memory of one loss forward+backward: standard CE vs full-logits multi-hot CE vs the chunked fused loss.

Each variant runs in a fresh subprocess, which measures its peak resident memory above a baseline taken after the
inputs exist (``/proc/self/clear_refs`` resets ``VmHWM``; glibc's mmap threshold is pinned low so freed tensors go
straight back to the OS and RSS tracks allocated bytes). On CPU this stands in for peak allocated bytes; the
head matmul is part of every variant, so the logits-sized tensors are the dominant term. Linux only.

    python bench/memory_mce.py --out bench/results/memory_mce.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("standard_ce", "multi_hot_full", "chunked")


def _status_bytes(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _provenance() -> dict:
    from superpose.provenance import provenance  # here, not at the top: a worker measures memory before torch loads

    return provenance()


def worker(variant: str, bag: int, batch: int, length: int, dim: int, vocab: int, chunk_size: int) -> dict:
    """Run one forward+backward of ``variant`` and return its peak bytes above the post-setup baseline."""
    import torch
    import torch.nn.functional as F

    from superpose.losses import chunked_multi_hot_cross_entropy
    from superpose.method import multi_hot_cross_entropy

    def loss_fn(hidden, weight, targets):
        if variant == "standard_ce":
            return F.cross_entropy((hidden @ weight.T).reshape(-1, weight.shape[0]), targets[..., 0].reshape(-1))
        if variant == "multi_hot_full":
            return multi_hot_cross_entropy(hidden @ weight.T, targets)
        return chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)

    torch.manual_seed(0)
    # Warm up kernels and thread pools on a tiny case, so one-off library buffers stay out of the measurement.
    tiny = (torch.randn(1, 8, dim, requires_grad=True), torch.randn(vocab, dim, requires_grad=True))
    loss_fn(*tiny, torch.randint(0, vocab, (1, 8, bag))).backward()
    hidden = torch.randn(batch, length, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) / dim**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length, bag))
    del tiny
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    loss_fn(hidden, weight, targets).backward()
    seconds = time.perf_counter() - start
    return {"peak_bytes": _status_bytes("VmHWM") - baseline, "seconds": round(seconds, 2)}


def measure(variant: str, bag: int, args: argparse.Namespace) -> dict:
    """Run :func:`worker` in a fresh interpreter so no earlier variant's freed memory or peak leaks into this one."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--worker", variant, "--bag", str(bag), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--dim", str(args.dim), "--vocab", str(args.vocab),
           "--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--bag", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.bag, args.batch_size, args.seq_len, args.dim, args.vocab,
                                args.chunk_size)))
        return

    standard = measure("standard_ce", 1, args)  # bag-independent: it scores only the first target
    rows = []
    for bag in args.bags:
        full, chunked = measure("multi_hot_full", bag, args), measure("chunked", bag, args)
        rows.append({
            "bag": bag,
            "standard_ce_peak_bytes": standard["peak_bytes"],
            "multi_hot_full_peak_bytes": full["peak_bytes"],
            "chunked_peak_bytes": chunked["peak_bytes"],
            "multi_hot_full_over_standard": round(full["peak_bytes"] / standard["peak_bytes"], 3),
            "chunked_over_standard": round(chunked["peak_bytes"] / standard["peak_bytes"], 3),
            "seconds": {"standard_ce": standard["seconds"], "multi_hot_full": full["seconds"],
                        "chunked": chunked["seconds"]},
        })
        print(json.dumps(rows[-1]), flush=True)
    positions = args.batch_size * args.seq_len
    result = {
        "command": shlex.join(["python", "bench/memory_mce.py", *sys.argv[1:]]),
        "provenance": _provenance(),
        "measure": "peak RSS above the post-setup baseline of a fresh process (VmHWM - VmRSS), one forward+backward",
        "shape": {"positions": positions, "batch_size": args.batch_size, "seq_len": args.seq_len, "dim": args.dim,
                  "vocab": args.vocab, "chunk_size": args.chunk_size},
        "fp32_logits_bytes": positions * args.vocab * 4,
        "rows": rows,
        "target_chunked_over_standard_at_bag16": 1.05,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
