"""The train state: every number a resume needs besides the weights and the optimizer, typed and checked.

It travels as ``state.json`` in each checkpoint. Training draws no random numbers after initialisation (no dropout;
the data order is a function of the seed and the loader position), so there is no RNG state to carry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import SuperposeError


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


_VALID = {"int": _count, "float": _seconds, "dict": lambda v: isinstance(v, dict)}  # by field annotation


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (the next step to train is ``step``, 0-based)."""
    text_tokens: int = 0
    """Corpus tokens read so far, over all ranks (phase 1 reads ``bag``x more per step)."""
    flops: int = 0
    """Model FLOPs spent so far (the same per step in every phase)."""
    wall_time: float = 0.0
    """Seconds of training so far, summed over restarts."""
    skipped: int = 0
    """Updates skipped because the loss or gradient was not finite."""
    skipped_in_row: int = 0
    """The current run of consecutive skipped updates (the non-finite policy stops at ``train.max_skips``)."""
    loader: dict = field(default_factory=dict)
    """The data loader's position (its own ``state_dict``); a mixture's also holds each source's windows and text
    tokens read so far, so a resume continues the per-source accounting exactly (``data.mixture.source_counts``)."""

    def advance(self, text_tokens: int, flops: int, wall_time: float) -> None:
        self.step += 1
        self.text_tokens += text_tokens
        self.flops += flops
        self.wall_time = wall_time

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, data: Any, where: str) -> "TrainState":
        """Parse a checkpoint's state; wrong types or impossible values are one-line errors naming ``where``."""
        if not isinstance(data, dict):
            raise SuperposeError(f"{where}: state.json holds {type(data).__name__}, not a table")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in ("skipped", "skipped_in_row"):  # absent from checkpoints of older runs
                    continue
                raise SuperposeError(f"{where}: state.json lacks {f.name}")
            value = data[f.name]
            if not _VALID[str(f.type)](value):
                raise SuperposeError(f"{where}: state.json field {f.name} is corrupt: {value!r}")
            values[f.name] = value
        return cls(**values)
