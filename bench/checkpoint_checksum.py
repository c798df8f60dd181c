"""What checkpoints cost: save and load of a real checkpoint with the SHA-256 pass timed on its own, and the training
time one checkpoint takes away, written in place (checkpoint.async = false) or in the background (the default),
side by side in one run.

    nice -n 10 python bench/checkpoint_checksum.py --out bench/results/checkpoint_checksum.json

The second part trains the model as FSDP2 over a one-rank gloo group (how DCP is reached without torchrun), one
thread for the steps: a round runs ``--steps`` steps three ways in a rotating order, without a checkpoint, with one
written in place after step 1, and with one written in the background after step 1 (the round waits for it at the
end, as a run does). The time lost per checkpoint is the round's time minus that round's time without one; the
time the step loop spent inside the checkpoint call (and, in the background, waiting for it at the end) is the part
of it training waited for. On a GPU the steps run on the device while the CPU writes; here the writer's threads and
the steps share this machine's cores, so the background figure is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from superpose.models import build_model
from superpose.provenance import provenance
from superpose.train.checkpoint import BackgroundCheckpoints, load_checkpoint, save_checkpoint, verify_checkpoint
from superpose.train.distributed import DistInfo, shutdown

MODES = ("none", "in place", "background")


def small_model(hidden: int, layers: int) -> torch.nn.Module:
    """The 129M shape (SmolLM-like, 12 layers of 768) at the bench's vocabulary."""
    return build_model("small", 32768, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=12,
                       num_key_value_heads=4, intermediate_size=4 * hidden)


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def save_and_verify(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One process, plain layout: the save with its hashing, verification alone, a verified load of the weights."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = save_checkpoint(Path(tmp), model, optimizer, {"step": 1, "skipped": 0}, {}, keep=1)
        save_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        verify_checkpoint(path)
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_checkpoint(path, model, None)
        load_s = time.perf_counter() - t0  # weights only, verification included
    return {"checkpoint_bytes": size, "save_s_with_hashing": round(save_s, 3), "verify_s": round(verify_s, 3),
            "hash_mb_per_s": round(size / verify_s / 1e6, 1), "load_weights_s_with_verify": round(load_s, 3),
            "verify_share_of_save": round(verify_s / save_s, 3)}


def timed_round(mode: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
                steps: int, folder: Path, background: BackgroundCheckpoints) -> dict[str, float]:
    """``steps`` training steps, a checkpoint after the first (``mode``), then the wait for it that ends a run."""
    blocked = 0.0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        one_step(model, optimizer, tokens)
        if step == 1 and mode != "none":
            t0 = time.perf_counter()
            save_checkpoint(folder, model, optimizer, {"step": step, "skipped": 0}, {}, keep=1,
                            background=background if mode == "background" else None)
            blocked += time.perf_counter() - t0
    t0 = time.perf_counter()
    background.wait()
    blocked += time.perf_counter() - t0
    return {"wall_s": time.perf_counter() - start, "blocked_s": blocked}


def time_lost(args: argparse.Namespace) -> dict:
    """Alternating rounds of none / in place / background; each checkpoint's cost against its own round's none.
    One background writer serves every round, as one serves a run (its CPU buffers are reused after the first)."""
    torch.manual_seed(0)
    model = small_model(args.hidden, args.layers)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = torch.randint(0, 32768, (1, args.tokens))
    one_step(model, optimizer, tokens)  # warm-up; the moments exist, as in any checkpoint after the first step
    rounds = []
    with tempfile.TemporaryDirectory() as tmp, BackgroundCheckpoints(DistInfo(), pinned=False) as background:
        for r in range(args.rounds):
            order = MODES[r % 3:] + MODES[:r % 3]
            runs = {}
            for mode in order:
                runs[mode] = timed_round(mode, model, optimizer, tokens, args.steps, Path(tmp) / "run", background)
                shutil.rmtree(Path(tmp) / "run", ignore_errors=True)
            rounds.append({"order": list(order)} | {m: {k: round(v, 3) for k, v in runs[m].items()} for m in MODES})
    lost = {m: [x[m]["wall_s"] - x["none"]["wall_s"] for x in rounds] for m in MODES[1:]}
    waited = {m: [x[m]["blocked_s"] for x in rounds] for m in MODES[1:]}
    step_s = statistics.median(x["none"]["wall_s"] for x in rounds) / args.steps
    return {"steps_per_round": args.steps, "tokens_per_step": args.tokens, "step_s": round(step_s, 3),
            "rounds": rounds,
            "lost_per_checkpoint_s": {m: round(statistics.median(v), 3) for m, v in lost.items()},
            "training_waited_s": {m: round(statistics.median(v), 3) for m, v in waited.items()},
            "lost_in_steps": {m: round(statistics.median(v) / step_s, 2) for m, v in lost.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8, help="training steps per round")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per training step (one sequence)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three modes, in rotating order")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = small_model(args.hidden, args.layers)
    optimizer = torch.optim.AdamW(model.parameters())
    one_step(model, optimizer, torch.zeros(1, 8, dtype=torch.long))  # moments exist, as after any first step
    result = {"provenance": provenance(), "parameters": sum(p.numel() for p in model.parameters()),
              **save_and_verify(model, optimizer)}
    del model, optimizer
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        result["time_lost_per_checkpoint"] = time_lost(args)
    finally:
        shutdown()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
