"""The run configuration: typed dataclasses, loaded from TOML, validated once, saved beside every run.

A config file mirrors the dataclass tree (``[model]``, ``[data]``, ``[tst]``, ...). Unknown keys, wrong types and
impossible values raise :class:`SuperposeError` naming the key, before anything is written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import SuperposeError
from ..method import MODES, WEIGHTINGS
from ..schedule import PhaseSchedule, Stage, two_phase_stages

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Named model shape (see ``superpose presets``); the vocabulary size comes from the prepared data."""
    overrides: dict = field(default_factory=dict)
    """Preset shape fields to change, e.g. ``{hidden_size = 256, intermediate_size = 768}`` (width studies)."""


@dataclass
class DataConfig:
    path: str = "data/embedded"
    """Folder written by ``superpose prepare``."""
    tokenizer: str = ""
    """Optional tokenizer to check against the shards (a tokenizer.json, a folder, or a hub name)."""


@dataclass
class TSTConfig:
    bag: int = 4
    """Tokens averaged per position in the superposition phase (s); 1 = ordinary training."""
    ratio: float = 0.3
    """Fraction of optimizer steps trained in superposition (r)."""
    schedule: list = field(default_factory=list)
    """Multi-stage alternative to bag/ratio: ``[[until, bag], ...]``, until a step (int) or run fraction (float)."""
    mode: str = "both"
    """Objective: both (TST), input (bagged inputs, next-token CE) or output (token inputs, multi-hot CE)."""
    weighting: str = "uniform"
    """Target weights over positions in the next bag: uniform or power (``(k+1)**-alpha``)."""
    alpha: float = 1.0
    """Exponent of the power weighting."""
    rewarmup_steps: int = 0
    """Re-warm the LR linearly over this many steps after each bag switch (softens the switch); 0 = off."""
    rescale_mean: bool = False
    """Rescale each bag mean to the mean norm of its token embeddings (averaging shrinks it); off by default."""

    def stages(self) -> list[Stage]:
        if self.schedule:
            return [Stage(*s) for s in self.schedule]
        return two_phase_stages(self.bag, self.ratio)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of the peak."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms or biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    schedule: str = "wsd"
    """wsd (warmup-stable-decay) or cosine, spanning the whole run across phases."""
    warmup_steps: int = 50
    """Linear warmup steps at the start of the run."""
    decay_fraction: float = 0.2
    """WSD: fraction of the run spent decaying at the end."""


@dataclass
class TrainSection:
    steps: int = 1000
    """Optimizer steps, both phases together."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on each rank; 0 = this rank's share of batch_size (no accumulation)."""
    seq_len: int = 128
    """Transformer positions per sequence (L); phase 1 reads (L+1)*bag tokens per sequence."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16."""
    compile: bool = False
    """torch.compile each transformer block (blocks see L positions in every phase, so they compile once)."""
    parallel: str = "fsdp"
    """Under torchrun: fsdp (FSDP2 fully_shard per block, bf16 params on CUDA) or ddp."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, ~30% more compute)."""
    loss_chunk: int = 0
    """Fuse the LM head with the multi-hot loss over chunks of this many positions (0 = full logits)."""
    log_every: int = 10
    """Write a metrics row every N steps (eval steps, phase switches and the last step always)."""
    nonfinite: str = "skip"
    """A non-finite loss or gradient: skip the update (logged, counted) or stop with a checkpoint of the last good state."""
    max_skips: int = 5
    """Stop after this many consecutive skipped updates."""


@dataclass
class EvalConfig:
    every: int = 100
    """Validation next-token loss every N steps (and at the end); 0 = only at the end."""
    batches: int = 8
    """Fixed held-out batches (of train.batch_size windows of L+1 tokens), the same at any world size."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Checkpoint every N steps (and at every phase switch and at the end); 0 = only those."""
    keep: int = 3
    """Periodic checkpoints kept (phase-switch and final checkpoints are always kept)."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Mirror the metrics rows to TensorBoard under the run folder's tb/ (metrics.jsonl is always written)."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'superpose[wandb]'; WANDB_MODE=offline logs without a network)."""
    wandb_project: str = "superpose"
    """W&B project; the W&B run is named after the run folder and resumes with it."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run folder name under out_dir."""
    out_dir: str = "runs"
    """Folder holding run folders."""
    seed: int = 0
    """Seeds the initialisation and the data order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tst: TSTConfig = field(default_factory=TSTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def local_batch_size(self) -> int:
        """Sequences of the global batch that one rank trains on."""
        return self.train.batch_size // world_size()

    @property
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size or self.local_batch_size

    def phase_schedule(self) -> PhaseSchedule:
        try:
            return PhaseSchedule(self.tst.stages(), self.train.steps)
        except (TypeError, ValueError) as e:
            raise SuperposeError(f"tst: {e}") from None

    def validate(self) -> "RunConfig":
        """Check values that types cannot; raise a one-line SuperposeError naming the key."""
        checks: list[tuple[bool, str]] = [
            (bool(self.name) and "/" not in self.name and self.name not in (".", ".."), f"name: {self.name!r} is not a plain folder name"),
            (self.tst.bag >= 1, f"tst.bag: must be >= 1, got {self.tst.bag}"),
            (0.0 <= self.tst.ratio <= 1.0, f"tst.ratio: must be in [0, 1], got {self.tst.ratio}"),
            (self.tst.mode in MODES, f"tst.mode: must be one of {', '.join(MODES)}, got {self.tst.mode!r}"),
            (self.tst.rewarmup_steps >= 0, f"tst.rewarmup_steps: must be >= 0, got {self.tst.rewarmup_steps}"),
            (self.tst.weighting in WEIGHTINGS, f"tst.weighting: must be one of {', '.join(WEIGHTINGS)}, got {self.tst.weighting!r}"),
            (self.optim.lr > 0, f"optim.lr: must be > 0, got {self.optim.lr}"),
            (0.0 <= self.optim.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: must be in [0, 1], got {self.optim.min_lr_ratio}"),
            (self.optim.schedule in ("wsd", "cosine"), f"optim.schedule: must be wsd or cosine, got {self.optim.schedule!r}"),
            (self.optim.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {self.optim.warmup_steps}"),
            (0.0 <= self.optim.decay_fraction <= 1.0, f"optim.decay_fraction: must be in [0, 1], got {self.optim.decay_fraction}"),
            (self.optim.grad_clip >= 0, f"optim.grad_clip: must be >= 0, got {self.optim.grad_clip}"),
            (self.train.steps >= 1, f"train.steps: must be >= 1, got {self.train.steps}"),
            (self.train.batch_size >= 1, f"train.batch_size: must be >= 1, got {self.train.batch_size}"),
            (self.train.micro_batch_size >= 0, f"train.micro_batch_size: must be >= 0, got {self.train.micro_batch_size}"),
            (self.train.batch_size % world_size() == 0,
             f"train.batch_size: {self.train.batch_size} is not divisible by the world size {world_size()}"),
            (self.local_batch_size % self.micro_batch_size == 0 if self.micro_batch_size else False,
             f"train.micro_batch_size: {self.train.micro_batch_size} does not divide the per-rank batch "
             f"{self.local_batch_size}"),
            (self.train.parallel in ("fsdp", "ddp"), f"train.parallel: must be fsdp or ddp, got {self.train.parallel!r}"),
            (self.train.loss_chunk >= 0, f"train.loss_chunk: must be >= 0, got {self.train.loss_chunk}"),
            (self.train.seq_len >= 1, f"train.seq_len: must be >= 1, got {self.train.seq_len}"),
            (self.train.dtype in ("auto", "fp32", "bf16"), f"train.dtype: must be auto, fp32 or bf16, got {self.train.dtype!r}"),
            (self.train.log_every >= 1, f"train.log_every: must be >= 1, got {self.train.log_every}"),
            (self.train.nonfinite in ("skip", "stop"), f"train.nonfinite: must be skip or stop, got {self.train.nonfinite!r}"),
            (self.train.max_skips >= 1, f"train.max_skips: must be >= 1, got {self.train.max_skips}"),
            (self.eval.every >= 0, f"eval.every: must be >= 0, got {self.eval.every}"),
            (self.eval.batches >= 1, f"eval.batches: must be >= 1, got {self.eval.batches}"),
            (self.checkpoint.every >= 0, f"checkpoint.every: must be >= 0, got {self.checkpoint.every}"),
            (self.checkpoint.keep >= 1, f"checkpoint.keep: must be >= 1, got {self.checkpoint.keep}"),
        ]
        if self.log.wandb and importlib.util.find_spec("wandb") is None:
            checks.append((False, "log.wandb: wandb is not installed (pip install 'superpose[wandb]')"))
        for ok, message in checks:
            if not ok:
                raise SuperposeError(message)
        self.phase_schedule()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def world_size() -> int:
    """Processes in this job, as torchrun sets it (1 outside a distributed launch)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise SuperposeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against a field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SuperposeError(f"{key}: expected a table, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise SuperposeError(f"{key}: expected {_type_name(origin)}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SuperposeError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def _parse_value(text: str) -> Any:
    """A command-line override value, read as a TOML value (so 3, 0.3, true, [[0.3, 4]] work), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict (validated afterwards like the file)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SuperposeError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SuperposeError(f"override {item!r}: {part} is not a table")
        node[leaf] = _parse_value(text.strip())
    return data


def config_from_dict(data: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    return _from_dict(RunConfig, apply_overrides(data, list(overrides))).validate()


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML config, apply overrides, validate. All problems are one-line SuperposeErrors."""
    path = Path(path)
    if not path.is_file():
        raise SuperposeError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SuperposeError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(data, overrides)


def config_reference() -> str:
    """Every config key with its default and meaning, as Markdown, read from the dataclasses' field docstrings."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    sections = [(None, RunConfig)] + [(f.name, f.default_factory) for f in dataclasses.fields(RunConfig)
                                      if dataclasses.is_dataclass(f.default_factory)]
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in sections:
        defaults = cls()
        body = classes[cls.__name__].body
        for i, stmt in enumerate(body):
            if not isinstance(stmt, ast.AnnAssign) or dataclasses.is_dataclass(getattr(defaults, stmt.target.id)):
                continue
            nxt = body[i + 1] if i + 1 < len(body) else None
            doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else ""
            key = f"{section}.{stmt.target.id}" if section else stmt.target.id
            value = getattr(defaults, stmt.target.id)
            default = "{}" if value == {} else tomli_w.dumps({"v": value}).strip()[4:]
            lines.append(f"| `{key}` | `{default}` | {' '.join(doc.split())} |")
    return "\n".join(lines) + "\n"
