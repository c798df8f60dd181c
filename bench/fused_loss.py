"""LM head + multi-hot loss, forward and backward: the fused loss vs the previous chunked loss vs standard CE.

At V=128k, d=960 (the 270M preset's head) and bag 1/4/16, one run measures side by side, per bag in one fresh
process (so each bag's rounds share the machine's load at the time):

- ``fused``: :func:`superpose.losses.chunked_multi_hot_cross_entropy` with ``compiled=True`` (gradients in the
  forward, the per-chunk softmax and gradient through ``torch.compile``);
- ``fused_eager``: the same with ``compiled=False`` (the fallback where compiling is impossible);
- ``previous``: the chunked loss as it was before (a copy below: the backward recomputes the head matmul and the
  softmax runs as separate passes);
- ``standard_ce``: full logits and ``F.cross_entropy`` on the first target of each bag (bag-independent).

Time: median over ``--rounds`` interleaved rounds (one call of each variant per round) of forward and of backward,
after one warm-up call each (which compiles). Memory: the growth of the process's peak resident memory over the
resident memory just before one forward+backward (``/proc/self/clear_refs`` resets ``VmHWM``; glibc's mmap
threshold is pinned low so freed tensors go back to the OS at once and RSS follows the bytes allocated). Inputs
and parameters exist before, so they are excluded; the gradients (``.grad``) are allocated during the call, so they
count. The largest of the rounds is reported. One more profiled call per variant splits its time into matmuls and
everything else (the passes a fused kernel saves). Linux only.

    python bench/fused_loss.py --out bench/results/fused_loss.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from superpose.losses import chunked_multi_hot_cross_entropy
from superpose.provenance import provenance

VARIANTS = ("fused", "fused_eager", "previous", "standard_ce")


# --- the previous implementation (superpose.losses before the fused loss), kept as the reference ---------------


def _previous_chunk_logits(hidden, weight, bias, dtype):
    logits = hidden.to(dtype) @ weight.T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits.to(torch.promote_types(dtype, torch.float32))


def _previous_exp_shifted_(z):
    shift = z.amax(-1, keepdim=True)
    z.sub_(shift).exp_()
    return shift


def _previous_logsumexp_(z):
    shift = _previous_exp_shifted_(z)
    return z.sum(-1).log_().add_(shift.squeeze(-1))


class _PreviousChunkedMultiHotCE(torch.autograd.Function):
    """Verbatim from the previous ``superpose.losses._ChunkedMultiHotCE``: forward chunked, backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, mass, chunk_size, compute_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)
            total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
            weight_c = weight.to(compute_dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                z = _previous_chunk_logits(hidden[rows], weight_c, bias, compute_dtype)
                picked = z.gather(-1, index[rows])
                lse = _previous_logsumexp_(z)
                total += ((lse.unsqueeze(-1) - picked) * mass[rows].to(acc_dtype)).sum()
                del z
        ctx.save_for_backward(hidden, weight, bias, index, mass)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        hidden, weight, bias, index, mass = ctx.saved_tensors
        dtype = ctx.compute_dtype
        acc_dtype = torch.promote_types(dtype, torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        weight_c = weight.to(dtype)
        scale = grad_total.to(acc_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows].to(dtype)
                m = mass[rows].to(acc_dtype) * scale
                dz = _previous_chunk_logits(h, weight_c, bias, dtype)
                _previous_exp_shifted_(dz)
                dz.mul_(m.sum(-1, keepdim=True) / dz.sum(-1, keepdim=True))
                dz.scatter_add_(-1, index[rows], -m)
                if grad_b is not None:
                    grad_b += dz.sum(0)
                dz = dz.to(dtype)
                if grad_h is not None:
                    grad_h[rows] = dz @ weight_c
                if grad_w is not None:
                    if acc_dtype == dtype:
                        grad_w.addmm_(dz.T, h)
                    else:
                        grad_w += dz.T @ h
                del dz
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None)


def previous_chunked_loss(hidden, weight, targets, chunk_size, ignore_index=-100):
    """The previous public function's ``reduction="mean"`` path, without weights, bias or autocast."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    targets2d = targets.reshape(-1, targets.shape[-1])
    valid = targets2d != ignore_index
    mass = valid.float()
    index = torch.where(valid, targets2d, 0)
    total = _PreviousChunkedMultiHotCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, None, index, mass,
                                             chunk_size, dtype)
    return total / mass.sum()


# --- measurement ----------------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _loss_fn(variant: str, chunk_size: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if variant == "standard_ce":
        return lambda h, w, t: F.cross_entropy((h @ w.T).reshape(-1, w.shape[0]), t[..., 0].reshape(-1))
    if variant == "previous":
        return lambda h, w, t: previous_chunked_loss(h, w, t, chunk_size)
    compiled = variant == "fused"
    return lambda h, w, t: chunked_multi_hot_cross_entropy(h, w, t, chunk_size=chunk_size, compiled=compiled)


def _one_call(fn, hidden, weight, targets) -> dict[str, float]:
    """One forward+backward from ``.grad = None``: forward and backward seconds and peak bytes above the start."""
    hidden.grad = weight.grad = None
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    loss = fn(hidden, weight, targets)
    mid = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    return {"forward_s": mid - start, "backward_s": end - mid, "peak_bytes": _status_bytes("VmHWM") - before}


MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"}


def _matmul_split(fn, hidden, weight, targets) -> dict[str, float]:
    """One profiled forward+backward: seconds in matmuls and in everything else (what fusing the softmax cuts)."""
    hidden.grad = weight.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(hidden, weight, targets).backward()
    events = prof.key_averages()
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    return {"profiled_matmul_s": round(matmul, 3), "profiled_other_s": round(total - matmul, 3)}


def worker(bag: int, positions: int, dim: int, vocab: int, chunk_size: int, rounds: int, threads: int) -> dict:
    """All variants at one bag size: warm-up, exactness of the fused loss against the previous one, then rounds."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden = torch.randn(1, positions, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) / dim**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (1, positions, bag))
    fns = {v: _loss_fn(v, chunk_size) for v in VARIANTS}

    results: dict[str, Any] = {}
    for variant in ("previous", "fused", "fused_eager"):  # warm-up (compiles) and the values to compare
        hidden.grad = weight.grad = None
        loss = fns[variant](hidden, weight, targets)
        loss.backward()
        results[variant] = (loss.detach(), hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    _one_call(fns["standard_ce"], hidden, weight, targets)
    exactness = {
        variant: {name: float((got - want).abs().max())
                  for name, got, want in zip(("loss", "grad_hidden", "grad_weight"), results[variant],
                                             results["previous"])}
        for variant in ("fused", "fused_eager")
    }
    del results

    calls: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            calls[variant].append(_one_call(fns[variant], hidden, weight, targets))
    summary = {}
    split = {v: _matmul_split(fns[v], hidden, weight, targets) for v in VARIANTS}
    for variant, runs in calls.items():
        fwd = statistics.median(r["forward_s"] for r in runs)
        bwd = statistics.median(r["backward_s"] for r in runs)
        total = statistics.median(r["forward_s"] + r["backward_s"] for r in runs)
        summary[variant] = {"forward_s": round(fwd, 3), "backward_s": round(bwd, 3), "total_s": round(total, 3),
                            "peak_bytes": max(r["peak_bytes"] for r in runs), **split[variant]}
    return {"bag": bag, "variants": summary, "max_abs_diff_vs_previous": exactness}


def measure(bag: int, args: argparse.Namespace) -> dict:
    """Run :func:`worker` for one bag in a fresh interpreter (no earlier bag's memory or compiled code)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--worker", "--bag", str(bag), "--positions", str(args.positions), "--dim",
           str(args.dim), "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size), "--rounds",
           str(args.rounds), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ratios(v: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each variant's time and peak memory over the others', measured side by side in the same process."""
    pairs = (("fused", "previous"), ("fused_eager", "previous"), ("fused", "standard_ce"),
             ("fused_eager", "standard_ce"), ("previous", "standard_ce"))
    return {f"{a}_over_{b}_{key}": round(v[a][key] / v[b][key], 3) for a, b in pairs for key in ("total_s", "peak_bytes")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--positions", type=int, default=256, help="B*L rows through the head")
    parser.add_argument("--dim", type=int, default=960)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (a shared machine)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bag", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.bag, args.positions, args.dim, args.vocab, args.chunk_size, args.rounds,
                                args.threads)))
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    rows = []
    for bag in args.bags:
        row = measure(bag, args)
        row["ratios"] = _ratios(row["variants"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": shlex.join(["python", "bench/fused_loss.py", *sys.argv[1:]]),
        "provenance": {
            **provenance(),
            "torch_threads_per_process": args.threads,
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()),
        },
        "shape": {"positions": args.positions, "dim": args.dim, "vocab": args.vocab, "chunk_size": args.chunk_size,
                  "dtype": "float32", "rounds": args.rounds},
        "measure": {
            "time": "median over interleaved rounds of one forward and one backward (after a warm-up call each)",
            "profiled_matmul_s / profiled_other_s": "one more forward+backward under torch.profiler: self CPU "
                                                    "seconds in aten mm/addmm, and in all other ops (softmax passes, "
                                                    "fills, copies, compiled kernels)",
            "peak_bytes": "max over rounds of VmHWM growth over VmRSS just before one forward+backward, in a fresh "
                          "process per bag; inputs and parameters excluded, gradients included",
            "max_abs_diff_vs_previous": "largest absolute difference of loss, grad_hidden and grad_weight from the "
                                        "previous implementation on the same inputs",
        },
        "fp32_logits_bytes": args.positions * args.vocab * 4,
        "head_grad_bytes": args.vocab * args.dim * 4,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
