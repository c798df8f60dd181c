"""Shard verification once per job (superpose.data.shards.TokenDataset.verify): each rank hashes its share, every rank
judges all shards, and a shard verified before and unchanged since is not hashed again on a restart."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_config

import superpose.data.shards as shards
from superpose.data.shards import VERIFIED_FILE, Share, ShardWriter, assign_shares, open_dataset, write_meta
from superpose.errors import SuperposeError

SHARD_TOKENS = 20_000


def reshard(source: Path, out: Path, shard_tokens: int) -> Path:
    """``source``'s dataset rewritten in shards of ``shard_tokens`` tokens (the last of a split shorter)."""
    ds = open_dataset(source, verify=False)
    out.mkdir(parents=True)
    shutil.copy(source / ds.meta["tokenizer"], out / ds.meta["tokenizer"])
    splits = {}
    for name, split in ds.meta["splits"].items():
        stream = ds.split(name)
        with ShardWriter(out, name, shards.DTYPES[ds.meta["dtype"]], shard_tokens) as writer:
            writer.add(stream.read(0, len(stream)), split["documents"], split["bytes"])
            splits[name] = writer.close()
    write_meta(out, {**ds.meta, "splits": splits})
    return out


@pytest.fixture(scope="module")
def sharded(embedded_data, tmp_path_factory) -> Path:
    return reshard(embedded_data, tmp_path_factory.mktemp("sharded") / "data", SHARD_TOKENS)


@pytest.fixture()
def dataset(sharded, tmp_path) -> Path:
    """A fresh copy (no cache yet) of the resharded dataset."""
    return Path(shutil.copytree(sharded, tmp_path / "data", ignore=shutil.ignore_patterns(VERIFIED_FILE)))


def shard_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("*.bin")}


@pytest.fixture()
def hashed(monkeypatch) -> list[str]:
    """The names of the shard files hashed (in order), by any thread of this process (not the tokenizer's)."""
    names: list[str] = []
    real = shards.file_sha256

    def counting(path: Path) -> str:
        if Path(path).suffix == ".bin":
            names.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(shards, "file_sha256", counting)
    return names


def flip_byte(file: Path, keep_mtime: bool) -> None:
    """Change one byte in place; ``keep_mtime`` puts the old mtime back (as ``touch -r`` or rsync would)."""
    st = file.stat()
    raw = bytearray(file.read_bytes())
    raw[3] ^= 0x01
    file.write_bytes(bytes(raw))
    if keep_mtime:
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert file.stat().st_mtime_ns == st.st_mtime_ns


DAMAGED = r"^shard .*{name} is damaged: its sha256 differs from the one meta.json recorded when it was written; " \
          r"prepare the dataset again$"


# --- the plan: who hashes what -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_no_rank_hashes_more_than_its_share_plus_one_shard(seed: int) -> None:
    rng = random.Random(seed)
    world = rng.randint(1, 9)
    sizes = [rng.choice([rng.randint(0, 10**6), 10**6]) for _ in range(rng.randint(0, 40))]
    owners = assign_shares(sizes, world)
    assert owners == assign_shares(sizes, world) and all(0 <= r < world for r in owners)
    loads = [sum(s for s, r in zip(sizes, owners) if r == rank) for rank in range(world)]
    assert max(loads) <= sum(sizes) / world + max(sizes, default=0)


# --- one process: the cache ----------------------------------------------------------------------------------------


def test_a_restart_hashes_nothing_unchanged(dataset: Path, hashed: list[str]) -> None:
    sizes = shard_sizes(dataset)
    assert len(sizes) >= 5
    open_dataset(dataset)
    assert sorted(hashed) == sorted(sizes)  # each shard once
    cache = json.loads((dataset / VERIFIED_FILE).read_text())
    assert cache["dataset"] == str(dataset.resolve()) and sorted(cache["shards"]) == sorted(sizes)
    hashed.clear()
    open_dataset(dataset)
    assert hashed == []


@pytest.mark.parametrize("change", ["same bytes, new mtime", "flipped byte, new mtime", "flipped byte, mtime restored"])
def test_a_shard_changed_after_it_was_cached_is_hashed_again(dataset: Path, hashed: list[str], change: str) -> None:
    """Any write or utime moves the ctime, so even a same-size change with the mtime put back is hashed again;
    a damaged shard is refused in one line, and stays refused on the next start."""
    open_dataset(dataset)
    hashed.clear()
    shard = dataset / "train-00002.bin"
    if change == "same bytes, new mtime":
        shard.write_bytes(shard.read_bytes())
        open_dataset(dataset)
        assert hashed == [shard.name]
        return
    flip_byte(shard, keep_mtime=change.endswith("restored"))
    for _ in range(2):
        with pytest.raises(SuperposeError, match=DAMAGED.format(name=r"train-00002\.bin")):
            open_dataset(dataset)
        assert hashed == [shard.name]
        hashed.clear()


def test_a_foreign_or_damaged_cache_only_costs_a_hash(dataset: Path, hashed: list[str]) -> None:
    for text in ["{broken", json.dumps({"format": "other", "shards": {}}), json.dumps([1, 2])]:
        (dataset / VERIFIED_FILE).write_text(text)
        open_dataset(dataset)
        assert sorted(hashed) == sorted(shard_sizes(dataset))
        hashed.clear()
    open_dataset(dataset)
    assert hashed == []


def test_a_read_only_dataset_keeps_its_cache_under_the_user_cache(dataset: Path, hashed: list[str], tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and real(path, mode))
    open_dataset(dataset)
    assert not (dataset / VERIFIED_FILE).exists()
    assert len(list((tmp_path / "cache" / "superpose" / "verified").glob("*.json"))) == 1
    hashed.clear()
    open_dataset(dataset)
    assert hashed == []


# --- two ranks (threads here, processes below) -----------------------------------------------------------------


def exchange(world: int) -> list:
    """``world`` combine functions that gather every caller's part for all of them, as all_gather_object does."""
    parts: dict[int, dict] = {}
    barrier = threading.Barrier(world)

    def combine_for(rank: int):
        def combine(part: dict) -> dict:
            parts[rank] = part
            barrier.wait(timeout=60)
            return {k: v for r in sorted(parts) for k, v in parts[r].items()}
        return combine

    return [combine_for(rank) for rank in range(world)]


def verify_as_ranks(dataset: Path, world: int) -> list[BaseException | None]:
    """Every rank's TokenDataset.verify in a thread of its own; each rank's exception (None if it passed)."""
    ds = open_dataset(dataset, verify=False)
    errors: list[BaseException | None] = [None] * world

    def run(rank: int, combine) -> None:
        try:
            ds.verify(Share(rank, world, combine))
        except SuperposeError as e:
            errors[rank] = e

    threads = [threading.Thread(target=run, args=(r, c)) for r, c in enumerate(exchange(world))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_ranks_hash_each_shard_once_and_all_name_the_damaged_one(dataset: Path, hashed: list[str]) -> None:
    assert verify_as_ranks(dataset, 2) == [None, None]
    assert sorted(hashed) == sorted(shard_sizes(dataset))  # not once per rank
    hashed.clear()
    assert verify_as_ranks(dataset, 2) == [None, None] and hashed == []
    flip_byte(dataset / "val-00000.bin", keep_mtime=True)
    errors = verify_as_ranks(dataset, 2)
    assert hashed == ["val-00000.bin"]
    assert [str(e) for e in errors] == [str(errors[0])] * 2 and "val-00000.bin is damaged" in str(errors[0])


CHILD = """
import os
import sys
from pathlib import Path
import superpose.data.shards as shards
from superpose.cli import main
real, log = shards.file_sha256, Path(sys.argv[1]) / f"hashed-{os.environ['RANK']}.txt"
def counting(path):
    with open(log, "a") as f:
        f.write(f"{Path(path).name} {Path(path).stat().st_size}\\n")
    return real(path)
shards.file_sha256 = counting
sys.exit(main(["train", *sys.argv[2:], "--quiet"]))
"""


def launch(tmp_path: Path, config: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict[str, int]]]:
    """``superpose train`` on 2 gloo ranks under torchrun, the shard hash counted per rank: the process and, per
    rank, the bytes hashed of each shard file."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    for old in tmp_path.glob("hashed-*.txt"):
        old.unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path), str(config), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    per_rank = []
    for rank in range(2):
        log = tmp_path / f"hashed-{rank}.txt"
        lines = log.read_text().split() if log.exists() else []
        per_rank.append({name: int(size) for name, size in zip(lines[::2], lines[1::2]) if name.endswith(".bin")})
    return proc, per_rank


@pytest.mark.slow
def test_two_ranks_share_the_hashing_and_a_restart_hashes_nothing(dataset: Path, tmp_path: Path) -> None:
    """The trainer on 2 gloo ranks: each rank hashes at most half the dataset's bytes plus one shard, every shard
    once in all; the restart hashes nothing; a byte flipped under a restored mtime is found and named in one line."""
    cfg = make_tiny_config(dataset, tmp_path / "runs", "run", optim={"warmup_steps": 0}, train={"steps": 2},
                           eval={"every": 2, "batches": 1}, checkpoint={"every": 2})
    config = tmp_path / "run.toml"
    config.write_text(cfg.to_toml())
    sizes = shard_sizes(dataset)
    proc, per_rank = launch(tmp_path, config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(per_rank[0] | per_rank[1]) == sorted(sizes) and not per_rank[0].keys() & per_rank[1].keys()
    for rank in per_rank:
        assert 0 < sum(rank.values()) <= sum(sizes.values()) / 2 + max(sizes.values())

    proc, per_rank = launch(tmp_path, config, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert per_rank == [{}, {}]

    flip_byte(dataset / "train-00001.bin", keep_mtime=True)
    proc, per_rank = launch(tmp_path, config, "--resume")
    assert proc.returncode != 0 and per_rank[0] | per_rank[1] == {"train-00001.bin": sizes["train-00001.bin"]}
    lines = [line for line in proc.stderr.splitlines() if line.startswith("superpose: error: ")]
    # each rank names it; torchrun may stop the other rank before its line is out once the first has failed
    assert lines and len(set(lines)) == 1 and "train-00001.bin is damaged" in lines[0]
