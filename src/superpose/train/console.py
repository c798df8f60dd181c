"""What a person watching a run sees: a progress bar on a terminal, plain log lines everywhere else.

Validation losses, phase switches (with the loss spike), skipped updates and epochs are printed as lines in every
mode, ``--quiet`` included, so a log file of a batch job reads as a log, not as ``\\r``-joined progress bars; the
callbacks that notice them (train/callbacks.py) say them here.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


class Console:
    """One voice per job (rank 0): ``say`` prints a line, ``progress`` updates the bar or, off a terminal, prints a
    line per logged step when progress is on."""

    def __init__(self, name: str, total: int, initial: int, progress: bool, is_main: bool):
        self.is_main = is_main
        self.progress_on = progress and is_main
        self.interactive = self.progress_on and sys.stderr.isatty()
        self.total = total
        self._bar = tqdm(total=total, initial=initial, desc=name, disable=not self.interactive, dynamic_ncols=True)

    def say(self, message: str) -> None:
        if self.is_main:  # tqdm.write keeps the bar intact and prints even when the bar is disabled
            self._bar.write(message, file=sys.stderr if self.interactive else sys.stdout)

    def progress_only(self, step: int) -> None:
        """Advance the bar to ``step`` (every step; a logged step then shows its numbers)."""
        if self.interactive:
            self._bar.update(step - self._bar.n)

    def progress(self, row: dict[str, Any]) -> None:
        """A logged step: its numbers on the bar, or a plain line off a terminal. A first step's row has no rate
        (callbacks.Throughput leaves warm-up out)."""
        rate = f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else None
        if self.interactive:
            postfix = {"phase": row["phase"], "bag": row["bag"], "loss": f"{row['train_loss']:.3f}"}
            postfix |= ({"tok/s": rate} if rate else {}) | ({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {})
            self._bar.update(row["step"] - self._bar.n)
            self._bar.set_postfix(postfix)
        elif self.progress_on:
            self.say(f"step {row['step']}/{self.total}: phase {row['phase']} bag {row['bag']} "
                     f"loss {row['train_loss']:.4f} lr {row['lr']:.2e}" + (f" {rate} tok/s" if rate else ""))

    def close(self) -> None:
        self._bar.close()
