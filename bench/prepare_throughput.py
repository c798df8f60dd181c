"""`superpose prepare --workers N`: text throughput at 1 and 2 workers, and peak memory on a GB-scale corpus.

A synthetic corpus is made from the embedded one (the Python standard library), its files shuffled and repeated into
a folder of text files; a BPE tokenizer is trained once on a slice of it and given to every run, so the runs measure
reading + encoding + writing, not tokenizer training. Each run is the real CLI in a subprocess; the peak RSS is the
largest sum over the process tree (main process and workers), sampled every 50 ms.

Three configurations alternate (1, 1+threads, 2, 1, ...) so that the load of a shared machine drifts over all alike:
one worker on one thread (TOKENIZERS_PARALLELISM=false; the baseline), one worker with the tokenizers library's own
(Rust, rayon) threads in `encode_batch` (what --workers 1 does by default), and two worker processes. The first 16 MB
are also encoded with `encode_batch` alone, threads off and on. The main process's serial work (the reading pass and
the assembly) is timed on its own for the 64-core estimate. Then one 2-worker run on the large corpus, for peak
memory; every corpus and output is deleted afterwards.

    nice python bench/prepare_throughput.py --mb 64 --large-mb 1024 --out bench/results/prepare_throughput.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from superpose.data.corpus import iter_documents
from superpose.data.tokenizer import train_tokenizer
from superpose.provenance import provenance

PREPARE = [sys.executable, "-m", "superpose", "prepare"]
RAYON_PROBE = """
import sys, time
from pathlib import Path
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts, size = [], 0
for path in sorted(Path(sys.argv[2]).rglob("*.txt")):
    texts.append(path.read_text(encoding="utf-8"))
    size += len(texts[-1])
    if size > 16e6:
        break
start = time.perf_counter()
for i in range(0, len(texts), 64):
    tok.encode_batch_fast(texts[i:i + 64], add_special_tokens=False)
print(time.perf_counter() - start)
"""


def make_corpus(folder: Path, target_bytes: int, seed: int = 0) -> int:
    """Files of the embedded corpus, shuffled and repeated (each copy in its own order) until target_bytes; returns
    the bytes written. 1000 files per subfolder."""
    docs = [d.encode("utf-8") for d in iter_documents("embedded")]
    rng = random.Random(seed)
    written, index = 0, 0
    while written < target_bytes:
        rng.shuffle(docs)
        for doc in docs:
            sub = folder / f"{index // 1000:05d}"
            if index % 1000 == 0:
                sub.mkdir(parents=True)
            (sub / f"{index:08d}.txt").write_bytes(doc)
            written += len(doc)
            index += 1
            if written >= target_bytes:
                break
    return written


def run_prepare(args: list[str], env: dict[str, str]) -> dict:
    """Wall time and peak RSS of the process tree of one CLI run."""
    start = time.perf_counter()
    proc = psutil.Popen(PREPARE + args + ["--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"prepare failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1), "load_after": os.getloadavg()[0]}


def rayon_probe(tokenizer: Path, corpus: Path, parallel: bool) -> float:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if parallel else "false"}
    out = subprocess.run([sys.executable, "-c", RAYON_PROBE, str(tokenizer), str(corpus)], env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip())


def serial_parts(corpus: Path, dataset: Path, scratch: Path) -> dict:
    """Time the work only the main process does: the reading pass (walk, decode, cache write) and the assembly
    (read the encoded ids, hash, write the shards; timed as a hashed copy of the finished shards)."""
    start = time.perf_counter()
    with open(scratch, "wb") as cache:
        for doc in iter_documents(str(corpus)):
            cache.write(doc.encode("utf-8"))
    read = time.perf_counter() - start
    start = time.perf_counter()
    for shard in sorted(dataset.glob("*.bin")):
        data = shard.read_bytes()
        hashlib.sha256(data).hexdigest()
        scratch.write_bytes(data)
    assemble = time.perf_counter() - start
    scratch.unlink()
    return {"read_s": round(read, 2), "assemble_s": round(assemble, 2)}


CONFIGS = {  # label: (workers, environment)
    "1": (1, {"TOKENIZERS_PARALLELISM": "false"}),  # one process, one thread: the baseline of the speedups
    "1+threads": (1, {}),  # one process, encode_batch on the tokenizers library's own threads
    "2": (2, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=64, help="corpus size of the worker comparison (MB of text)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each configuration, alternated")
    ap.add_argument("--large-mb", type=int, default=1024, help="corpus size of the peak-memory run (0: skip it)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--work", type=Path, default=Path("/tmp/superpose-prepare-bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/prepare_throughput.json"))
    args = ap.parse_args()

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    result: dict = {"provenance": provenance(), "load_before": os.getloadavg()}
    try:
        corpus = args.work / "corpus"
        size = make_corpus(corpus, args.mb * 10**6)
        tokenizer = args.work / "tokenizer.json"
        sample = [p.read_text(encoding="utf-8") for p in sorted(corpus.rglob("*.txt"))[:400]]
        train_tokenizer(sample, args.vocab_size).save(str(tokenizer))
        runs: dict[str, list[dict]] = {label: [] for label in CONFIGS}
        for repeat in range(args.repeats):
            for label, (workers, env) in CONFIGS.items():
                out = args.work / f"out-{workers}-{repeat}"
                runs[label].append(run_prepare([str(corpus), "--tokenizer", str(tokenizer), "--workers", str(workers),
                                                "--out", str(out)], env))
                if label != "2" or repeat < args.repeats - 1:
                    shutil.rmtree(out)
        wall = {label: statistics.median(r["wall_s"] for r in rs) for label, rs in runs.items()}
        result["comparison"] = {
            "corpus_bytes": size, "files": sum(1 for _ in corpus.rglob("*.txt")), "vocab_size": args.vocab_size,
            "configurations": {label: f"--workers {w}" + (" with TOKENIZERS_PARALLELISM=false" if env else "")
                               for label, (w, env) in CONFIGS.items()},
            "runs": runs,
            "mb_per_s": {label: round(size / 1e6 / t, 2) for label, t in wall.items()},
            "speedup_vs_1": {label: round(wall["1"] / t, 3) for label, t in wall.items()},
        }
        one = rayon_probe(tokenizer, corpus, parallel=False)
        two = rayon_probe(tokenizer, corpus, parallel=True)
        result["encode_batch_threads"] = {"first_mb": 16, "one_thread_s": round(one, 2),
                                          "rayon_threads_s": round(two, 2), "speedup": round(one / two, 3)}
        serial = serial_parts(corpus, args.work / f"out-2-{args.repeats - 1}", args.work / "scratch")
        result["estimate_64_cores"] = estimate(wall["1"], serial, size)
        shutil.rmtree(corpus)

        if args.large_mb:
            large = args.work / "large"
            big = make_corpus(large, args.large_mb * 10**6, seed=1)
            run = run_prepare([str(large), "--tokenizer", str(tokenizer), "--workers", "2",
                               "--out", str(args.work / "large-out")], {})
            result["large"] = {"corpus_bytes": big, "workers": 2, **run, "mb_per_s": round(big / 1e6 / run["wall_s"], 2)}
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=1))


def estimate(t1: float, serial: dict, size: int) -> dict:
    """Amdahl with the serial part measured, not fitted: T(n) = serial + (T(1) - serial) / n."""
    fixed = serial["read_s"] + serial["assemble_s"]
    t64 = fixed + (t1 - fixed) / 64
    return {
        **serial, "one_worker_s": t1, "serial_fraction": round(fixed / t1, 4),
        "estimated_speedup": round(t1 / t64, 1), "estimated_mb_per_s": round(size / 1e6 / t64, 1),
        "ceiling_mb_per_s": round(size / 1e6 / fixed, 1),
        "reasoning": "An estimate, not a measurement. Only tokenizing runs in the workers; the main process reads "
                     "the corpus into the cache and, at the end, appends the encoded chunks to the shards. Both were "
                     "timed here on their own; the rest of the single-thread run divides over the workers "
                     "(independent 4 MB chunks, two queued per worker, nothing shared but the read-only cache). "
                     "On 64 cores this assumes every core is as fast as here, the disk keeps up with reading the "
                     "cache and writing the parts at estimated_mb_per_s, and one core is left for the main process; "
                     "the ceiling is the main process alone, which the workers cannot pass. Start-up (about a second, plus "
                     "a second per spawned worker) does not grow with the corpus and is left out.",
    }


if __name__ == "__main__":
    main()
