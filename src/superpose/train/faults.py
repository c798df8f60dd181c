"""What a long run must survive: signals asking it to stop, and (for tests) a kill at a named point.

``SUPERPOSE_KILL_AT=POINT:STEP`` makes the process SIGKILL itself when it reaches ``POINT`` at ``STEP``; the
crash-safety tests use it to die mid-step, mid-checkpoint-write and right at the phase switch, deterministically.
Points: ``step`` (after an optimizer step, before its checkpoint) and ``checkpoint`` (inside a checkpoint write,
after the weights and before the state that completes it).
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

    A second signal of the same kind while stopping is left to the default handler, so a user can still force it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
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
