"""Metrics sinks: one JSON line per logged step (the record compare/plots read), TensorBoard and W&B scalars."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

from ..errors import SuperposeError
from ..files import write_atomic
from .config import LogConfig

WANDB_ID_FILE = "wandb-id.txt"

# Dashboard tags, grouped the way people look at a run; metrics.jsonl keeps the flat keys.
_GROUPS = {"train_loss": "train/loss", "val_loss": "eval/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "aux_loss": "train/aux_loss", "skipped": "train/skipped", "skipped_total": "train/skipped_total",
           "bag": "tst/bag", "phase": "tst/phase", "text_tokens": "progress/text_tokens", "flops": "progress/flops",
           "epoch": "progress/epoch", "wall_time": "progress/wall_time", "tokens_per_s": "perf/text_tokens_per_s",
           "positions_per_s": "perf/positions_per_s", "step_time": "perf/step_time", "mfu": "perf/mfu",
           "peak_memory_gb": "perf/peak_memory_gb", "expert_load_max": "moe/expert_load_max",
           "expert_load_cv": "moe/expert_load_cv"}
# A data mixture's per-source keys, ``<metric>/<source name>``.
_PER_SOURCE = {"text_tokens": "data/tokens", "share": "data/share", "windows": "data/windows", "epoch": "data/epoch",
               "val_loss": "eval/loss"}


def dashboard_tag(key: str) -> str:
    """The TensorBoard/W&B tag of a metrics key (unknown keys go under ``train/``)."""
    metric, _, source = key.partition("/")
    if source and metric in _PER_SOURCE:
        return f"{_PER_SOURCE[metric]}/{source}"
    return _GROUPS.get(key, f"train/{key}")


def _hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened to ``section.key`` scalars (lists and tables as text), for the hyper-parameter views."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "overrides":
            flat.update(_hparams(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


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
            write_atomic(self.path, "".join(_json_line(r) for r in rows))  # a kill here loses nothing
        elif resume_step is None:
            self.path.write_text("")
        self._file = self.path.open("a")
        self._tb = None
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)
            if config is not None and resume_step is None:
                self._write_hparams(_hparams(config))
        self._wandb = _start_wandb(Path(run_dir), log.wandb_project, config, resume_step is not None) if log.wandb else None

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(_json_line(row))
        self._file.flush()
        scalars = {dashboard_tag(k): v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, row["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        """The run's hyper-parameters in TensorBoard's HPARAMS view, keyed to ``eval/loss``, in the run's own log."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for summary in hparams_summary(hparams, {"eval/loss": float("nan")}):
            self._tb.file_writer.add_summary(summary)

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


def _json_line(row: dict[str, Any]) -> str:
    """One row as strict JSON: a non-finite number (a skipped step's loss) is written as null, which any JSON reader
    takes, instead of the bare NaN/Infinity that Python's json writes and most others refuse."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def read_metrics(path: Path, partial_ok: bool = False) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` (a null number read back as NaN, as it was logged); ``partial_ok`` drops a last
    line cut short by a killed process."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append({k: math.nan if v is None else v for k, v in json.loads(line).items()})
        except json.JSONDecodeError:
            if not (partial_ok and i == len(lines) - 1):
                raise
    return rows
