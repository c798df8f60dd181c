"""Metrics sinks: one JSON line per logged step (the record compare/plots read), TensorBoard and W&B scalars."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from ..errors import SuperposeError
from .checkpoint import write_atomic
from .config import LogConfig

WANDB_ID_FILE = "wandb-id.txt"


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and mirrors numeric fields to TensorBoard (``tb/``) and W&B as ``log`` says.

    ``config`` (the run's config as a dict) is recorded with the W&B run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, log: LogConfig | None = None,
                 config: dict[str, Any] | None = None):
        log = log or LogConfig()
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Rows after the checkpoint were written by the interrupted run and will be written again.
            rows = [r for r in read_metrics(self.path, partial_ok=True) if r["step"] <= resume_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))  # a kill here loses nothing
        elif resume_step is None:
            self.path.write_text("")
        self._file = self.path.open("a")
        self._tb = None
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)
        self._wandb = _start_wandb(Path(run_dir), log.wandb_project, config, resume_step is not None) if log.wandb else None

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, row["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, project: str, config: dict[str, Any] | None, resume: bool) -> Any:
    """A W&B run writing under the run folder; its id is kept there so a resumed run continues the same W&B run.

    W&B drops the re-logged rows of a resumed run's replayed steps (its steps only increase): they repeat the same values.
    """
    try:
        import wandb
    except ImportError:
        raise SuperposeError("log.wandb = true needs the wandb package: pip install 'superpose[wandb]'") from None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config)


def read_metrics(path: Path, partial_ok: bool = False) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl``; ``partial_ok`` drops a last line cut short by a killed process."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not (partial_ok and i == len(lines) - 1):
                raise
    return rows
