"""Data mixtures: batches whose rows come from several prepared corpora in fixed proportions, counted exactly.

Each row (window) of a global batch is drawn from one source. Which one is decided by the Balinski–Young *quota
method* over the global window index: window ``g`` goes to the source with the largest ``w_k / (n_k + 1)`` among
those still below their upper quota (``n_k < p_k (g + 1)``, ``p_k = w_k / sum(w)``, ``n_k`` its windows so far), ties
broken by a seeded order of the sources. The method is house-monotone and stays within quota: after *any* number of
windows ``g`` each source has had ``floor(p_k g)`` or ``ceil(p_k g)`` of them. So the counts are exact to within one
window at every row of every batch, not just on average, and a batch holds ``p_k B`` rows give or take at most two.
The arithmetic is on exact integers (the float weights' exact ratios), so every rank and every resume agrees.

Each source keeps its own :class:`WindowLoader` order (own passes, own rotation and permutation), advanced by the
windows it was assigned; every rank computes the whole global batch's assignment and reads only its ``rows``, so the
batches are the same at any world size. The position is the per-source window counts and loader positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from superpose.data.loader import _MASK64, WindowLoader, _is_count, _splitmix64, batch_rows, check_window
from superpose.data.shards import TokenDataset, TokenStream, open_dataset
from superpose.errors import SuperposeError

_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class Source:
    """One corpus of a mixture: the name its metrics are logged under, its weight and its training stream."""

    name: str
    weight: float
    stream: TokenStream


def open_sources(paths: Sequence[str], tokenizer: str | None = None, verify: bool = True) -> list[TokenDataset]:
    """Open every source's prepared folder; all must share the first one's vocabulary (and ``tokenizer``, if given).

    Token ids only mean the same thing under the same tokenizer, so a mixture of two vocabularies is refused by the
    same check that guards a single dataset against a foreign tokenizer. ``verify``: as in ``open_dataset``.
    """
    first = open_dataset(paths[0], tokenizer=tokenizer, verify=verify)
    reference = str(first.path / first.meta["tokenizer"])
    return [first] + [open_dataset(path, tokenizer=reference, verify=verify) for path in paths[1:]]


def source_seed(seed: int, index: int) -> int:
    """Source ``index``'s loader seed: the run's seed for the first source (so one source orders its windows
    exactly as ``data.path`` does), a distinct one for each further source."""
    return (seed + index * _GOLDEN) & _MASK64


def _integer_weights(weights: Sequence[float]) -> list[int]:
    """Integers in exactly the weights' proportions (floats are binary fractions), so quotas never round."""
    fractions = [Fraction(w) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    return [int(f * scale) for f in fractions]


def proportions(weights: Sequence[float]) -> list[float]:
    """Each weight's share of their sum, exact until the final rounding: in [0, 1] for any finite positive weights,
    where float arithmetic overflows (``1.7e308 + 1.7e308``) or loses the small ones (``5e-324 / 1e308``)."""
    integers = _integer_weights(weights)
    total = sum(integers)
    return [float(Fraction(w, total)) for w in integers]


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The mean of ``values`` weighted by the mixture ``weights`` (keyed alike), e.g. the expected validation loss
    under the training mixture: finite for finite values, whatever the weights' magnitudes."""
    names = list(weights)
    return sum(p * values[name] for name, p in zip(names, proportions([weights[name] for name in names])))


class MixtureLoader:
    """Global batches mixing several sources by weight; the same interface as :class:`WindowLoader`.

    ``next_batch(window_len)`` returns this rank's ``rows`` of the next global batch, each row a window of one
    source; ``state_dict``/``load_state_dict`` round-trip the position (and the per-source counts, which are the
    run's data accounting); ``epoch`` is the passes completed by the most-read source.
    """

    def __init__(self, sources: Sequence[Source], batch_size: int, seed: int, rows: range | None = None) -> None:
        if not sources:
            raise SuperposeError("a data mixture needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise SuperposeError(f"data mixture source names must differ, got {names}")
        for s in sources:
            if isinstance(s.weight, bool) or not isinstance(s.weight, (int, float)) or not (
                    math.isfinite(s.weight) and s.weight > 0):
                raise SuperposeError(f"data mixture source {s.name!r}: weight must be a finite number > 0, got {s.weight!r}")
        self.sources = list(sources)
        self.loaders = [WindowLoader(s.stream, batch_size, source_seed(seed, k)) for k, s in enumerate(sources)]
        self.batch_size, self.seed = batch_size, seed
        self.rows = batch_rows(rows, batch_size)
        self._weights = _integer_weights([s.weight for s in sources])
        self._total = sum(self._weights)
        ties = [_splitmix64((_splitmix64(seed) + k) & _MASK64) for k in range(len(sources))]
        self._tie = [sorted(ties).index(t) for t in ties]  # a seeded order of the sources, for equal claims
        self.windows = [0] * len(sources)
        """Windows each source has given, over all ranks (the quota method's state)."""
        self.tokens = [0] * len(sources)
        """Text tokens each source has given, over all ranks."""

    @property
    def epoch(self) -> int:
        return max(loader.epoch for loader in self.loaders)

    def assign(self, count: int) -> np.ndarray:
        """The sources of the next ``count`` windows (indices into ``sources``), advancing the window counts."""
        which = np.empty(count, dtype=np.int64)
        n, w = self.windows, self._weights
        g = sum(n)
        for row in range(count):
            g += 1
            best = -1
            for k in range(len(w)):
                if n[k] * self._total >= w[k] * g:  # at its upper quota already
                    continue
                if best < 0 or (claim := w[k] * (n[best] + 1) - w[best] * (n[k] + 1)) > 0 or (
                        claim == 0 and self._tie[k] < self._tie[best]):
                    best = k
            n[best] += 1
            which[row] = best
        return which

    def next_batch(self, window_len: int) -> torch.Tensor:
        """This rank's ``rows`` of the next global batch: a LongTensor [len(rows), window_len], row by row from the
        source the quota method assigned it."""
        for source in self.sources:
            check_window(source.stream, self.batch_size, window_len)
        which = self.assign(self.batch_size)
        out = np.empty((len(self.rows), window_len), dtype=np.int64)
        for k, loader in enumerate(self.loaders):
            rows = np.flatnonzero(which == k)  # global rows of source k, in order: its next len(rows) windows
            if not len(rows):
                continue
            lo, hi = np.searchsorted(rows, [self.rows.start, self.rows.stop])
            out[rows[lo:hi] - self.rows.start] = loader.take(len(rows), window_len, range(lo, hi))
            self.tokens[k] += len(rows) * window_len
        return torch.from_numpy(out)

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint: per source its name, weight, counts and loader position."""
        return {"seed": self.seed, "batch_size": self.batch_size,
                "sources": [{"name": s.name, "weight": s.weight, "windows": n, "tokens": t, "loader": loader.state_dict()}
                            for s, n, t, loader in zip(self.sources, self.windows, self.tokens, self.loaders)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; refuse one from other sources, weights, seed or batch size (it would not line up)."""
        if not isinstance(state, dict) or "sources" not in state:
            raise SuperposeError("data loader state is not a mixture's: this run reads data.sources, the checkpoint "
                                 "was written by a data.path run (or is corrupt)")
        for key, ours in (("seed", self.seed), ("batch_size", self.batch_size)):
            if state.get(key) != ours:
                raise SuperposeError(f"data loader state is for {key} {state.get(key)}, but this run has {key} {ours}")
        saved = state["sources"]
        if not isinstance(saved, list) or not all(isinstance(s, dict) for s in saved):
            raise SuperposeError(f"data loader state is corrupt: sources {saved!r}")
        theirs, ours = [(s.get("name"), s.get("weight")) for s in saved], [(s.name, s.weight) for s in self.sources]
        if theirs != ours:
            raise SuperposeError(f"data loader state is for sources (name, weight) {theirs}, but this run has {ours}")
        windows, tokens = [s.get("windows") for s in saved], [s.get("tokens") for s in saved]
        g = sum(n for n in windows if _is_count(n))
        if not all(map(_is_count, windows + tokens)) or g % self.batch_size or any(
                abs(n * self._total - w * g) >= self._total for n, w in zip(windows, self._weights)):
            raise SuperposeError(f"data loader state is corrupt: source windows {windows}, tokens {tokens}")
        previous = [loader.state_dict() for loader in self.loaders]
        try:
            for loader, s in zip(self.loaders, saved):
                loader.load_state_dict(s.get("loader"))
        except SuperposeError:
            for loader, p in zip(self.loaders, previous):
                loader.load_state_dict(p)
            raise
        self.windows, self.tokens = list(windows), list(tokens)


def source_counts(state: dict) -> dict[str, dict[str, int]]:
    """Per source name: windows, text tokens and passes completed, read from a loader's ``state_dict`` (empty for
    a single-source :class:`WindowLoader`)."""
    return {s["name"]: {"windows": s["windows"], "tokens": s["tokens"], "epoch": s["loader"]["epoch"]}
            for s in state.get("sources", ())}
