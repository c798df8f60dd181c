"""The run configuration's schema: typed dataclasses, each section validating itself, saved beside every run.

This file is the reference of the config: each field's docstring is its meaning (``superpose config`` and
docs/config.md print them, :mod:`.config_docs`). A config file mirrors the dataclass tree (``[model]``, ``[data]``,
``[tst]``, ...); :mod:`.config_load` reads it (overrides, exclusive choices, types) and calls
:meth:`RunConfig.validate`, which raises :class:`SuperposeError` naming the key before anything is written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import keyword
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from tokenizers import Tokenizer
from transformers import PretrainedConfig

from ..data.shards import check_same_vocab
from ..data.tokenizer import load_tokenizer
from ..errors import SuperposeError
from ..method import MODES, WEIGHTINGS
from ..models import custom_config, get_preset, model_config, pretrained_config
from ..schedule import PhaseSchedule, Stage, two_phase_stages, wsd_decay_start


def toml_key(name: str) -> str:
    """A field's key in a config file: a field named for a Python keyword carries a trailing underscore
    (``async_``), its key does not (``checkpoint.async``)."""
    stem = name.removesuffix("_")
    return stem if keyword.iskeyword(stem) else name


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SuperposeError(message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


DEFAULT_PRESET = "tiny"


@dataclass
class ModelConfig:
    preset: str = ""
    """Named model shape (see ``superpose presets``); the vocabulary size comes from the prepared data. Default tiny
    unless config or init_from gives the architecture."""
    config: str = ""
    """Any transformers causal LM instead of a preset: a config.json, a folder holding one, or a hub name; seeded
    init, vocabulary cut to the data's (docs/models.md)."""
    init_from: str = ""
    """Continue pretraining a transformers model folder (config.json, safetensors, optionally tokenizer.json, which
    must match the data's): its architecture and weights replace the preset and the seeded init; --resume takes the
    weights from the checkpoint instead."""
    overrides: dict = field(default_factory=dict)
    """Shape fields to change, e.g. ``{hidden_size = 256, intermediate_size = 768}`` (width studies): preset fields,
    or fields of the config that model.config / model.init_from gives."""

    def __post_init__(self) -> None:
        if not (self.preset or self.config or self.init_from):
            self.preset = DEFAULT_PRESET

    def validate(self) -> None:
        given = [key for key in ("preset", "config", "init_from") if getattr(self, key)]
        _require(len(given) == 1, f"{' and '.join('model.' + key for key in given)} exclude each other; give one "
                                  f"of them")
        _require("vocab_size" not in self.overrides,
                 "model.overrides.vocab_size: the vocabulary size comes from the prepared data")
        if self.preset:
            get_preset(self.preset, **self.overrides)  # a known preset, overrides of the right types and ranges
        if self.init_from:
            folder = Path(self.init_from).expanduser()
            _require((folder / "config.json").is_file(),
                     f"model.init_from: {self.init_from} is not a model folder (it holds no config.json)")

    def build_config(self, vocab_size: int) -> PretrainedConfig:
        """The transformers config of this section at the data's vocabulary size: one place for every caller."""
        if self.init_from:
            return pretrained_config(self.init_from, vocab_size, self.overrides)
        if self.config:
            return custom_config(self.config, vocab_size, self.overrides)
        return model_config(self.preset, vocab_size, **self.overrides)

    def check_tokenizer(self, tokenizer: Tokenizer, data_path: Path) -> None:
        """init_from's tokenizer.json, when the folder has one, must be the data's: token ids mean the same then."""
        own = Path(self.init_from).expanduser() / "tokenizer.json"
        if self.init_from and own.is_file():
            check_same_vocab(load_tokenizer(str(own)), tokenizer, f"model.init_from {own}", data_path)

    def describe(self) -> str:
        """Where the architecture comes from, for run.json and messages."""
        return next(f"{key} {value}" for key in ("init_from", "config", "preset") if (value := getattr(self, key)))


@dataclass
class DataConfig:
    path: str = "data/embedded"
    """Folder written by ``superpose prepare``."""
    sources: list = field(default_factory=list)
    """A mixture instead of ``path``: ``[{path = "a", weight = 0.7}, {path = "b", weight = 0.3}]`` (optional
    ``name``, default the folder's name); each batch row comes from one source, in the weights' proportions."""
    tokenizer: str = ""
    """Optional tokenizer to check against the shards (a tokenizer.json, a folder, or a hub name)."""

    def validate(self) -> None:
        for i, entry in enumerate(self.sources):
            key = f"data.sources[{i}]"
            _require(isinstance(entry, dict), f"{key}: expected a table {{path, weight}}, got {entry!r}")
            unknown = sorted(set(entry) - {"path", "weight", "name"})
            _require(not unknown, f"unknown config key {key}.{(unknown or [''])[0]} (known: name, path, weight)")
            _require(isinstance(entry.get("path"), str) and bool(entry["path"]),
                     f"{key}.path: must be a prepared dataset folder, got {entry.get('path')!r}")
            weight = entry.get("weight")
            _require(not isinstance(weight, bool) and _finite(weight) and weight > 0,
                     f"{key}.weight: must be a finite number > 0, got {weight!r}")
            name = _source_name(entry)
            _require(isinstance(name, str) and bool(name) and not any(c in name for c in "/\\\0 \t\n"),
                     f"{key}.name: {name!r} is not a plain name (it keys the source's metrics); set name = \"...\"")
        names = [name for name, _, _ in self.mixture()]
        _require(len(set(names)) == len(names),
                 f"data.sources: names {names} repeat; give each source its own name = \"...\"")

    def mixture(self) -> list[tuple[str, str, float]]:
        """(name, path, weight) of each source: the ``sources``, or ``path`` as the one source of weight 1."""
        sources = self.sources or [{"path": self.path, "weight": 1.0}]
        return [(_source_name(entry), entry["path"], entry["weight"]) for entry in sources]


def _source_name(entry: dict[str, Any]) -> Any:
    """A source's metrics name: its ``name``, else its folder's name."""
    return entry.get("name", Path(entry["path"]).name)


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

    def validate(self) -> None:
        _require(self.bag >= 1, f"tst.bag: must be >= 1, got {self.bag}")
        _require(0.0 <= self.ratio <= 1.0, f"tst.ratio: must be in [0, 1], got {self.ratio}")
        _require(self.mode in MODES, f"tst.mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        _require(self.rewarmup_steps >= 0, f"tst.rewarmup_steps: must be >= 0, got {self.rewarmup_steps}")
        _require(self.weighting in WEIGHTINGS,
                 f"tst.weighting: must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        _require(_finite(self.alpha), f"tst.alpha: must be a finite number, got {self.alpha}")

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
    lr_schedule: str = "wsd"
    """wsd (warmup-stable-decay) or cosine, spanning the whole run across phases."""
    warmup_steps: int = 50
    """Linear warmup steps at the start of the run."""
    decay_fraction: float = 0.2
    """WSD: fraction of the run spent decaying at the end."""

    def validate(self, steps: int) -> None:
        """Ranges AdamW would only reject later, and a warmup that must end before the decay starts."""
        _require(_finite(self.lr) and self.lr > 0, f"optim.lr: must be a finite number > 0, got {self.lr}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        _require(_finite(self.weight_decay) and self.weight_decay >= 0,
                 f"optim.weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"optim.{key}: must be in [0, 1), got {value}")
        _require(_finite(self.eps) and self.eps > 0, f"optim.eps: must be a finite number > 0, got {self.eps}")
        _require(_finite(self.grad_clip) and self.grad_clip >= 0,
                 f"optim.grad_clip: must be a finite number >= 0 (0 = off), got {self.grad_clip}")
        _require(self.lr_schedule in ("wsd", "cosine"),
                 f"optim.lr_schedule: must be wsd or cosine, got {self.lr_schedule!r}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        _require(0.0 <= self.decay_fraction <= 1.0,
                 f"optim.decay_fraction: must be in [0, 1], got {self.decay_fraction}")
        decay_start = wsd_decay_start(steps, self.decay_fraction) if self.lr_schedule == "wsd" else steps
        _require(self.warmup_steps == 0 or self.warmup_steps < decay_start,
                 f"optim.warmup_steps: {self.warmup_steps} does not end before the LR decay starts at step "
                 f"{decay_start} of {steps}; shorten the warmup or lengthen the run")


@dataclass
class TrainConfig:
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
    """torch.compile each transformer block (blocks see L positions in every phase, so they compile once), and the
    fused loss's per-chunk function when loss_chunk > 0."""
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
    replicas: int = 1
    """Under torchrun with fsdp: HSDP with this many replica groups (e.g. nodes), each sharding the model; 1 = FSDP."""
    eval_micro_batch_size: int = 0
    """Sequences per no-grad validation forward on each rank; 0 = twice micro_batch_size (no activations are kept)."""
    profile_steps: int = 0
    """Trace this many steps (after one warm-up step) with torch.profiler into the run folder's profile/; 0 = off."""
    collective_timeout: int = 300
    """Seconds a collective may wait once the first step is done, so a hung rank fails the job in minutes; start-up
    and the first step keep torch's default (10 min NCCL, 30 min gloo). 0 = torch's default throughout."""
    gc_every: int = 50
    """Python's garbage collection on every rank at once every N steps, automatic collection off while training (a
    rank collecting on its own stalls every other rank at the next collective); 0 = Python's own collector."""
    stop_at: int = 0
    """End this process after this step, with a checkpoint kept forever (--resume continues); the LR and phase
    schedules still span train.steps. A planned comparison's trunk segments; 0 = run to train.steps."""

    def validate(self, world_size: int) -> None:
        for key in ("steps", "batch_size", "seq_len", "log_every", "max_skips", "replicas"):
            _require(getattr(self, key) >= 1, f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("micro_batch_size", "eval_micro_batch_size", "profile_steps", "loss_chunk", "collective_timeout",
                    "gc_every"):
            _require(getattr(self, key) >= 0, f"train.{key}: must be >= 0, got {getattr(self, key)}")
        _require(world_size % self.replicas == 0,
                 f"train.replicas: {self.replicas} does not divide the world size {world_size}")
        _require(self.batch_size % world_size == 0,
                 f"train.batch_size: {self.batch_size} is not divisible by the world size {world_size}")
        local = self.batch_size // world_size
        _require(local % (self.micro_batch_size or local) == 0,
                 f"train.micro_batch_size: {self.micro_batch_size} does not divide the per-rank batch {local}")
        _require(self.parallel in ("fsdp", "ddp"), f"train.parallel: must be fsdp or ddp, got {self.parallel!r}")
        _require(self.dtype in ("auto", "fp32", "bf16"), f"train.dtype: must be auto, fp32 or bf16, got {self.dtype!r}")
        _require(self.nonfinite in ("skip", "stop"), f"train.nonfinite: must be skip or stop, got {self.nonfinite!r}")
        _require(0 <= self.stop_at <= self.steps,
                 f"train.stop_at: must be a step from 1 to train.steps ({self.steps}), or 0 (off); got {self.stop_at}")


@dataclass
class EvalConfig:
    every: int = 100
    """Validation next-token loss every N steps (and at the end); 0 = only at the end."""
    batches: int = 8
    """Fixed held-out batches (of train.batch_size windows of L+1 tokens), the same at any world size."""

    def validate(self) -> None:
        _require(self.every >= 0, f"eval.every: must be >= 0, got {self.every}")
        _require(self.batches >= 1, f"eval.batches: must be >= 1, got {self.batches}")


@dataclass
class CheckpointConfig:
    every: int = 500
    """Checkpoint every N steps (and at every phase switch and at the end); 0 = only those."""
    keep: int = 3
    """Periodic checkpoints kept (phase-switch and final checkpoints are always kept)."""
    keep_steps: list[int] = field(default_factory=list)
    """Steps that also write a checkpoint kept forever, e.g. a planned comparison's trunk at its fork steps (so
    forks can start from them while it runs on)."""
    fork_from: str = ""
    """A checkpoint folder to start from when the run folder holds none yet (a planned comparison's baseline forked
    from its trunk); once the run has its own checkpoint, --resume continues that one."""
    async_: bool = True
    """Write sharded (DCP) checkpoints in the background: each rank copies its shards to CPU memory and training
    goes on while a thread writes, hashes and renames the checkpoint into place; at most one is in flight, and a
    stop or the end of the run waits for it. DCP writes every checkpoint of a multi-process run and of FSDP2 on one
    GPU; a one-process safetensors checkpoint is always written in place. false: training waits for each one."""

    def validate(self) -> None:
        _require(self.every >= 0, f"checkpoint.every: must be >= 0, got {self.every}")
        _require(self.keep >= 1, f"checkpoint.keep: must be >= 1, got {self.keep}")
        _require(all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.keep_steps),
                 f"checkpoint.keep_steps: must be steps >= 1, got {self.keep_steps}")


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Mirror the metrics rows to TensorBoard under the run folder's tb/ (metrics.jsonl is always written)."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'superpose[wandb]'; WANDB_MODE=offline logs without a network)."""
    wandb_project: str = "superpose"
    """W&B project; the W&B run is named after the run folder and resumes with it."""

    def validate(self) -> None:
        _require(not self.wandb or importlib.util.find_spec("wandb") is not None,
                 "log.wandb: wandb is not installed (pip install 'superpose[wandb]')")


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
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def local_batch_size(self, world_size: int) -> int:
        """Sequences of the global batch that one rank trains on."""
        return self.train.batch_size // world_size

    def micro_batch_size(self, world_size: int) -> int:
        """Sequences per forward/backward on one rank."""
        return self.train.micro_batch_size or self.local_batch_size(world_size)

    def phase_schedule(self) -> PhaseSchedule:
        try:
            return PhaseSchedule(self.tst.stages(), self.train.steps)
        except (TypeError, ValueError) as e:
            raise SuperposeError(f"tst: {e}") from None

    def validate(self, world_size: int = 1) -> PhaseSchedule:
        """Check what types cannot, section by section; raise a one-line SuperposeError naming the key.

        ``world_size`` is the job's process count, read once at start-up (batch sizes must divide over it). Returns
        the phase schedule the check built, for the caller to hand on rather than build again.
        """
        _require(bool(self.name) and not any(c in self.name for c in "/\\\0") and self.name not in (".", ".."),
                 f"name: {self.name!r} is not a plain folder name")
        _require("\0" not in self.out_dir, f"out_dir: {self.out_dir!r} holds a NUL byte")
        self.model.validate()
        self.data.validate()
        self.tst.validate()
        self.train.validate(world_size)
        self.optim.validate(self.train.steps)
        self.eval.validate()
        self.checkpoint.validate()
        self.log.validate()
        return self.phase_schedule()

    def to_dict(self) -> dict[str, Any]:
        """The config as TOML-ready tables; a multi-stage ``tst.schedule`` leaves out the bag/ratio it replaces."""
        data = dataclasses.asdict(self)
        for name, table in data.items():
            if dataclasses.is_dataclass(getattr(self, name)):
                data[name] = {toml_key(key): value for key, value in table.items()}
        if self.tst.schedule:
            del data["tst"]["bag"], data["tst"]["ratio"]
        if self.data.sources:
            del data["data"]["path"]
        return data

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())
