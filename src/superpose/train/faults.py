"""What a long run must survive: signals asking it to stop, and (for tests) a kill at a named point.

``SUPERPOSE_KILL_AT=POINT:STEP`` makes the process SIGKILL itself when it reaches ``POINT`` at ``STEP``; the
crash-safety tests use it to die mid-step, mid-checkpoint-write and right at the phase switch, deterministically.
Points: ``step`` (after an optimizer step, before its checkpoint), ``checkpoint`` (inside a checkpoint write,
after the weights and before the optimizer state) and ``manifest`` (after every file of the checkpoint but its
manifest, which completes it). Under ``checkpoint.async`` the last two are reached in the background thread that
finishes a DCP checkpoint, while the loop trains on.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

KILL_ENV = "SUPERPOSE_KILL_AT"


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process if the environment asks for a death at this point and step."""
    if os.environ.get(KILL_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class StopSignals:
    """Turn SIGTERM/SIGINT into a request the loop honours after the current step (checkpoint, then exit).

    Repeats of SIGTERM while the stop is in progress are ignored: SLURM signals every process of a job step and
    torchrun forwards its own copy, so a worker can receive two within milliseconds, and the default action of the
    second would kill it before its checkpoint. The hard deadline is the scheduler's SIGKILL, which no handler can
    delay. A second SIGINT is a person pressing Ctrl-C again: it gets the previous handler's answer
    (``KeyboardInterrupt`` by default), so the run ends at once without a new checkpoint; checkpoints are written
    atomically, so the last complete one is intact and ``--resume`` continues from it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEATS_IGNORED = (signal.SIGTERM,)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if signum not in self.REPEATS_IGNORED:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name
