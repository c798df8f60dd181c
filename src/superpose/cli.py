"""The ``superpose`` command: a table of subcommands, each a thin call into the library."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .errors import SuperposeError
from .files import first_line


def _prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

    out = prepare(
        args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, text_field=args.text_field,
        val_fraction=args.val_fraction, seed=args.seed, max_bytes=args.max_bytes, hf_config=args.hf_config,
        hf_split=args.hf_split, progress=not args.quiet, keep_order=args.keep_order, encoding=args.encoding,
        errors=args.errors, workers=args.workers, ids_column=args.ids_column,
    )
    print(f"prepared {out}")
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from .train.config_load import load_config
    from .train.distributed import torchrun_env
    from .train.loop import train

    job = torchrun_env()
    cfg = load_config(args.config, args.overrides, world_size=job.world_size)
    result = train(cfg, resume=args.resume if args.resume is not None else False, progress=not args.quiet)
    if not job.is_main:  # under torchrun, rank 0 speaks for the job
        return 128 + signal.Signals[result.stopped].value if result.stopped else 0
    if result.stopped:
        print(f"{result.run_dir}: stopped by {result.stopped} after {result.steps} steps; a checkpoint was saved, "
              f"continue with --resume")
        return 128 + signal.Signals[result.stopped].value
    print(f"{result.run_dir}: {result.steps} steps, final val loss {result.final_val_loss:.4f}, "
          f"{result.text_tokens:,} text tokens, {result.wall_time:.0f}s")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, max_bytes=args.max_bytes, progress=not args.quiet)
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


_TITLES = {"compare": "TST vs baseline at matched FLOPs: {}", "sweep": "TST sweep over bag x ratio: {}"}


def _comparison_config(args: argparse.Namespace, tst: list[str]):
    """The run config; options not given on the command line come from its ``[compare]`` section, else defaults."""
    from .compare import load_comparison

    if args.config is None:
        raise SuperposeError(f"{args.command} needs a CONFIG" + (" (or --report PLAN_DIR)" if args.command == "compare"
                                                                 else ""))
    if args.plan is None and args.out is None:
        raise SuperposeError("--out is required (or --plan DIR, to write the runs as jobs)")
    base, section = load_comparison(args.config, [*args.overrides, *tst], args.command)
    for key, value in section.items():
        if getattr(args, key, value) is None:
            setattr(args, key, value)
    return base


def _runs(args: argparse.Namespace) -> Path:
    return Path(args.runs or Path(args.out) / "runs")


def _finish_report(args: argparse.Namespace, result, title: str, extra_md: str = "", extra_plots=()) -> int:
    import shlex

    from .compare import write_report

    path = write_report(result, Path(args.out), title, shlex.join(["superpose", *args.argv]), extra_md, extra_plots)
    print(f"\n{'variant':<28} {'final val loss':>16} {'iso-loss speedup':>18}")
    for x in result.summaries:
        print(f"{x['label']:<28} {x['final_val_loss_mean']:>16.4f} {x['speedup_text']:>18}")
    waiting = sum(s["state"] != "finished" for s in result.status)
    if waiting:
        print(f"{waiting} of {len(result.status)} runs not finished yet (see the report)")
    print(f"{result.recommendation}\n{result.standing}\nreport: {path}")
    return 0


def _plan(args: argparse.Namespace, base, variants, kind: str, extra: dict | None = None) -> int:
    from .compare import write_plan

    path = write_plan(Path(args.plan), base, variants, args.seeds, args.family, args.runs and Path(args.runs),
                      args.gpus, args.nodes, kind, extra)
    folder = path.parent
    print(f"planned {len(variants)} TST arm(s) x {args.seeds} seed(s) and the baseline family: {path}\n"
          f"  here:     {folder / 'run_local.sh'} [-j N]\n  torchrun: {folder / 'torchrun.sh'} JOB\n"
          f"  SLURM:    bash {folder / 'slurm.sh'} [SBATCH OPTIONS]\n"
          f"  report:   superpose compare --report {folder}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .compare import collect_plan, sweep_extras

    if args.config is not None or args.overrides or args.plan:
        raise SuperposeError("--report reads the plan folder's plan.json; give no CONFIG, overrides or --plan")
    result, plan = collect_plan(Path(args.report))
    args.out = args.out or str(Path(args.report) / "report")
    extra_md, extra_plots = "", []
    if plan["kind"] == "sweep":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        extra_md, extra_plots = sweep_extras(result, Path(args.out))
    return _finish_report(args, result, _TITLES[plan["kind"]].format(plan["base"]["name"]), extra_md, extra_plots)


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare, variants_for

    if args.report:
        return _report(args)
    if args.schedule and (args.bag is not None or args.ratio is not None):
        raise SuperposeError("--schedule replaces --bag/--ratio; give one or the other")
    # an override's choice of schedule or bag/ratio replaces the config file's (train.config_load.config_from_dict)
    tst = [f"tst.schedule={args.schedule}"] if args.schedule else []
    tst += [f"tst.{key}={value}" for key, value in (("bag", args.bag), ("ratio", args.ratio)) if value is not None]
    base = _comparison_config(args, tst)
    variants = variants_for(base, args.ablation)
    if args.plan:
        return _plan(args, base, variants, "compare")
    result = compare(base, variants, args.seeds, args.family, _runs(args), progress=not args.quiet)
    return _finish_report(args, result, _TITLES["compare"].format(base.name))


def _sweep(args: argparse.Namespace) -> int:
    from .compare import grid_variants, sweep, sweep_extras

    base = _comparison_config(args, [])
    if args.plan:
        variants, grid = grid_variants(base, args.bags, args.ratios)
        return _plan(args, base, variants, "sweep", {"grid": grid})
    result = sweep(base, args.bags, args.ratios, args.seeds, args.family, _runs(args), progress=not args.quiet)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    extra_md, extra_plots = sweep_extras(result, Path(args.out))
    return _finish_report(args, result, _TITLES["sweep"].format(base.name), extra_md, extra_plots)


def _config(args: argparse.Namespace) -> int:
    from .train.config_docs import config_reference

    print(config_reference(), end="")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .models import describe_presets

    print(describe_presets())
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    print(f"exported {export(args.source, args.out)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import Sampling, generate

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                        args.num_samples, tuple(args.stop), args.seed)
    texts = generate(args.source, args.prompt, sampling, args.device)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} of {len(texts)} ---")
        print(args.prompt + text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import default_output, run_eval

    tasks = [t for t in args.tasks.split(",") if t and t != "none"]
    if not tasks and args.data is None:
        raise SuperposeError("nothing to evaluate: --tasks none needs --data")
    output = args.output or default_output(args.source)
    run_eval(args.source, tasks, output, include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
             data=args.data, seq_len=args.seq_len, batches=args.val_batches, batch_size=args.batch_size,
             device=args.device, model_args=args.model_args, log_samples=args.log_samples)
    print(f"wrote {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superpose",
        description="Pretrain decoder-only language models with Token Superposition Training (TST).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize a corpus into training shards",
                       description="Read text files/folders, .jsonl/.parquet, a hub dataset name, or 'embedded' (the "
                                   "Python standard library, offline); train or load a tokenizer; write token shards, "
                                   "a validation split held out by document, and meta.json.")
    p.add_argument("sources", nargs="+", help="paths, hub dataset names, or 'embedded'")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--tokenizer", help="tokenizer.json, a folder with one, or a hub tokenizer name (default: train BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when training one (default 8192)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/hub rows")
    p.add_argument("--val-fraction", type=float, default=0.005, help="documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation hold-out and the document shuffle")
    p.add_argument("--keep-order", action="store_true",
                   help="keep the documents in reading order (default: shuffled with --seed, so shards, the "
                        "validation split and every batch mix the whole corpus)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of plain-text files (default utf-8)")
    p.add_argument("--errors", choices=("skip", "replace"), default="skip",
                   help="a file that does not decode: skip it (counted and named at the end) or replace the bad "
                        "bytes with U+FFFD (default skip)")
    p.add_argument("--max-bytes", type=int, help="stop reading after this many bytes of text")
    p.add_argument("--hf-config", help="hub dataset configuration name")
    p.add_argument("--hf-split", default="train", help="hub dataset split (default train)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that tokenize in parallel (default 1); the output is the same for any number")
    p.add_argument("--ids-column", help="pre-tokenized input: the column of token-id lists in parquet, a datasets "
                                        "folder or a hub dataset (.npy/.bin id files need none); needs --tokenizer")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train a model from a TOML config",
                       description="Train (or resume) a run. Overrides are key=value pairs in TOML syntax, e.g. "
                                   "train.steps=2000 tst.bag=8 'tst.schedule=[[0.1, 8], [0.3, 4], [1.0, 1]]'.")
    p.add_argument("config", help="TOML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the run's newest checkpoint, or from CHECKPOINT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_command)

    p = sub.add_parser("demo", help="baseline vs TST on the embedded corpus, on a CPU",
                       description="Prepare the embedded corpus (the Python standard library), train a tiny baseline "
                                   "and a tiny TST model at equal steps, batch and FLOPs per step, compare.")
    p.add_argument("--out", default="runs/demo", help="folder for the data and both runs (default runs/demo)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    p.add_argument("--max-bytes", type=int, default=12_000_000,
                   help="embedded corpus size (default 12 MB, so TST reads no token twice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)

    p = sub.add_parser("export", help="write a run as a plain Hugging Face model folder",
                       description="Write a run's newest checkpoint (or the given checkpoint, single-process or "
                                   "sharded) as config.json, model.safetensors, generation_config.json and tokenizer "
                                   "files that transformers loads alone (AutoModelForCausalLM, AutoTokenizer).")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder or checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", help="sample text from a run or an exported model",
                       description="Continue a prompt with model.generate (top-p/top-k sampling, repetition penalty, "
                                   "several samples, stop strings; temperature 0 is greedy).")
    p.add_argument("source", metavar="RUN_OR_EXPORT", help="run folder, checkpoint folder or exported model folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start a document)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens only; 0 = all (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1 discourages repeating tokens already present (default 1.0 = off)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations to sample (default 1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a continuation before this string (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="downstream tasks (lm-evaluation-harness) and validation perplexity",
                       description="Evaluate a run or an exported model on lm-eval tasks (the paper's by default; "
                                   "needs `pip install superpose[eval]`) and, with --data, validation perplexity and "
                                   "bits per byte on a prepared corpus. Results go to JSON and a printed table.")
    p.add_argument("source", metavar="RUN_OR_EXPORT", help="run folder, checkpoint folder or exported model folder")
    p.add_argument("--tasks", default="hellaswag,arc_easy,arc_challenge,mmlu",
                   help="comma-separated lm-eval tasks or groups, or 'none' (default: the paper's four)")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAML files")
    p.add_argument("--limit", type=float, help="examples per task (a count, or a fraction below 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--data", help="prepared corpus folder: also report validation loss, perplexity, bits per byte")
    p.add_argument("--seq-len", type=int, default=256, help="tokens of context per validation window (default 256)")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches of --batch-size windows (default 8)")
    p.add_argument("--model-args", metavar="KEY=VALUE,...",
                   help="lm-eval HFLM options, e.g. max_length=512,add_bos_token=True (as lm-eval's --model_args)")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every scored sample to OUTPUT's stem + .samples.jsonl")
    p.add_argument("--output", help="results JSON (default: RUN/eval.json for a run folder, and beside an export or "
                                    "checkpoint: NAME-eval.json)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.set_defaults(func=_eval)

    def comparison_options(p: argparse.ArgumentParser) -> None:
        from .compare import DEFAULT_FAMILY  # the pure part of compare: no torch at start-up

        p.add_argument("config", nargs="?", help="TOML config of the run to compare (see configs/; an optional "
                                                 "[compare] section gives this command's options, see configs/paper/)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for train")
        p.add_argument("--seeds", type=int, help="seeds per arm, each with its own baseline family "
                                                 "(report: mean and spread; default 1)")
        p.add_argument("--family", type=_floats,
                       help="baseline lengths as multiples of train.steps, must include 1 (default "
                            f"{','.join(f'{m:g}' for m in DEFAULT_FAMILY)})")
        p.add_argument("--out", help="folder for report.md, report.json and the plots (required unless --plan)")
        p.add_argument("--runs", help="folder of the runs (default OUT/runs, or PLAN/runs); finished runs with the "
                                      "same config are reused, so comparisons can share baselines")
        p.add_argument("--plan", metavar="DIR",
                       help="train nothing: write every run as a run config, plan.json (the dependency graph) and "
                            "launchers (run_local.sh, torchrun.sh, slurm.sh) into DIR (see docs/cluster.md)")
        p.add_argument("--gpus", type=int, help="with --plan: GPUs per node of each run (default 1)")
        p.add_argument("--nodes", type=int, help="with --plan: nodes of each run (default 1)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("compare", help="iso-loss speedup of TST over a baseline at matched FLOPs",
                       description="Train a baseline family (forked from one constant-LR trunk) and TST run(s) with "
                                   "the same model, init, batch, positions, optimizer and LR schedule; report the "
                                   "baseline steps, FLOPs and wall-clock that reach the TST final validation loss.")
    comparison_options(p)
    p.add_argument("--bag", type=int, help="TST bag size s (default: the config's tst.bag)")
    p.add_argument("--ratio", type=float, help="fraction of steps in superposition r (default: the config's)")
    p.add_argument("--schedule", help="multi-stage bags as TOML, e.g. '[[0.1, 8], [0.2, 4], [1.0, 1]]'")
    p.add_argument("--ablation", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                   help="objectives to run, comma-separated: both (TST), input, output (default both)")
    p.add_argument("--report", metavar="PLAN_DIR",
                   help="train nothing: collect the report of a --plan folder from whatever has finished (into "
                        "--out, default PLAN_DIR/report)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("sweep", help="compare over a grid of bag sizes x ratios, with heatmaps",
                       description="Run compare for every (bag, ratio) of the grid, sharing the baseline family; "
                                   "write a grid table and heatmaps of final loss and iso-loss speedup.")
    comparison_options(p)
    p.add_argument("--bags", type=_ints, help="bag sizes (default 2,4,8)")
    p.add_argument("--ratios", type=_floats, help="ratios (default 0.1,0.2,0.3)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("config", help="every config key with its default and meaning (Markdown)")
    p.set_defaults(func=_config)

    p = sub.add_parser("presets", help="list model presets with parameter counts")
    p.set_defaults(func=_presets)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, letting KEY=VALUE overrides follow options too (``train CFG --quiet train.steps=5``)."""
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(build_parser(), argv)
    args.argv = argv
    try:
        return args.func(args)
    except SuperposeError as e:
        print(f"superpose: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a read-only or full disk, a path the OS refuses: what failed, in one line
        print(f"superpose: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("superpose: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
