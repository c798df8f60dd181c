"""The sequential window loader and validation windows (superpose.data.loader)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from superpose.data.loader import WindowLoader, check_window, validation_windows
from superpose.data.prepare import prepare
from superpose.data.shards import (
    FORMAT,
    ShardWriter,
    TokenStream,
    open_dataset,
    write_meta,
)
from superpose.errors import SuperposeError
from superpose.files import file_sha256

N_TRAIN = 1000
VOCAB = 70_000  # > 65536, so this dataset is stored as uint32


@pytest.fixture(scope="module")
def counting(tmp_path_factory: pytest.TempPathFactory) -> TokenStream:
    """A uint32 dataset whose train tokens are 0..999 (and val 5000..5199): a token's value is its position."""
    root = tmp_path_factory.mktemp("counting")
    vocab = {"<|endoftext|>": 0} | {f"t{i}": i for i in range(1, VOCAB)}
    Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")).save(str(root / "tokenizer.json"))
    splits = {}
    for name, tokens in (("train", np.arange(N_TRAIN)), ("val", np.arange(5000, 5200))):
        with ShardWriter(root, name, np.dtype("<u4"), shard_tokens=97) as w:
            w.add(tokens, 1)
            splits[name] = w.close()
    write_meta(root, {
        "format": FORMAT, "version": 1, "dtype": "uint32", "vocab_size": VOCAB, "eos_id": 0,
        "tokenizer": "tokenizer.json", "tokenizer_sha256": file_sha256(root / "tokenizer.json"),
        "source": ["synthetic"], "seed": 0, "val_fraction": 0.1, "splits": splits,
    })
    ds = open_dataset(root)
    assert ds.meta["dtype"] == "uint32" and len(ds.split("train")) == N_TRAIN
    return ds.split("train")


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory: pytest.TempPathFactory):
    rng = random.Random(0)
    words = "river stone light shadow forest ember tide glass".split()
    docs = [f"story {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) + "." for i in range(40)]
    src = tmp_path_factory.mktemp("text") / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = prepare([str(src)], tmp_path_factory.mktemp("tds") / "ds", vocab_size=300, val_fraction=0.2, shard_tokens=500, progress=False)
    return open_dataset(out), docs


def rows(loader: WindowLoader, windows: list[int]) -> np.ndarray:
    """Each row's windows over several calls, concatenated: [batch, sum(windows)]."""
    return torch.cat([loader.next_batch(w) for w in windows], dim=1).numpy()


def assert_contiguous(batch: np.ndarray) -> None:
    """On the counting stream a window is contiguous text when its values step by one (cyclically)."""
    np.testing.assert_array_equal(np.diff(batch, axis=1) % N_TRAIN, 1)


def passes(stream: TokenStream, batch_size: int, seed: int, windows: list[int], cut: int | None = None,
           world: int = 1) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[dict], list[bool]]:
    """Run a loader over ``windows`` (resumed at call ``cut`` on ``world`` ranks, each reading only its rows).

    Returns the global batches and, per pass: its windows (a batch that straddles two passes is split using the
    public state), the last state seen in it (with a level the ending call opened), and whether a longer window
    ended it early.
    """
    loaders = [WindowLoader(stream, batch_size, seed)]
    batches: list[np.ndarray] = []
    by_pass: list[list[np.ndarray]] = [[]]
    last: list[dict] = [{"levels": []}]
    grown: list[bool] = []
    for i, w in enumerate(windows):
        if i == cut:
            state = json.loads(json.dumps(loaders[0].state_dict()))  # plain ints survive a checkpoint round trip
            share = -(-batch_size // world)
            loaders = [WindowLoader(stream, batch_size, seed, rows=range(r * share, min(batch_size, (r + 1) * share)))
                       for r in range(world) if r * share < batch_size]
            for loader in loaders:
                loader.load_state_dict(state)
        before, prev = loaders[0].epoch, last[-1]["levels"]
        batch = np.concatenate([loader.next_batch(w).numpy() for loader in loaders])  # the ranks' rows, in rank order
        assert batch.shape == (batch_size, w) and len({loader.epoch for loader in loaders}) == 1
        state = loaders[0].state_dict()
        batches.append(batch)
        if loaders[0].epoch == before:
            by_pass[-1].extend(batch)
            last[-1] = state
            continue
        assert loaders[0].epoch == before + 1
        grew = bool(prev) and w > prev[-2]
        if prev and w < prev[-2]:
            last[-1] = {**last[-1], "levels": prev + [w, 0]}
        old = 0 if grew else batch_size - (state["levels"][-1] if state["levels"] else 0)
        by_pass[-1].extend(batch[:old])
        by_pass.append(list(batch[old:]))
        last.append(state)
        grown.append(grew)
    return batches, by_pass, last, grown


def unread_by_guarantee(state: dict) -> int:
    """Tokens a pass that ran to its end leaves unread, by the stated guarantee, from the last state seen in it:
    ``len % w0`` of the rotation, plus ``w % w'`` of every window still unread at a shrink from ``w`` to ``w'``."""
    flat = state["levels"]
    levels = [flat[i : i + 2] for i in range(0, len(flat), 2)]
    left, count = N_TRAIN % levels[0][0], N_TRAIN // levels[0][0]
    for (w_up, read_up), (w, _) in zip(levels, levels[1:]):
        left += (count - read_up) * (w_up % w)
        count = (count - read_up) * (w_up // w)
    return left


def test_batches_have_requested_shape_and_dtype(counting: TokenStream) -> None:
    loader = WindowLoader(counting, 4, seed=0)
    for w in (9, 36, 1):
        batch = loader.next_batch(w)
        assert batch.shape == (4, w) and batch.dtype == torch.int64


def test_windows_are_contiguous_text_that_decodes_to_the_original(text_dataset) -> None:
    ds, docs = text_dataset
    stream = ds.split("train")
    whole = stream.read(0, len(stream))
    loader = WindowLoader(stream, 3, seed=5)
    joined = "".join(docs)
    doubled = np.concatenate([whole, whole])  # a window may wrap past the end (at a document boundary)
    for w in (9, 9, 36, 9):
        for row in loader.next_batch(w).numpy():
            assert any(np.array_equal(doubled[s : s + w], row) for s in np.flatnonzero(whole == row[0]))
            pieces = ds.tokenizer.decode(row.tolist(), skip_special_tokens=False).split("<|endoftext|>")
            assert all(piece in joined for piece in pieces)


def test_a_pass_reads_every_window_once_in_a_fresh_order_each_pass(counting: TokenStream) -> None:
    loader = WindowLoader(counting, 4, seed=1)
    first = np.stack([loader.next_batch(40).numpy() for _ in range(6)])  # 24 of the pass's 25 windows of 40
    assert_contiguous(first.reshape(-1, 40))
    assert len(np.unique(first)) == first.size == 960 and loader.epoch == 0
    straddling = loader.next_batch(40).numpy()  # the pass's last window, then the first 3 of the next pass
    assert loader.epoch == 1 and loader.state_dict()["levels"] == [40, 3]
    np.testing.assert_array_equal(np.sort(np.concatenate([first.ravel(), straddling[0]])), np.arange(N_TRAIN))
    second = np.concatenate([straddling[1:], *[loader.next_batch(40).numpy() for _ in range(6)]])[:25]
    assert not np.array_equal(second[:, 0], np.concatenate([first.reshape(-1, 40), straddling[:1]])[:, 0])


def test_batches_draw_from_the_whole_stream(counting: TokenStream) -> None:
    """Unlike lanes (row b inside 1/B of the stream for a whole pass), ten batches of 4 touch every tenth of it."""
    loader = WindowLoader(counting, 4, seed=2)
    starts = np.concatenate([loader.next_batch(10).numpy()[:, 0] for _ in range(10)])
    assert set(starts // 100) == set(range(10))
    assert not np.array_equal(np.sort(starts[:4]), np.sort(starts[4:8]) - 10)  # not the next windows of the same rows


def test_a_shrinking_window_continues_the_pass_over_unread_text(counting: TokenStream) -> None:
    """The TST switch: (L+1)*s -> L+1 (here 36 -> 9) reads the rest of the pass without touching phase-1 text."""
    loader = WindowLoader(counting, 4, seed=3)
    phase1 = np.concatenate([loader.next_batch(36).numpy() for _ in range(3)])
    phase2 = [loader.next_batch(9).numpy() for _ in range(15)]  # (27 - 12) unread windows of 36 = 60 windows of 9
    assert loader.epoch == 1 and loader.state_dict()["levels"] == []
    in_pass = np.concatenate([phase1.ravel(), np.concatenate(phase2).ravel()])
    assert len(np.unique(in_pass)) == in_pass.size == N_TRAIN - N_TRAIN % 36  # once each; 28 tokens left over ...
    unread = np.setdiff1d(np.arange(N_TRAIN), in_pass)
    assert np.count_nonzero(np.diff(unread) != 1) <= 1  # ... in one run (cyclic): the rotation's leftover
    assert_contiguous(np.concatenate(phase2))


def test_a_non_dividing_shrink_and_a_growth(counting: TokenStream) -> None:
    loader = WindowLoader(counting, 2, seed=4)
    loader.next_batch(40)  # 2 of 25 windows
    loader.next_batch(30)  # 23 unread windows of 40, one piece of 30 each (10 tokens of each left over)
    assert loader.state_dict()["levels"] == [40, 2, 30, 2]
    loader.next_batch(100)  # growth: the pass ends, a new one begins at 100
    assert loader.epoch == 1 and loader.state_dict()["levels"] == [100, 2]


def test_resume_gives_identical_batches_at_any_world_size(counting: TokenStream) -> None:
    plan = [36, 36, 36, 9, 9, 100, 9, 36, 9, 9]  # a shrink, a growth (new pass) and more shrinks
    straight = passes(counting, 4, 7, plan)[0]
    for cut in range(len(plan)):
        for world in (1, 2, 3, 4):
            resumed = passes(counting, 4, 7, plan, cut=cut, world=world)[0]
            for want, got in zip(straight, resumed):
                np.testing.assert_array_equal(got, want)


def test_output_is_a_function_of_seed(counting: TokenStream) -> None:
    a, b, c = (WindowLoader(counting, 2, seed=s).next_batch(16) for s in (3, 3, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_load_state_dict_refuses_other_runs_and_corrupt_state(counting: TokenStream) -> None:
    state = WindowLoader(counting, 4, seed=0).state_dict()
    with pytest.raises(SuperposeError, match="batch_size 4, but this run has batch_size 2"):
        WindowLoader(counting, 2, seed=0).load_state_dict(state)
    with pytest.raises(SuperposeError, match="seed 0, but this run has seed 1"):
        WindowLoader(counting, 4, seed=1).load_state_dict(state)
    older = {"seed": 0, "batch_size": 4, "stream_tokens": N_TRAIN, "position": 10}  # the sequential loader's state
    with pytest.raises(SuperposeError, match="sequential loader of an older superpose"):
        WindowLoader(counting, 4, seed=0).load_state_dict(older)
    loader = WindowLoader(counting, 4, seed=0)
    for levels in ([9], [9, -1], [9, True], [9, 111], [9, 3, 18, 0], [9, 3, 9, 0], "x"):
        with pytest.raises(SuperposeError, match="data loader state is corrupt"):
            loader.load_state_dict({**state, "levels": levels})
    assert loader.state_dict() == state  # a refused state changes nothing
    with pytest.raises(SuperposeError, match="rows range\\(2, 5\\) are not a part of a batch of 4"):
        WindowLoader(counting, 4, seed=0, rows=range(2, 5))


def test_check_window_error(counting: TokenStream) -> None:
    check_window(counting, 4, 250)
    message = r"a batch of 4 windows of 251 tokens needs 1004 tokens but split 'train' of .* has only 1000"
    with pytest.raises(SuperposeError, match=message):
        check_window(counting, 4, 251)
    loader = WindowLoader(counting, 4, seed=0)
    with pytest.raises(SuperposeError, match=message):
        loader.next_batch(251)
    assert loader.state_dict()["levels"] == []


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 8),
    seed=st.integers(0, 2**32),
    windows=st.lists(st.sampled_from([1, 7, 9, 18, 30, 36, 40, 60]), min_size=1, max_size=40),
    cut=st.integers(0, 40),
    world=st.integers(1, 4),
)
def test_property_no_gap_no_overlap_within_a_pass_and_exact_resume(
    counting: TokenStream, batch: int, seed: int, windows: list[int], cut: int, world: int
) -> None:
    """Within every pass no token is read twice; a pass that ran to its end left exactly the tokens the guarantee
    names unread; every window is contiguous text; a resume at any call on any world size changes nothing."""
    straight, by_pass, last, grown = passes(counting, batch, seed, windows)
    resumed = passes(counting, batch, seed, windows, cut=cut, world=world)[0]
    for want, got in zip(straight, resumed):
        np.testing.assert_array_equal(got, want)
    for b in straight:
        assert_contiguous(b)
    for p, windows_read in enumerate(by_pass):
        tokens = np.concatenate(windows_read) if windows_read else np.empty(0, dtype=np.int64)
        assert len(np.unique(tokens)) == len(tokens), f"pass {p} read a token twice"
        if p < len(grown) and not grown[p]:  # a pass that ran to its end
            assert N_TRAIN - len(tokens) == unread_by_guarantee(last[p]), f"pass {p} left a gap"


def test_validation_windows(counting: TokenStream) -> None:
    val = open_dataset(counting.dataset_path).split("val")  # tokens 5000..5199
    batches = validation_windows(val, batch_size=4, seq_len=15, num_batches=2)
    assert [tuple(b.shape) for b in batches] == [(4, 16), (4, 16)]
    np.testing.assert_array_equal(torch.cat(batches).numpy().ravel(), np.arange(5000, 5128))
    again = validation_windows(val, batch_size=4, seq_len=15, num_batches=2)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    # only 12 windows of 16 fit in 200 tokens: 3 full batches of 4, nothing more
    assert [b.shape[0] for b in validation_windows(val, 4, 15, 10)] == [4, 4, 4]
    assert [b.shape[0] for b in validation_windows(val, 5, 15, 10)] == [5, 5, 2]
    with pytest.raises(SuperposeError, match="split 'val' of .* has 200 tokens, fewer than one validation window of 201"):
        validation_windows(val, 1, 200, 1)
