"""Data order: what a step learns from today's lanes, the whole-corpus loader and iid random windows.

The tiny preset trains on the embedded corpus through superpose's own trainer (``train.loop.train``); only the loader
class differs, swapped in by patching ``superpose.train.loop.WindowLoader``. Three orders:

- ``lanes``: the sequential loader superpose shipped before (row b reads lane b, one contiguous 1/B of the stream,
  front to back), kept here only as the reference;
- ``loader``: ``superpose.data.loader.WindowLoader`` (windows of a seeded permutation of the whole stream per pass);
- ``iid``: every row an independent uniformly random window (the textbook reference, not a product option).

Each at bag 1 and TST (s=4, r=0.3), for the given step counts and seeds; the final validation loss over the same
held-out windows. Also the loader throughput (tokens/s of ``next_batch``) of lanes vs loader, measured side by side.
Finished runs are cached in ``--work``; the JSON holds every cached run.

    OMP_NUM_THREADS=1 nice -n 10 python bench/data_order.py --steps 600 --jobs 2
    python bench/data_order.py --steps 1200 --jobs 2 --bags 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from superpose.data.loader import WindowLoader, check_window
from superpose.data.shards import TokenStream, open_dataset
from superpose.provenance import provenance

BATCH, SEQ_LEN = 16, 128
TST = {"bag": 4, "ratio": 0.3}


class LaneLoader:
    """The pre-issue-13 loader, verbatim in behaviour: B contiguous lanes of a seeded rotation, read front to back."""

    def __init__(self, stream: TokenStream, batch_size: int, seed: int, rows: range | None = None) -> None:
        self.stream, self.batch_size, self.seed = stream, batch_size, seed
        n = len(stream)
        base, extra = divmod(n, batch_size)
        self.lane_lens = np.array([base + (b < extra) for b in range(batch_size)], dtype=np.int64)
        rotation = int(np.random.default_rng(seed).integers(n))
        self.lane_starts = (rotation + np.concatenate([[0], np.cumsum(self.lane_lens)[:-1]])) % n
        self.lanes = range(batch_size) if rows is None else rows
        self.position = 0

    @property
    def epoch(self) -> int:
        return self.position // int(self.lane_lens.min())

    def next_batch(self, window_len: int) -> torch.Tensor:
        check_window(self.stream, self.batch_size, window_len)
        rows = [self._read_lane(b, window_len) for b in self.lanes]
        self.position += window_len
        return torch.from_numpy(np.stack(rows))

    def _read_lane(self, lane: int, length: int) -> np.ndarray:
        lane_len = int(self.lane_lens[lane])
        at = self.position % lane_len
        head = min(length, lane_len - at)
        parts = [self._read_cyclic(int(self.lane_starts[lane]) + at, head)]
        if head < length:
            parts.append(self._read_cyclic(int(self.lane_starts[lane]), length - head))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _read_cyclic(self, start: int, length: int) -> np.ndarray:
        n = len(self.stream)
        start %= n
        head = min(length, n - start)
        if head == length:
            return self.stream.read(start, length)
        return np.concatenate([self.stream.read(start, head), self.stream.read(0, length - head)])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class IidLoader:
    """Every row a uniformly random window of the stream, drawn from (seed, call): the textbook reference."""

    def __init__(self, stream: TokenStream, batch_size: int, seed: int, rows: range | None = None) -> None:
        self.stream, self.batch_size, self.seed = stream, batch_size, seed
        self.lanes = range(batch_size) if rows is None else rows
        self.calls = self.tokens = 0

    @property
    def epoch(self) -> int:
        return self.tokens // len(self.stream)

    def next_batch(self, window_len: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.calls])
        starts = rng.integers(0, len(self.stream) - window_len + 1, size=self.batch_size)[self.lanes.start:self.lanes.stop]
        self.calls += 1
        self.tokens += self.batch_size * window_len
        return torch.from_numpy(np.stack([self.stream.read(int(s), window_len) for s in starts]))

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls, self.tokens = state["calls"], state["tokens"]


LOADERS = {"lanes": LaneLoader, "loader": WindowLoader, "iid": IidLoader}


def run_one(data: str, work: str, order: str, bag: int, seed: int, steps: int) -> dict:
    """Train one run with ``order``'s loader patched into the trainer; cache and return its final numbers."""
    torch.set_num_threads(1)
    import superpose.train.loop as loop
    from superpose.train.config_load import config_from_dict

    name = f"{order}-bag{bag}-seed{seed}-steps{steps}"
    cached = Path(work) / f"{name}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    loop.WindowLoader = LOADERS[order]
    tst = TST if bag > 1 else {"bag": 1, "ratio": 0.0}
    cfg = config_from_dict({
        "name": name, "out_dir": str(Path(work) / "runs"), "seed": seed, "model": {"preset": "tiny"},
        "data": {"path": data}, "tst": tst,
        "optim": {"lr": 2e-3, "warmup_steps": 50, "decay_fraction": 0.2},
        "train": {"steps": steps, "batch_size": BATCH, "seq_len": SEQ_LEN, "device": "cpu", "log_every": 50},
        "eval": {"every": 0, "batches": 16}, "checkpoint": {"every": 0, "keep": 1}, "log": {"tensorboard": False},
    })
    t0 = time.perf_counter()
    result = loop.train(cfg, progress=False)
    if result.stopped:  # interrupted (SIGTERM/SIGINT): nothing to cache
        raise RuntimeError(f"{name} stopped by {result.stopped} after {result.steps} steps")
    out = {"order": order, "bag": bag, "seed": seed, "steps": steps, "final_val_loss": result.final_val_loss,
           "text_tokens": result.text_tokens, "wall_s": round(time.perf_counter() - t0, 1)}
    cached.write_text(json.dumps(out) + "\n")
    return out


def throughput(stream: TokenStream, batch: int, window: int, calls: int, rounds: int) -> dict:
    """Tokens/s of next_batch for lanes and loader, alternating rounds so machine load hits both alike."""
    rates: dict[str, list[float]] = {"lanes": [], "loader": []}
    for r in range(rounds):
        for order in ("lanes", "loader") if r % 2 == 0 else ("loader", "lanes"):
            loader = LOADERS[order](stream, batch, seed=r)
            t0 = time.perf_counter()
            for _ in range(calls):
                loader.next_batch(window)
            rates[order].append(batch * window * calls / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"batch_size": batch, "window": window, "calls": calls, "rounds": rounds,
            "lanes_tokens_per_s": round(med["lanes"]), "loader_tokens_per_s": round(med["loader"]),
            "loader_over_lanes": round(med["loader"] / med["lanes"], 3)}


def summarize(work: Path) -> list[dict]:
    """Mean final loss per (steps, bag, order) over the cached seeds, with the gap to iid."""
    runs = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["steps"], r["bag"], r["order"]), []).append(r)
    rows = []
    for (steps, bag, order), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        losses = [r["final_val_loss"] for r in rs]
        rows.append({"steps": steps, "bag": bag, "order": order, "seeds": [r["seed"] for r in rs],
                     "final_val_loss": losses, "mean": statistics.mean(losses)})
    for row in rows:
        iid = [r for r in rows if (r["steps"], r["bag"], r["order"]) == (row["steps"], row["bag"], "iid")]
        row["minus_iid"] = round(row["mean"] - iid[0]["mean"], 4) if iid else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/data-order", help="prepared embedded corpus (made if missing)")
    parser.add_argument("--work", type=Path, default=Path("runs/data-order"))
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 1200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bags", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--orders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_order.json"))
    args = parser.parse_args()
    if not Path(args.data).exists():
        from superpose.data.prepare import prepare

        prepare(["embedded"], args.data, vocab_size=4096, max_bytes=12_000_000, val_fraction=0.03, progress=False)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.throughput_only:
        # one seed of everything first, the lanes reference's second seed last: a shared CPU may not finish the
        # grid, and an interrupted grid keeps every finished run (cached in --work)
        grid = sorted(((args.data, str(args.work), o, b, s, n) for n in args.steps for b in args.bags
                       for s in args.seeds for o in args.orders),
                      key=lambda t: (t[5], t[2] == "lanes" and t[4] > 0, t[4], t[3]))
        with ProcessPoolExecutor(args.jobs) as pool:
            for r in pool.map(run_one, *zip(*grid)):
                print(f"{r['order']:7s} bag {r['bag']} seed {r['seed']} {r['steps']} steps: {r['final_val_loss']:.4f}"
                      f" ({r['wall_s']:.0f}s)", flush=True)
    torch.set_num_threads(1)
    stream = open_dataset(args.data).split("train")
    speed = [throughput(stream, b, w, calls=200, rounds=7) for b in (BATCH, 256) for w in (SEQ_LEN + 1, 4 * (SEQ_LEN + 1))]
    rows = summarize(args.work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "provenance": {**provenance(), "numpy": np.__version__},
        "data": {"path": args.data, "train_tokens": len(stream)},
        "setup": {"preset": "tiny", "batch_size": BATCH, "seq_len": SEQ_LEN, "lr": 2e-3, "schedule": "wsd",
                  "warmup_steps": 50, "decay_fraction": 0.2, "tst": TST, "eval_windows": 16 * BATCH},
        "runs": rows, "throughput": speed,
    }, indent=2) + "\n")
    print("| steps | bag | order | seeds | final val loss (mean) | minus iid |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['bag']} | {r['order']} | {len(r['seeds'])} | "
              f"{' / '.join(f'{x:.4f}' for x in r['final_val_loss'])} ({r['mean']:.4f}) | "
              f"{'' if r['minus_iid'] is None else format(r['minus_iid'], '+.4f')} |")
    for s in speed:
        print(f"next_batch B={s['batch_size']} w={s['window']}: lanes {s['lanes_tokens_per_s']:,} tok/s, loader "
              f"{s['loader_tokens_per_s']:,} tok/s ({s['loader_over_lanes']:.2f}x)")


if __name__ == "__main__":
    main()
