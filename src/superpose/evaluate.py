"""Evaluate a trained model the way the field does: lm-evaluation-harness tasks, and perplexity / bits per byte.

Downstream tasks go through ``lm_eval.simple_evaluate`` with the model in memory (``HFLM(pretrained=model)``), so a
run folder is evaluated without exporting it first. Bits per byte divide the summed next-token loss by the UTF-8 bytes
of the text it scored, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import difflib
import inspect
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
from .files import first_line, write_atomic
from .train.distributed import resolve_device

PAPER_TASKS: tuple[str, ...] = ("hellaswag", "arc_easy", "arc_challenge", "mmlu")
"""The downstream tasks of the TST paper."""

RESULT_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")
"""What of ``simple_evaluate``'s answer goes to the JSON file (not the per-sample logs or the model object)."""


def require_lm_eval() -> None:
    """lm-evaluation-harness is an extra; without it, say how to install it instead of a traceback."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SuperposeError("lm-eval tasks need lm-evaluation-harness: pip install 'superpose[eval]' "
                             "(or evaluate only validation loss with --tasks none --data DIR)") from None


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``key=value,...`` (lm-eval's ``--model_args``) -> keyword arguments of lm-eval's ``HFLM``, checked by name.

    The model and tokenizer come from the source, so ``pretrained`` and ``tokenizer`` are refused, as is any name
    ``HFLM`` does not take (it would otherwise pass it on, or drop it, without a word).
    """
    if not text:
        return {}
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    try:
        args = simple_parse_args_string(text)
    except ValueError as e:
        raise SuperposeError(f"--model-args {text!r}: expected key=value,...: {first_line(e)}") from None
    accepted = set(inspect.signature(HFLM.__init__).parameters) - {"self", "pretrained", "tokenizer", "kwargs"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see the arguments of lm-eval's HFLM)"
        raise SuperposeError(f"--model-args: unknown key {unknown[0]!r}{hint}")
    return args


def default_output(source: str | Path) -> Path:
    """Where results go without ``--output``: inside a run folder, beside anything else (an export or a checkpoint
    stays exactly the folder that was written, ready to copy or upload)."""
    source = Path(source)
    if (source / "run.json").is_file():
        return source / "eval.json"
    return source.parent / f"{source.name}-eval.json"


def samples_path(output: str | Path) -> Path:
    """The per-sample log beside the results JSON (``--log-samples``)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.samples.jsonl")


def _check_writable(path: Path) -> None:
    """Refuse, before a long evaluation, a results file that could not be written (a read-only or missing folder)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".probe-{path.name}")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SuperposeError(f"cannot write {path}: {e.strerror or first_line(e)} "
                             "(choose another file with --output)") from None


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
    model_args: dict[str, Any] | None = None,
    log_samples: bool = False,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run lm-eval ``tasks`` on an in-memory model: the JSON-ready part of lm-eval's results, and the per-sample
    logs by task (empty unless ``log_samples``)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, **{"batch_size": batch_size, **(model_args or {})})
    except (TypeError, ValueError) as e:
        raise SuperposeError(f"--model-args: {first_line(e)}") from None
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=log_samples)
    return {k: results[k] for k in RESULT_KEYS if k in results}, results.get("samples", {})


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
    model_args: str | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """``superpose eval``: tasks and/or validation perplexity for a run, checkpoint or export; writes ``output``
    (and, with ``log_samples``, every scored sample to :func:`samples_path`).

    lm-eval, task names, model args, the corpus and the output folder are checked before the model is loaded, and
    the JSON is written only when all is done.
    """
    output = Path(output)
    if (model_args or log_samples) and not tasks:
        raise SuperposeError("--model-args and --log-samples apply to lm-eval tasks, and --tasks is none")
    if tasks:
        require_lm_eval()
    manager = task_manager(tasks, include_path) if tasks else None
    hflm_args = parse_model_args(model_args)
    dataset = open_dataset(data) if data is not None else None
    _check_writable(output)
    model, tokenizer = load_model(source)
    model.to(resolve_device(device))
    report: dict[str, Any] = {"source": str(source)}
    samples: dict[str, list[dict[str, Any]]] = {}
    if tasks:
        from lm_eval.utils import make_table

        results, samples = evaluate_tasks(model, tokenizer, tasks, manager, limit, num_fewshot, batch_size, hflm_args,
                                          log_samples)
        report.update(results)
        print(make_table(report))
        if report.get("groups"):
            print(make_table(report, "groups"))
    if dataset is not None:
        report["perplexity"] = perplexity(model, tokenizer, dataset, seq_len, batches, batch_size)
        print(format_perplexity(report["perplexity"]))
    try:
        if log_samples:
            lines = (json.dumps({"task": task, **sample}, default=str) for task in samples for sample in samples[task])
            write_atomic(samples_path(output), "".join(line + "\n" for line in lines))
        write_atomic(output, json.dumps(report, indent=2, default=str) + "\n")
    except OSError as e:
        raise SuperposeError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
    return report
