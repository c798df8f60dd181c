"""Resumable window batches drawn from the whole token stream in a fresh seeded order every pass.

TST phase 1 asks for (L+1)*bag contiguous tokens per row and phase 2 for L+1, so the window length is an argument of
every call. A pass cuts the stream (rotated by a per-pass offset) into windows of the current length and reads them in
a pseudo-random permutation, so every batch holds windows from all over the corpus, as iid random windows would, while
no token is read twice within a pass. When the window shrinks mid-pass (a TST switch) the pass carries on over the
windows it has not read yet, each cut into pieces of the new length: a bigger bag really consumes more distinct text.
The permutation is a keyed Feistel network (O(1) memory, any corpus size), so the whole position is a few integers.
"""

from __future__ import annotations

import numpy as np
import torch

from superpose.data.shards import TokenStream
from superpose.errors import SuperposeError

_MASK64 = (1 << 64) - 1
_ROUNDS = 4
_CHUNK = 4096  # window offsets computed at once and kept for later calls: the permutation costs per call, not per window


def check_window(stream: TokenStream, batch_size: int, window_len: int) -> None:
    """Fail early, in words, when the stream cannot hold one batch of distinct windows."""
    if batch_size < 1 or window_len < 1:
        raise SuperposeError(f"batch size and window length must be positive, got {batch_size} and {window_len}")
    if len(stream) // batch_size < window_len:
        raise SuperposeError(
            f"a batch of {batch_size} windows of {window_len} tokens needs {batch_size * window_len} tokens"
            f" but split '{stream.name}' of {stream.dataset_path} has only {len(stream)}"
        )


def batch_rows(rows: range | None, batch_size: int) -> range:
    """A rank's rows of the global batch (all of them for None); anything but a contiguous part is refused."""
    rows = range(batch_size) if rows is None else rows
    if not rows or rows.step != 1 or rows.start < 0 or rows.stop > batch_size:
        raise SuperposeError(f"rows {rows} are not a part of a batch of {batch_size}")
    return rows


def _splitmix64(x: int) -> int:
    """One step of splitmix64: well-mixed 64-bit keys from small integers (seed, pass, level, round)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _Permutation:
    """A seeded pseudo-random permutation of range(n), evaluated pointwise (nothing of size n is ever built).

    A balanced Feistel network on the smallest even number of bits covering n is a bijection of [0, 2^bits); cycle
    walking (re-applying it to values >= n) restricts it to a bijection of [0, n).
    """

    def __init__(self, n: int, key: int) -> None:
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.keys = []
        for _ in range(_ROUNDS):
            key = _splitmix64(key)
            self.keys.append(np.uint64(key))

    def __call__(self, index: np.ndarray) -> np.ndarray:
        out = self._feistel(index.astype(np.uint64))
        while (walk := out >= self.n).any():
            out[walk] = self._feistel(out[walk])
        return out.astype(np.int64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        mask, shift = np.uint64((1 << self.half) - 1), np.uint64(self.half)
        left, right = x >> shift, x & mask
        for key in self.keys:
            mixed = (right ^ key) * np.uint64(0x9E3779B97F4A7C15)
            mixed ^= mixed >> np.uint64(29)
            left, right = right, left ^ ((mixed * np.uint64(0xBF58476D1CE4E5B9)) >> np.uint64(64 - self.half))
        return (left << shift) | right


class WindowLoader:
    """Batches of windows drawn across the whole stream, every token read at most once per pass, resumable exactly.

    Pass ``p`` rotates the stream by an offset drawn from (seed, p) and cuts it into ``n = len // w`` windows of the
    requested length ``w``; batches take the next windows of a permutation keyed by (seed, p), row after row, so a
    global batch is ``batch_size`` consecutive entries of that permutation. When a call asks for a shorter window
    ``w'`` mid-pass, the pass goes on over its unread windows, each cut into ``w // w'`` pieces, permuted again (a new
    *level* of the pass). A pass ends when its last window is read (a batch then carries straight on into the next
    pass) or when a call asks for a *longer* window than the current one.

    Guarantee: within a pass no token is read twice. A pass at one window length reads every token except the
    ``len % w`` the rotation leaves over (a different place every pass). A shrink from ``w`` to ``w'`` leaves ``w % w'``
    tokens of each still-unread window (none when ``w'`` divides ``w``, as TST's ``(L+1)*s`` -> ``L+1`` does); a
    growth ends the pass early and leaves its unread windows. The position is the pass and, per level, the window
    length and windows read: a few integers. Every rank computes the same global batch and reads only its ``rows``
    of it, so ranks read disjoint windows and a resume at any world size continues identically.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seed: int, rows: range | None = None) -> None:
        if batch_size < 1:
            raise SuperposeError(f"batch size must be positive, got {batch_size}")
        if seed < 0:
            raise SuperposeError(f"seed must be non-negative, got {seed}")
        if len(stream) < batch_size:
            raise SuperposeError(
                f"split '{stream.name}' of {stream.dataset_path} has {len(stream)} tokens, fewer than batch size {batch_size}"
            )
        self.stream = stream
        self.batch_size = batch_size
        self.seed = seed
        self.rows = batch_rows(rows, batch_size)
        self.epoch = 0  # passes completed
        self._levels: list[list[int]] = []  # [window length, windows read] per level of the current pass
        self._cache: tuple[tuple, int, np.ndarray] = ((), 0, np.empty(0, dtype=np.int64))  # (level key, first, starts)

    def next_batch(self, window_len: int) -> torch.Tensor:
        """This rank's ``rows`` of the next global batch: a LongTensor [len(rows), window_len] of contiguous stream text."""
        check_window(self.stream, self.batch_size, window_len)
        return torch.from_numpy(self.take(self.batch_size, window_len, self.rows))

    def take(self, count: int, window_len: int, mine: range) -> np.ndarray:
        """Advance past the next ``count`` windows of the order; return those at positions ``mine`` of them.

        ``next_batch`` takes a whole batch; a mixture takes each source's share of one. Returns
        ``[len(mine), window_len]`` int64.
        """
        starts = []
        left = count
        while left:
            level = self._level_for(window_len)
            read = self._levels[level][1]
            take = min(left, self._count(level) - read)
            first = count - left  # position of the first window taken here
            here = range(max(first, mine.start), min(first + take, mine.stop))
            if here:
                starts.append(self._cached_starts(level, read + here.start - first, len(here)))
            self._levels[level][1] += take
            left -= take
            if self._levels[level][1] == self._count(level):
                self.epoch, self._levels = self.epoch + 1, []
        starts = np.concatenate(starts) if starts else np.empty(0, dtype=np.int64)
        return self.stream.read_windows(starts, window_len)

    def _level_for(self, window_len: int) -> int:
        """The level that serves windows of this length, opening a new level or a new pass when the length changes."""
        if self._levels and self._levels[-1][0] != window_len:
            if self._levels[-1][0] < window_len:  # longer windows cannot be cut from shorter unread ones
                self.epoch, self._levels = self.epoch + 1, []
            else:  # the last level has unread windows (an exhausted pass ends at once), so >= 1 piece each
                self._levels.append([window_len, 0])
        if not self._levels:
            self._levels.append([window_len, 0])
        return len(self._levels) - 1

    def _count(self, level: int) -> int:
        """Windows at ``level``: the stream's at level 0, then the pieces of the previous level's unread windows."""
        if level == 0:
            return len(self.stream) // self._levels[0][0]
        (w_up, read_up), (w, _) = self._levels[level - 1], self._levels[level]
        return (self._count(level - 1) - read_up) * (w_up // w)

    def _key(self, salt: int) -> int:
        """A 64-bit key of (seed, pass, salt): salt 0 draws the pass's rotation, salt level+1 its permutation."""
        return _splitmix64((_splitmix64((_splitmix64(self.seed) + self.epoch) & _MASK64) + salt) & _MASK64)

    def _permutation(self, level: int) -> _Permutation:
        return _Permutation(self._count(level), self._key(level + 1))

    def _cached_starts(self, level: int, index: int, count: int) -> np.ndarray:
        """Offsets of windows [index, index+count) at ``level``, from a chunk computed ahead (derived, never saved)."""
        key = (self.epoch, level, *map(tuple, self._levels[:level]), self._levels[level][0])
        cached_key, first, starts = self._cache
        if cached_key != key or not first <= index <= index + count <= first + len(starts):
            stop = min(self._count(level), index + max(count, _CHUNK))
            self._cache = key, index, self._starts(level, np.arange(index, stop))
            cached_key, first, starts = self._cache
        return starts[index - first : index - first + count]

    def _starts(self, level: int, index: np.ndarray) -> np.ndarray:
        """Stream offsets of windows ``index`` (in read order) at ``level`` of the current pass."""
        slot = self._permutation(level)(index)
        if level == 0:
            rotation = self._key(0) % len(self.stream)
            return (rotation + slot * self._levels[0][0]) % len(self.stream)
        (w_up, read_up), (w, _) = self._levels[level - 1], self._levels[level]
        pieces = w_up // w
        return (self._starts(level - 1, read_up + slot // pieces) + (slot % pieces) * w) % len(self.stream)

    def state_dict(self) -> dict[str, int | list[int]]:
        """Plain ints for a checkpoint; loading them makes the next batches identical to an uninterrupted run."""
        return {"seed": self.seed, "batch_size": self.batch_size, "stream_tokens": len(self.stream),
                "epoch": self.epoch, "levels": [v for level in self._levels for v in level]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; refuse state from a different stream, batch size or seed (it would not line up)."""
        if not isinstance(state, dict):
            raise SuperposeError(f"data loader state is corrupt: {state!r}")
        if "sources" in state:
            raise SuperposeError("data loader state is a data mixture's (data.sources); this run reads data.path alone")
        for key, ours in (("seed", self.seed), ("batch_size", self.batch_size), ("stream_tokens", len(self.stream))):
            if state.get(key) != ours:
                raise SuperposeError(f"data loader state is for {key} {state.get(key)}, but this run has {key} {ours}")
        epoch, flat = state.get("epoch"), state.get("levels")
        if "position" in state and "levels" not in state:
            raise SuperposeError("data loader state is from the sequential loader of an older superpose; "
                                 "this version draws windows across the corpus and cannot continue it")
        if not _is_count(epoch) or not isinstance(flat, list) or len(flat) % 2 or not all(map(_is_count, flat)):
            raise SuperposeError(f"data loader state is corrupt: epoch {epoch!r}, levels {flat!r}")
        levels = [list(flat[i : i + 2]) for i in range(0, len(flat), 2)]
        previous = self.epoch, self._levels
        self.epoch, self._levels = epoch, []
        for level, (w, read) in enumerate(levels):
            self._levels.append([w, 0])
            if w < 1 or (level and w >= levels[level - 1][0]) or read >= self._count(level):
                self.epoch, self._levels = previous
                raise SuperposeError(f"data loader state is corrupt: levels {flat!r} do not fit this stream")
            self._levels[level][1] = read


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validation_windows(stream: TokenStream, batch_size: int, seq_len: int, num_batches: int) -> list[torch.Tensor]:
    """Fixed held-out windows of seq_len+1 tokens from the start of the stream, so every eval is comparable."""
    if batch_size < 1 or seq_len < 1 or num_batches < 1:
        raise SuperposeError(
            f"validation needs positive batch size, sequence length and batch count, got {batch_size}, {seq_len}, {num_batches}"
        )
    window = seq_len + 1
    count = min(len(stream) // window, batch_size * num_batches)
    if count == 0:
        raise SuperposeError(
            f"split '{stream.name}' of {stream.dataset_path} has {len(stream)} tokens, fewer than one"
            f" validation window of {window}"
        )
    windows = torch.from_numpy(stream.read(0, count * window).reshape(count, window))
    return list(windows.split(batch_size))
