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
    file_sha256,
    open_dataset,
    write_meta,
)
from superpose.errors import SuperposeError

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


def test_batches_have_requested_shape_and_dtype(counting: TokenStream) -> None:
    loader = WindowLoader(counting, 4, seed=0)
    for w in (9, 36, 1):
        batch = loader.next_batch(w)
        assert batch.shape == (4, w) and batch.dtype == torch.int64


def test_lanes_read_contiguous_text_across_window_lengths(counting: TokenStream) -> None:
    loader = WindowLoader(counting, 4, seed=0)
    lane_len = N_TRAIN // 4
    got = rows(loader, [9, 9, 36, 9])
    starts = got[:, 0]
    for b in range(4):
        # row b is one contiguous (cyclic) run of the stream ...
        np.testing.assert_array_equal(got[b], (starts[b] + np.arange(63)) % N_TRAIN)
        # ... starting one lane after row b-1
        assert (starts[b] - starts[0]) % N_TRAIN == b * lane_len
        assert starts[b] == loader.lane_starts[b]
    assert loader.tokens_consumed == 4 * 63


def test_windows_decode_to_the_original_text(text_dataset) -> None:
    ds, docs = text_dataset
    stream = ds.split("train")
    loader = WindowLoader(stream, 3, seed=5)
    starts = [int(loader.lane_starts[b]) for b in range(3)]
    got = rows(loader, [9, 9, 36, 9])
    joined = "".join(docs)
    for b in range(3):
        np.testing.assert_array_equal(got[b], np.resize(np.roll(stream.read(0, len(stream)), -starts[b]), 63))
        text = ds.tokenizer.decode(got[b].tolist(), skip_special_tokens=False)
        pieces = text.split("<|endoftext|>")
        assert sum(len(p) for p in pieces) > 100
        for piece in pieces:
            assert piece in joined


def test_a_pass_reads_each_token_exactly_once_then_carries_on(counting: TokenStream) -> None:
    loader = WindowLoader(counting, 4, seed=1)
    assert list(loader.lane_lens) == [250] * 4
    first = rows(loader, [40] * 6)  # 240 of each lane's 250 tokens
    assert len(np.unique(first)) == first.size == 4 * 240
    assert loader.epoch == 0
    wrapped = loader.next_batch(40).numpy()  # the last 10 tokens of each lane, then its first 30 again
    assert loader.epoch == 1
    for b in range(4):
        lane = (loader.lane_starts[b] + np.arange(250)) % N_TRAIN
        np.testing.assert_array_equal(wrapped[b], np.concatenate([lane[240:], lane[:30]]))
    seen = np.concatenate([first.ravel(), wrapped[:, :10].ravel()])
    np.testing.assert_array_equal(np.sort(seen), np.arange(N_TRAIN))  # every token once: no gap, no overlap
    assert loader.tokens_consumed == 7 * 4 * 40
    assert loader.state_dict()["position"] == 280


def test_uneven_lanes_drop_nothing(counting: TokenStream) -> None:
    loader = WindowLoader(counting, 7, seed=2)  # 1000 = 6 lanes of 143 + 1 of 142
    assert sorted(loader.lane_lens) == [142] + [143] * 6
    first_pass = loader.offsets(143)
    seen = np.concatenate([first_pass[b, : loader.lane_lens[b]] for b in range(7)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(N_TRAIN))


def test_resume_gives_identical_batches(counting: TokenStream) -> None:
    plan = [9, 36, 9, 100, 9, 36, 120, 9, 36]  # crosses an epoch boundary (lane length 250)
    straight = WindowLoader(counting, 4, seed=7)
    expected = [straight.next_batch(w) for w in plan]
    for cut in range(len(plan)):
        first = WindowLoader(counting, 4, seed=7)
        for w in plan[:cut]:
            first.next_batch(w)
        state = json.loads(json.dumps(first.state_dict()))  # plain ints survive a checkpoint round trip
        resumed = WindowLoader(counting, 4, seed=7)
        resumed.load_state_dict(state)
        for w, want in zip(plan[cut:], expected[cut:]):
            assert torch.equal(resumed.next_batch(w), want)
        assert resumed.tokens_consumed == straight.tokens_consumed
        assert resumed.epoch == straight.epoch == 1
        assert resumed.position == straight.position


def test_output_is_a_function_of_seed(counting: TokenStream) -> None:
    a, b, c = (WindowLoader(counting, 2, seed=s).next_batch(16) for s in (3, 3, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_load_state_dict_refuses_other_runs(counting: TokenStream) -> None:
    state = WindowLoader(counting, 4, seed=0).state_dict()
    with pytest.raises(SuperposeError, match="batch_size 4, but this run has batch_size 2"):
        WindowLoader(counting, 2, seed=0).load_state_dict(state)
    with pytest.raises(SuperposeError, match="seed 0, but this run has seed 1"):
        WindowLoader(counting, 4, seed=1).load_state_dict(state)


def test_check_window_error(counting: TokenStream) -> None:
    check_window(counting, 4, 250)
    message = r"a batch of 4 windows of 251 tokens needs 1004 tokens but split 'train' of .* has only 1000"
    with pytest.raises(SuperposeError, match=message):
        check_window(counting, 4, 251)
    loader = WindowLoader(counting, 4, seed=0)
    with pytest.raises(SuperposeError, match=message):
        loader.next_batch(251)
    assert loader.tokens_consumed == 0


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 8),
    seed=st.integers(0, 2**32),
    windows=st.lists(st.integers(1, 60), min_size=1, max_size=30),
    cut=st.integers(0, 30),
)
def test_property_exact_accounting_across_window_lengths_and_resume(
    counting: TokenStream, batch: int, seed: int, windows: list[int], cut: int
) -> None:
    """Record the stream offsets every row consumes: within a pass no token twice, after a full pass all of them."""
    loader = WindowLoader(counting, batch, seed)
    consumed: list[np.ndarray] = []
    for i, w in enumerate(windows):
        if i == cut:  # a resume mid-way changes nothing
            state = json.loads(json.dumps(loader.state_dict()))
            loader = WindowLoader(counting, batch, seed)
            loader.load_state_dict(state)
        offsets = loader.offsets(w)
        out = loader.next_batch(w).numpy()
        np.testing.assert_array_equal(out, offsets)  # counting stream: a token's value is its position
        consumed.append(offsets)
    per_row = np.concatenate(consumed, axis=1)
    for b in range(batch):
        lane_len = int(loader.lane_lens[b])
        lane = (loader.lane_starts[b] + np.arange(lane_len)) % N_TRAIN
        # row b is lane b read in order, cycling: token k of the row is lane[k % lane_len]
        np.testing.assert_array_equal(per_row[b], lane[np.arange(per_row.shape[1]) % lane_len])
    assert loader.tokens_consumed == batch * sum(windows)


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
