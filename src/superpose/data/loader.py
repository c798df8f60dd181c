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
    """Batches of windows read sequentially from batch_size lanes of the stream, losslessly.

    The stream, rotated by an offset drawn from the seed, is cut into batch_size contiguous lanes whose lengths
    differ by at most one token (no remainder is dropped). Row b reads lane b front to back and, at the lane's
    end, carries straight on from its start: every token is read exactly once per pass, in order, whatever the
    window lengths (phase-1 windows are bag x longer) and wherever a resume happens. The whole position is one
    integer, the tokens each lane has read. In a distributed run every rank builds the same global lanes and reads
    only its own (``lanes``), so the global batch, and a resume at another world size, stay exactly the same.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seed: int, lanes: range | None = None) -> None:
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
        n = len(stream)
        base, extra = divmod(n, batch_size)
        self.lane_lens = np.array([base + (b < extra) for b in range(batch_size)], dtype=np.int64)
        rotation = int(np.random.default_rng(seed).integers(n))
        self.lane_starts = (rotation + np.concatenate([[0], np.cumsum(self.lane_lens)[:-1]])) % n
        self.lanes = range(batch_size) if lanes is None else lanes
        if not self.lanes or self.lanes.start < 0 or self.lanes.stop > batch_size:
            raise SuperposeError(f"lanes {self.lanes} are not a part of a batch of {batch_size}")
        self._position = 0

    @property
    def position(self) -> int:
        """Tokens each lane has read so far (all lanes advance together)."""
        return self._position

    @property
    def epoch(self) -> int:
        """Completed passes of the shortest lane: every token has been read ``epoch`` times at least."""
        return self._position // int(self.lane_lens.min())

    @property
    def tokens_consumed(self) -> int:
        """Text tokens returned so far, over all passes."""
        return self._position * self.batch_size

    def offsets(self, window_len: int) -> np.ndarray:
        """Stream positions [lanes, window_len] the next batch will hold (for accounting; reads nothing)."""
        steps = self._position + np.arange(window_len)
        starts, lens = self.lane_starts[self.lanes, None], self.lane_lens[self.lanes, None]
        return (starts + steps[None, :] % lens) % len(self.stream)

    def next_batch(self, window_len: int) -> torch.Tensor:
        """The next window of each of this loader's lanes: a LongTensor [len(lanes), window_len]."""
        check_window(self.stream, self.batch_size, window_len)
        rows = [self._read_lane(b, window_len) for b in self.lanes]
        self._position += window_len
        return torch.from_numpy(np.stack(rows))

    def _read_lane(self, lane: int, length: int) -> np.ndarray:
        """Read ``length`` tokens of a lane from the current position, wrapping at the lane's end."""
        lane_len = int(self.lane_lens[lane])
        at = self._position % lane_len
        head = min(length, lane_len - at)
        parts = [self._read_cyclic(int(self.lane_starts[lane]) + at, head)]
        if head < length:
            parts.append(self._read_cyclic(int(self.lane_starts[lane]), length - head))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _read_cyclic(self, start: int, length: int) -> np.ndarray:
        """Read with wrap-around, because the seed's rotation lets a lane run past the stream's end."""
        n = len(self.stream)
        start %= n
        head = min(length, n - start)
        if head == length:
            return self.stream.read(start, length)
        return np.concatenate([self.stream.read(start, head), self.stream.read(0, length - head)])

    def state_dict(self) -> dict[str, int]:
        """Plain ints for a checkpoint; loading them makes the next batches identical to an uninterrupted run."""
        return {"seed": self.seed, "batch_size": self.batch_size, "stream_tokens": len(self.stream),
                "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position; refuse state from a different stream, batch size or seed (it would not line up)."""
        for key, ours in (("seed", self.seed), ("batch_size", self.batch_size), ("stream_tokens", len(self.stream))):
            if state.get(key) != ours:
                raise SuperposeError(
                    f"data loader state is for {key} {state.get(key)}, but this run has {key} {ours}"
                )
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise SuperposeError(f"data loader state is corrupt: position {position!r}")
        self._position = position


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
