"""What a data mixture costs per batch: the plain whole-corpus loader and the mixture loader with one and three
sources, timed side by side in one run (interleaved rounds, medians), and how far each source's windows stray from
its quota over the run.

    python bench/mixture_loader.py --data data/embedded --out bench/results/mixture_loader.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

from superpose.data.loader import WindowLoader
from superpose.data.mixture import MixtureLoader, Source, source_counts
from superpose.data.shards import open_dataset
from superpose.provenance import provenance

WEIGHTS = (0.5, 0.3, 0.2)


def _time_batches(loader: WindowLoader | MixtureLoader, window: int, batches: int) -> float:
    """Milliseconds per batch over ``batches`` batches."""
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_batch(window)
    return 1e3 * (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/embedded"), help="a prepared dataset folder")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--window", type=int, default=129, help="tokens per row (positions + 1)")
    parser.add_argument("--batches", type=int, default=50, help="batches per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    stream = open_dataset(args.data).split("train")  # the loaders' cost does not depend on which tokens they read
    makers: dict[str, Callable[[], WindowLoader | MixtureLoader]] = {
        "window_loader": lambda: WindowLoader(stream, args.batch_size, 0),
        "mixture_1_source": lambda: MixtureLoader([Source("a", 1.0, stream)], args.batch_size, 0),
        "mixture_3_sources": lambda: MixtureLoader([Source(f"s{k}", w, stream) for k, w in enumerate(WEIGHTS)],
                                                   args.batch_size, 0),
    }
    loaders = {name: make() for name, make in makers.items()}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            times[name].append(_time_batches(loader, args.window, args.batches))
    ms = {name: statistics.median(t) for name, t in times.items()}
    counts = source_counts(loaders["mixture_3_sources"].state_dict())
    windows = sum(c["windows"] for c in counts.values())
    report = {
        "provenance": provenance(),
        "batch": [args.batch_size, args.window], "ms_per_batch": ms, "ms_per_batch_rounds": times,
        "ratio_to_window_loader": {name: ms[name] / ms["window_loader"] for name in ms},
        "three_sources": {"weights": WEIGHTS, "windows": windows,
                          "max_quota_deviation_windows": max(abs(c["windows"] - w * windows)
                                                             for c, w in zip(counts.values(), WEIGHTS))},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
