"""Evaluate a trained model the way the field does: lm-evaluation-harness tasks, and perplexity / bits per byte.

Downstream tasks go through ``lm_eval.simple_evaluate`` with the model in memory (``HFLM(pretrained=model)``), so a
run folder is evaluated without exporting it first. Bits per byte divide the summed next-token loss by the UTF-8 bytes
of the text it scored, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data.loader import validation_windows
from .data.shards import TokenDataset, open_dataset
from .errors import SuperposeError
from .export import load_model
from .train.distributed import resolve_device

PAPER_TASKS: tuple[str, ...] = ("hellaswag", "arc_easy", "arc_challenge", "mmlu")
"""The downstream tasks of the TST paper."""

RESULT_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")
"""What of ``simple_evaluate``'s answer goes to the JSON file (not the per-sample logs or the model object)."""


@lru_cache(maxsize=None)
def _builtin_task_manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_manager(tasks: list[str], include_path: str | Path | None = None) -> Any:
    """An lm-eval TaskManager that knows every name in ``tasks``; unknown names are a one-line error.

    Indexing lm-eval's built-in tasks reads ~15k YAML files (about 15 s), so when a local ``include_path`` holds every
    requested task, only that folder is indexed; anything else (a built-in task, a group) uses the full index.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise SuperposeError(f"--include-path {include_path} is not a folder")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
        manager = TaskManager(include_path=str(include_path))
    else:
        manager = _builtin_task_manager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SuperposeError(f"unknown lm-eval task {unknown[0]!r} (see `lm-eval ls tasks`, or pass --include-path)")
    return manager


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    manager: Any,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on an in-memory model; returns the JSON-ready part of lm-eval's results."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False)
    return {k: results[k] for k in RESULT_KEYS if k in results}


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: TokenDataset,
    seq_len: int = 256,
    batches: int = 8,
    batch_size: int = 8,
) -> dict[str, float]:
    """Next-token loss, perplexity and bits per byte on the validation split of a prepared corpus.

    The windows are the trainer's fixed validation windows (``seq_len + 1`` tokens from the start of the split), so at
    the run's ``seq_len``, batch and ``eval.batches`` the loss equals the trainer's ``val_loss``. Bytes are those of
    the scored (target) tokens decoded to text; EOS tokens score nats but count no bytes.
    """
    if dataset.tokenizer.get_vocab(with_added_tokens=True) != tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True):
        raise SuperposeError(f"the model's tokenizer does not match the tokenizer of {dataset.path}")
    nats, tokens, nbytes = 0.0, 0, 0
    for window in validation_windows(dataset.split("val"), batch_size, seq_len, batches):
        window = window.to(model.device)
        logits = model(input_ids=window[:, :-1]).logits
        targets = window[:, 1:]
        nats += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        nbytes += sum(len(dataset.tokenizer.decode(row.tolist(), skip_special_tokens=True).encode()) for row in targets)
    loss = nats / tokens
    return {"val_loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nats / (math.log(2) * nbytes),
            "tokens": tokens, "bytes": nbytes, "seq_len": seq_len}


def format_perplexity(result: dict[str, float]) -> str:
    return (f"validation: loss {result['val_loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
            f"{result['bits_per_byte']:.4f} bits/byte ({result['tokens']:,} tokens, {result['bytes']:,} bytes)")


def run_eval(
    source: str | Path,
    tasks: list[str],
    output: str | Path,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    data: str | Path | None = None,
    seq_len: int = 256,
    batches: int = 8,
    batch_size: int = 8,
    device: str = "auto",
) -> dict[str, Any]:
    """``superpose eval``: tasks and/or validation perplexity for a run, checkpoint or export; writes ``output``.

    Task names and the corpus are checked before the model is loaded, and the JSON is written only when all is done.
    """
    manager = task_manager(tasks, include_path) if tasks else None
    dataset = open_dataset(data) if data is not None else None
    model, tokenizer = load_model(source)
    model.to(resolve_device(device))
    report: dict[str, Any] = {"source": str(source)}
    if tasks:
        from lm_eval.utils import make_table

        report.update(evaluate_tasks(model, tokenizer, tasks, manager, limit, num_fewshot, batch_size))
        print(make_table(report))
        if report.get("groups"):
            print(make_table(report, "groups"))
    if dataset is not None:
        report["perplexity"] = perplexity(model, tokenizer, dataset, seq_len, batches, batch_size)
        print(format_perplexity(report["perplexity"]))
    Path(output).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
