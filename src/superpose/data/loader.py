"""Sequential, resumable window batches over a token stream, with a window length chosen per call.

TST phase 1 asks for (L+1)*bag tokens per row and phase 2 for L+1, so the window length is an
argument of every call. The stream is cut into batch_size equal contiguous lanes and row b reads
lane b front to back: every token is read exactly once per epoch, a bigger bag really consumes
more distinct text, and the whole position is a few integers (epoch, lane offset) that a
checkpoint can store.
"""

from __future__ import annotations

import numpy as np
import torch

from superpose.data.shards import TokenStream
from superpose.errors import SuperposeError


def check_window(stream: TokenStream, batch_size: int, window_len: int) -> None:
    """Fail early, in words, when one lane of the stream cannot hold a single window."""
    if batch_size < 1 or window_len < 1:
        raise SuperposeError(f"batch size and window length must be positive, got {batch_size} and {window_len}")
    if len(stream) // batch_size < window_len:
        raise SuperposeError(
            f"a batch of {batch_size} windows of {window_len} tokens needs {batch_size * window_len} tokens"
            f" but split '{stream.name}' of {stream.dataset_path} has only {len(stream)}"
        )


class WindowLoader:
    """Batches of non-overlapping windows read sequentially from batch_size lanes of the stream.

    Each epoch starts the lanes at a rotation of the stream drawn from (seed, epoch), so different
    seeds see the text in different places while the output stays a pure function of the seed and
    the state. A lane tail shorter than the requested window ends the epoch.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seed: int) -> None:
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
        self.lane_len = len(stream) // batch_size
        self._epoch = 0
        self._lane_offset = 0
        self._tokens_consumed = 0

    @property
    def epoch(self) -> int:
        """Completed passes over the stream."""
        return self._epoch

    @property
    def tokens_consumed(self) -> int:
        """Text tokens returned so far, over all epochs (batch_size * window_len per call)."""
        return self._tokens_consumed

    def lane_start(self, lane: int) -> int:
        """Stream position where `lane` starts in the current epoch (positions wrap around the stream)."""
        rotation = int(np.random.default_rng((self.seed, self._epoch)).integers(len(self.stream)))
        return (rotation + lane * self.lane_len) % len(self.stream)

    def next_batch(self, window_len: int) -> torch.Tensor:
        """The next window of every lane: a LongTensor [batch_size, window_len]."""
        check_window(self.stream, self.batch_size, window_len)
        if self._lane_offset + window_len > self.lane_len:
            self._epoch += 1
            self._lane_offset = 0
        rows = [self._read_cyclic(self.lane_start(b) + self._lane_offset, window_len) for b in range(self.batch_size)]
        self._lane_offset += window_len
        self._tokens_consumed += self.batch_size * window_len
        return torch.from_numpy(np.stack(rows))

    def _read_cyclic(self, start: int, length: int) -> np.ndarray:
        """Read with wrap-around, because the epoch's rotation lets a lane run past the stream's end."""
        n = len(self.stream)
        start %= n
        head = min(length, n - start)
        if head == length:
            return self.stream.read(start, length)
        return np.concatenate([self.stream.read(start, head), self.stream.read(0, length - head)])

    def state_dict(self) -> dict[str, int]:
        """Plain ints for a checkpoint; loading them makes the next batches identical to an uninterrupted run."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "stream_tokens": len(self.stream),
            "epoch": self._epoch,
            "lane_offset": self._lane_offset,
            "tokens_consumed": self._tokens_consumed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position; refuse state from a different stream, batch size or seed (it would not line up)."""
        for key, ours in (("seed", self.seed), ("batch_size", self.batch_size), ("stream_tokens", len(self.stream))):
            if state.get(key) != ours:
                raise SuperposeError(
                    f"data loader state is for {key} {state.get(key)}, but this run has {key} {ours}"
                )
        epoch, offset, consumed = (int(state[k]) for k in ("epoch", "lane_offset", "tokens_consumed"))
        if epoch < 0 or not 0 <= offset <= self.lane_len or consumed < 0:
            raise SuperposeError(f"data loader state is corrupt: epoch {epoch}, lane offset {offset}")
        self._epoch, self._lane_offset, self._tokens_consumed = epoch, offset, consumed


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
