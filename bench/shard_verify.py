"""What verifying a dataset's shards costs at start-up: the SHA-256 rate measured here, a verify pass and a restart
on a small dataset, and the cost formula applied to the paper's recipes (configs/paper/).

    python bench/shard_verify.py --out bench/results/shard_verify.json

Before (every rank hashes every shard): each of W ranks reads all D bytes, D / R seconds per rank, W * D bytes from
the filesystem. Now: each rank hashes at most D / W + S bytes (S the largest shard), (D / W + S) / R seconds; D bytes
from the filesystem; a restart hashes nothing unchanged (one stat per shard and one small cache file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from superpose import method
from superpose.data.shards import VERIFIED_FILE, ShardWriter, Share, TokenDataset, assign_shares
from superpose.files import file_sha256
from superpose.provenance import provenance

GB = 1e9
SHARD_TOKENS = 2**27
"""prepare's default shard size: 512 MiB of uint32 tokens."""
TOKEN_BYTES = 4
"""The recipes' tokenizers (Llama-3, SmolLM3, Qwen3) have more than 65,536 ids: uint32 shards."""


def hash_rate(folder: Path, mib: int, repeats: int) -> dict[str, float]:
    """Bytes per second of file_sha256 on one thread, best of ``repeats``, by the wall clock and by the thread's CPU
    time (what one unshared core does; on a busy machine the wall clock also counts other jobs' turns). The file is
    in the page cache: the CPU bound, which a shared filesystem read by every rank at once can only lower."""
    file = folder / "blob"
    file.write_bytes(np.random.default_rng(0).bytes(mib << 20))
    file_sha256(file)
    wall = cpu = math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        file_sha256(file)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.thread_time() - c0)
    file.unlink()
    return {"wall": (mib << 20) / wall, "cpu": (mib << 20) / cpu}


def verify_pass(folder: Path, mib: int, shards: int) -> dict[str, float]:
    """A dataset of ``shards`` uint16 shards, ``mib`` MiB in all, verified cold (no cache) and again (a restart)."""
    tokens = (mib << 20) // 2
    with ShardWriter(folder, "train", np.dtype("<u2"), tokens // shards) as writer:
        writer.add(np.random.default_rng(1).integers(0, 2**16, tokens, dtype=np.uint16), 1)
        split = writer.close()
    meta = {"dtype": "uint16", "vocab_size": 2**16, "eos_id": 0, "splits": {"train": split}}
    dataset = TokenDataset(folder, meta, None)  # type: ignore[arg-type]  # verify reads no tokenizer
    times = {}
    for name in ("cold", "restart"):
        t0 = time.perf_counter()
        dataset.verify(Share())
        times[f"{name}_s"] = time.perf_counter() - t0
    assert (folder / VERIFIED_FILE).is_file()
    return {"bytes": mib << 20, "shards": len(split["shards"]), "threads": min(8, os.cpu_count() or 1), **times}


def recipe(path: Path, ranks: int) -> dict[str, float]:
    """The corpus one pass of a recipe's longest run reads (the TST arm, or the longest baseline of its family),
    as uint32 shards of prepare's default size."""
    cfg = tomllib.loads(path.read_text())
    train, tst = cfg["train"], cfg["tst"]
    steps, batch, seq = train["steps"], train["batch_size"], train["seq_len"]
    tst_steps = round(tst["ratio"] * steps)
    arm = batch * (tst_steps * method.window_length(seq, tst["bag"]) + (steps - tst_steps) * (seq + 1))
    family = cfg.get("compare", {}).get("family", [1.0])
    longest = round(max(family) * steps) * batch * (seq + 1)
    tokens = max(arm, longest)
    sizes = [SHARD_TOKENS * TOKEN_BYTES] * (tokens // SHARD_TOKENS) + [tokens % SHARD_TOKENS * TOKEN_BYTES]
    loads = [0] * ranks
    for size, rank in zip(sizes, assign_shares(sizes, ranks)):
        loads[rank] += size
    return {"ranks": ranks, "corpus_bytes": tokens * TOKEN_BYTES, "shards": len(sizes), "before_rank_bytes":
            tokens * TOKEN_BYTES, "after_rank_bytes": max(loads), "before_fs_bytes": ranks * tokens * TOKEN_BYTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="size of the hashed file and of the small dataset")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = hash_rate(Path(tmp), args.mib, args.repeats)
        small = verify_pass(Path(tmp), args.mib, args.shards)
    rate = rates["cpu"]
    recipes = {}
    for path in sorted(Path("configs/paper").glob("*.toml")):
        nodes = tomllib.loads(path.read_text()).get("compare", {}).get("nodes", 1)
        for ranks in sorted({8, 8 * nodes}):
            r = recipe(path, ranks)
            r.update(before_min=r["before_rank_bytes"] / rate / 60, after_min=r["after_rank_bytes"] / rate / 60)
            recipes[f"{path.stem} @ {ranks} ranks"] = r
    out = {"hash_GBps": {k: v / GB for k, v in rates.items()}, "load_average": os.getloadavg()[0],
           "small_dataset": small, "recipes": recipes, "provenance": provenance()}
    print(f"sha256 on one thread: {rates['cpu'] / GB:.2f} GB/s of CPU time ({rates['wall'] / GB:.2f} GB/s wall clock, "
          f"load average {os.getloadavg()[0]:.1f}); {small['bytes'] / 2**20:.0f} MiB in {small['shards']} shards: "
          f"cold {small['cold_s']:.3f} s, restart {small['restart_s'] * 1e3:.1f} ms")
    print(f"minutes below at {rate / GB:.2f} GB/s per rank")
    print("| recipe | ranks | corpus (shards) | read from the filesystem, before / now | per rank, before / now |")
    for name, r in recipes.items():
        print(f"| {name.split(' @ ')[0]} | {r['ranks']} | {r['corpus_bytes'] / GB:,.0f} GB ({r['shards']:,}) | "
              f"{r['before_fs_bytes'] / GB:,.0f} GB / {r['corpus_bytes'] / GB:,.0f} GB | "
              f"{r['before_rank_bytes'] / GB:,.0f} GB, {r['before_min']:,.1f} min / "
              f"{r['after_rank_bytes'] / GB:,.1f} GB, {r['after_min']:,.2f} min |")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
