"""Data mixtures (superpose.data.mixture, ``data.sources``): shares within quota, exact resume at any world size,
one source = ``data.path``, one-line errors, and a two-source run across a TST switch that logs and resumes exactly."""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from superpose.data.loader import WindowLoader
from superpose.data.mixture import MixtureLoader, Source, proportions, source_counts, weighted_mean
from superpose.data.prepare import prepare
from superpose.data.shards import FORMAT, ShardWriter, open_dataset, write_meta
from superpose.errors import SuperposeError
from superpose.files import file_sha256
from superpose.train.checkpoint import list_checkpoints
from superpose.train.config_load import config_from_dict
from superpose.train.loop import train
from superpose.train.callbacks import Evaluator
from superpose.train.config import LogConfig
from superpose.train.metrics import MetricsWriter, dashboard_tag, read_metrics

from conftest import make_tiny_config, run_error, torchrun

VOCAB = 4000
# Source k's train tokens are BASE[k] + position, so a window names its source and its place by its values.
BASE = {"web": 0, "code": 1000, "math": 2000}
SIZES = {"web": 900, "code": 500, "math": 300}


def write_dataset(root: Path, train: np.ndarray, val: np.ndarray, vocab: int = VOCAB) -> Path:
    """A prepared dataset folder holding exactly these token ids (word-level tokenizer of ``vocab`` ids)."""
    root.mkdir(parents=True)
    words = {"<|endoftext|>": 0} | {f"t{i}": i for i in range(1, vocab)}
    Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>")).save(str(root / "tokenizer.json"))
    splits = {}
    for name, tokens in (("train", train), ("val", val)):
        with ShardWriter(root, name, np.dtype("<u2"), shard_tokens=211) as w:
            w.add(tokens, 1)
            splits[name] = w.close()
    write_meta(root, {"format": FORMAT, "version": 1, "dtype": "uint16", "vocab_size": vocab, "eos_id": 0,
                      "tokenizer": "tokenizer.json", "tokenizer_sha256": file_sha256(root / "tokenizer.json"),
                      "source": ["synthetic"], "seed": 0, "val_fraction": 0.1, "splits": splits})
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    return {name: write_dataset(root / name, BASE[name] + np.arange(SIZES[name]), BASE[name] + np.arange(64))
            for name in BASE}


def sources(folders: dict[str, Path], weights: dict[str, float]) -> list[Source]:
    return [Source(name, w, open_dataset(folders[name]).split("train")) for name, w in weights.items()]


def source_of(batch: np.ndarray) -> np.ndarray:
    """The source index of every row (by its first token's value), in the order of BASE."""
    return np.searchsorted(sorted(BASE.values()), batch[:, 0], side="right") - 1


WEIGHTS = {"web": 0.5, "code": 0.3, "math": 0.2}
TST_WINDOWS = [36] * 12 + [9] * 18  # bag 4 then bag 1 at L = 8: the window shrinks mid-run


def test_shares_stay_within_quota_at_every_row(folders):
    """After every batch each source has floor or ceil of weight x windows, counted from the windows' own
    values; every window is contiguous text of its source; tokens are within one longest window of their share."""
    B = 7
    loader = MixtureLoader(sources(folders, WEIGHTS), B, seed=3)
    p = np.array(list(WEIGHTS.values())) / sum(WEIGHTS.values())
    seen, tokens = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    for w in TST_WINDOWS:
        batch = loader.next_batch(w).numpy()
        which = source_of(batch)
        assert ((np.diff(batch, axis=1) % np.array(list(SIZES.values()))[which, None]) == 1).all()
        counts = np.bincount(which, minlength=3)
        assert (counts >= np.floor(p * B) - 1).all() and (counts <= np.ceil(p * B) + 1).all()
        seen += counts
        tokens += counts * w
        assert (np.abs(seen - p * seen.sum()) < 1).all(), seen
        state = source_counts(loader.state_dict())
        assert [state[n]["windows"] for n in WEIGHTS] == seen.tolist()
        assert [state[n]["tokens"] for n in WEIGHTS] == tokens.tolist()
    assert (np.abs(tokens - p * tokens.sum()) < max(TST_WINDOWS)).all()


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=6), seed=st.integers(0, 2**32),
       batch=st.integers(1, 9))
def test_quota_method_holds_for_any_weights(folders, weights, seed, batch):
    """Any weights, any seed: every prefix of the window sequence gives each source floor or ceil of its share."""
    stream = open_dataset(folders["web"]).split("train")
    loader = MixtureLoader([Source(f"s{k}", w, stream) for k, w in enumerate(weights)], batch, seed)
    p = np.array(weights) / sum(weights)
    which = np.concatenate([loader.assign(batch) for _ in range(200 // batch)])
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[which], axis=0)
    assert (np.abs(counts - p * np.arange(1, len(which) + 1)[:, None]) < 1 + 1e-9).all()


any_weight = st.floats(min_value=5e-324, max_value=1.7976931348623157e308, allow_subnormal=True)


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(any_weight, min_size=1, max_size=6), data=st.data())
def test_any_finite_positive_weights_give_finite_shares_and_a_finite_mixed_loss(weights, data):
    """``1.7e308, 1.7e308`` overflows a float sum and ``5e-324, 1e308`` underflows a float share: the shares are
    exact rationals rounded once, so they and the weighted validation loss stay finite."""
    shares = proportions(weights)
    exact = [Fraction(w) / sum(map(Fraction, weights)) for w in weights]
    rounding = [max(e / 2**52, Fraction(1, 2**1074)) for e in exact]  # relative, or the subnormals' absolute
    assert all(0 <= p <= 1 and abs(Fraction(p) - e) <= r for p, e, r in zip(shares, exact, rounding))
    losses = {f"s{k}": data.draw(st.floats(0, 20)) for k in range(len(weights))}
    mean = weighted_mean(losses, {f"s{k}": w for k, w in enumerate(weights)})
    slack = 1e-300  # a share of a subnormal loss may round to 0 (5e-324 / 2 == 0.0)
    assert math.isfinite(mean)
    assert min(losses.values()) * (1 - 1e-12) - slack <= mean <= max(losses.values()) * (1 + 1e-12) + slack


@pytest.mark.parametrize("weights, expected", [((1.7e308, 1.7e308), 4.0), ((5e-324, 1e308), 5.0)])
def test_evaluator_mixes_source_losses_with_extreme_weights(weights, expected):
    """The trainer's validation (not only the helper) mixes with the safe mean: a float sum of these weights
    overflows to inf (NaN loss) or underflows the smaller share."""

    class Module:
        def eval_loss(self, windows):
            return float(windows)

    class Quiet:
        def say(self, line):
            pass

    evaluator = Evaluator(Module(), {"a": 3.0, "b": 5.0}, dict(zip("ab", weights)), True, 1, 1, Quiet())
    assert evaluator.evaluate() == {"val_loss": expected, "val_loss/a": 3.0, "val_loss/b": 5.0}


def test_metrics_rows_are_strict_json_and_read_back_as_logged(tmp_path):
    """A skipped step's NaN loss (or an infinite one) is written as null, never as bare NaN/Infinity, and read back
    as NaN."""
    writer = MetricsWriter(tmp_path, log=LogConfig(tensorboard=False))
    writer.write({"step": 1, "train_loss": math.nan, "grad_norm": math.inf, "lr": 0.5})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written into metrics.jsonl"))
    [row] = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(row["train_loss"]) and math.isnan(row["grad_norm"]) and row["lr"] == 0.5


@pytest.mark.parametrize("weights", [[1.7e308, 1.7e308], [5e-324, 1e308], [1e308, 5e-324, 1.0]])
def test_extreme_weights_keep_the_quota_method_exact(folders, weights):
    stream = open_dataset(folders["web"]).split("train")
    loader = MixtureLoader([Source(f"s{k}", w, stream) for k, w in enumerate(weights)], 5, 3)
    which = np.concatenate([loader.assign(5) for _ in range(20)])
    exact = [Fraction(w) / sum(map(Fraction, weights)) for w in weights]
    for g in range(1, len(which) + 1):
        for k, p in enumerate(exact):
            assert abs(int((which[:g] == k).sum()) - p * g) < 1


def run_batches(folders, windows, cut=None, world=1, B=6, seed=11):
    """Global batches over ``windows``, resumed at call ``cut`` from a JSON round trip on ``world`` ranks."""
    loaders = [MixtureLoader(sources(folders, WEIGHTS), B, seed)]
    out = []
    for i, w in enumerate(windows):
        if i == cut:
            state = json.loads(json.dumps(loaders[0].state_dict()))
            share = B // world
            loaders = [MixtureLoader(sources(folders, WEIGHTS), B, seed, rows=range(r * share, (r + 1) * share))
                       for r in range(world)]
            for loader in loaders:
                loader.load_state_dict(state)
        out.append(np.concatenate([loader.next_batch(w).numpy() for loader in loaders]))
    return out, loaders[0].state_dict()


@pytest.mark.parametrize("cut,world", [(5, 1), (12, 2), (13, 3), (0, 2)])
def test_resume_and_world_size_reproduce_batches_and_counts(folders, cut, world):
    straight, end = run_batches(folders, TST_WINDOWS)
    resumed, end_resumed = run_batches(folders, TST_WINDOWS, cut=cut, world=world)
    for want, got in zip(straight, resumed):
        np.testing.assert_array_equal(got, want)
    assert source_counts(end_resumed) == source_counts(end)


def test_one_source_reads_exactly_what_data_path_reads(folders):
    stream = open_dataset(folders["web"]).split("train")
    single, mixed = WindowLoader(stream, 4, seed=5, rows=range(1, 3)), MixtureLoader(
        [Source("web", 2.5, stream)], 4, seed=5, rows=range(1, 3))
    for w in TST_WINDOWS:
        assert torch.equal(mixed.next_batch(w), single.next_batch(w))
        assert mixed.epoch == single.epoch
    assert mixed.state_dict()["sources"][0]["loader"] == single.state_dict()


def test_loader_refuses_state_of_other_sources(folders):
    loader = MixtureLoader(sources(folders, WEIGHTS), 6, seed=0)
    loader.next_batch(9)
    state = loader.state_dict()
    other = MixtureLoader(sources(folders, {**WEIGHTS, "math": 0.25}), 6, seed=0)
    with pytest.raises(SuperposeError, match="is for sources"):
        other.load_state_dict(state)
    with pytest.raises(SuperposeError, match="written by a data.path run"):
        other.load_state_dict(WindowLoader(sources(folders, WEIGHTS)[0].stream, 6, 0).state_dict())
    with pytest.raises(SuperposeError, match="a data mixture's"):
        WindowLoader(sources(folders, WEIGHTS)[0].stream, 6, 0).load_state_dict(state)
    state["sources"][0]["windows"] += 6  # no longer within quota
    with pytest.raises(SuperposeError, match="corrupt"):
        MixtureLoader(sources(folders, WEIGHTS), 6, seed=0).load_state_dict(state)
    assert dashboard_tag("share/web") == "data/share/web" and dashboard_tag("text_tokens/web") == "data/tokens/web"
    assert dashboard_tag("val_loss/web") == "eval/loss/web" and dashboard_tag("val_loss") == "eval/loss"


def mixture_config(folders_or_paths, out_dir, name="mix", **sections):
    """The tiny run config of conftest with ``data.sources`` in place of ``data.path``."""
    raw = make_tiny_config(".", out_dir, name).to_dict()
    raw["data"] = {"sources": folders_or_paths}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw)


@pytest.mark.parametrize("sources_,message", [
    ([{"path": "a", "weight": 0}], "data.sources[0].weight: must be a finite number > 0, got 0"),
    ([{"path": "a", "weight": -1.5}], "must be a finite number > 0, got -1.5"),
    ([{"path": "a", "weight": math.nan}], "must be a finite number > 0, got nan"),
    ([{"path": "a"}], "data.sources[0].weight: must be a finite number > 0, got None"),
    ([{"path": "x/a", "weight": 1}, {"path": "y/a", "weight": 1}], "names ['a', 'a'] repeat"),
    ([{"path": "a", "weight": 1, "share": 2}], "unknown config key data.sources[0].share"),
    (["a"], "data.sources[0]: expected a table"),
])
def test_bad_sources_are_one_line_errors(tmp_path, sources_, message):
    with pytest.raises(SuperposeError) as e:
        mixture_config(sources_, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_path_and_sources_together_are_refused(tmp_path, capsys):
    raw = make_tiny_config(".", tmp_path).to_dict()
    raw["data"]["sources"] = [{"path": "a", "weight": 1}]
    with pytest.raises(SuperposeError, match=r"data.sources and data.path exclude each other; give one of them \(in the config\)"):
        config_from_dict(raw)
    # an override's choice replaces the file's, as tst.schedule does tst.bag
    del raw["data"]["sources"]
    cfg = config_from_dict(raw, ["data.sources=[{path = 'a', weight = 1}]"])
    assert cfg.data.mixture() == [("a", "a", 1)] and "path" not in cfg.to_dict()["data"]


def test_missing_folder_and_foreign_vocabulary_write_nothing(folders, tmp_path, capsys):
    foreign = write_dataset(tmp_path / "foreign", np.arange(1, 500), np.arange(1, 64), vocab=600)
    for second, expected in ((tmp_path / "nowhere", "dataset not found"), (foreign, "does not match the shards")):
        cfg = mixture_config([{"path": str(folders["web"]), "weight": 1}, {"path": str(second), "weight": 1}],
                             tmp_path / "runs")
        cfg_file = tmp_path / "mix.toml"
        cfg_file.write_text(cfg.to_toml())
        assert expected in run_error(capsys, ["train", str(cfg_file), "--quiet"])
        assert not cfg.run_dir.exists()


@pytest.fixture(scope="module")
def second_corpus(embedded_data, tmp_path_factory):
    """A different corpus tokenized with the embedded data's tokenizer, so the two can be mixed."""
    src = tmp_path_factory.mktemp("poems") / "poems.jsonl"
    lines = [f"poem {i}: " + " ".join(["the quiet river carries light", "over stones and ember"][i % 2] for _ in
                                     range(20 + i % 7)) for i in range(120)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    return prepare([str(src)], tmp_path_factory.mktemp("poems-ds") / "poems", tokenizer=str(embedded_data / "tokenizer.json"),
                   val_fraction=0.1, progress=False)


def test_two_source_run_logs_shares_and_resumes_exactly(embedded_data, second_corpus, tmp_path):
    """Two sources across the TST switch (step 6): per-source tokens and shares in every row (within one window of
    their quota), per-source validation losses and their weighted mean, and a resume before the switch that
    reproduces every row, the counts included."""
    mix = [{"path": str(embedded_data), "weight": 0.7}, {"path": str(second_corpus), "weight": 0.3}]
    cfg = mixture_config(mix, tmp_path / "runs", checkpoint={"every": 4, "keep": 3})
    result = train(cfg, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["bag"] for r in rows] == [4] * 6 + [1] * 6
    longest = 4 * 17
    for r in rows:
        tokens = [r["text_tokens/embedded"], r["text_tokens/poems"]]
        assert sum(tokens) == r["text_tokens"]
        assert abs(tokens[0] - 0.7 * r["text_tokens"]) < longest and abs(r["windows/poems"] - 0.3 * 4 * r["step"]) < 1
        assert r["share/embedded"] == tokens[0] / r["text_tokens"]
        assert r["windows/embedded"] + r["windows/poems"] == 4 * r["step"]
    for r in (r for r in rows if "val_loss" in r):
        assert r["val_loss"] == pytest.approx(0.7 * r["val_loss/embedded"] + 0.3 * r["val_loss/poems"])
    assert result.sources["poems"]["tokens"] == rows[-1]["text_tokens/poems"]
    info = json.loads((result.run_dir / "run.json").read_text())
    assert [s["name"] for s in info["sources"]] == ["embedded", "poems"]

    cut = mixture_config(mix, tmp_path / "cut", checkpoint={"every": 4, "keep": 3})
    shutil.copytree(result.run_dir, cut.run_dir)
    for ckpt in list_checkpoints(cut.run_dir):
        if ckpt.name > "step-0000004":
            shutil.rmtree(ckpt)
    resumed = train(cut, resume=True, progress=False)
    drop = {"wall_time", "step_time", "tokens_per_s", "positions_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(resumed.run_dir / "metrics.jsonl")] \
        == [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert resumed.sources == result.sources


@pytest.mark.slow
def test_two_source_run_on_two_ranks_matches_one_process(embedded_data, second_corpus, tmp_path):
    """Under torchrun (2 gloo ranks, FSDP2) every rank reads its rows of the same mixed global batch: the losses,
    the per-source counts and the per-source validation losses equal a one-process run's."""
    mix = [{"path": str(embedded_data), "weight": 0.7}, {"path": str(second_corpus), "weight": 0.3}]
    one = train(mixture_config(mix, tmp_path / "one"), progress=False)
    two = mixture_config(mix, tmp_path / "two", train={"parallel": "fsdp"})
    path = tmp_path / "two.toml"
    path.write_text(two.to_toml())
    torchrun(path)
    got, want = (read_metrics(run / "metrics.jsonl") for run in (two.run_dir, one.run_dir))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    counts = ("text_tokens", "windows/", "share/", "epoch", "bag")
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert {k: v for k, v in g.items() if k.startswith(counts)} == {k: v for k, v in w.items()
                                                                         if k.startswith(counts)}
        for key in (k for k in w if "loss" in k):  # train_loss, val_loss and val_loss/<source>
            assert g[key] == pytest.approx(w[key], abs=1e-5), (g["step"], key)
