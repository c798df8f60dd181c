"""The ``superpose`` command: a table of subcommands, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import SuperposeError


def _prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

    out = prepare(
        args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, text_field=args.text_field,
        val_fraction=args.val_fraction, seed=args.seed, max_bytes=args.max_bytes, hf_config=args.hf_config,
        hf_split=args.hf_split, progress=not args.quiet,
    )
    print(f"prepared {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume if args.resume is not None else False, progress=not args.quiet)
    print(f"{result.run_dir}: {result.steps} steps, final val loss {result.final_val_loss:.4f}, "
          f"{result.text_tokens:,} text tokens, {result.wall_time:.0f}s")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, max_bytes=args.max_bytes, progress=not args.quiet)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .models import describe_presets

    print(describe_presets())
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
    p.add_argument("--seed", type=int, default=0, help="seed of the validation hold-out")
    p.add_argument("--max-bytes", type=int, help="stop reading after this many bytes of text")
    p.add_argument("--hf-config", help="hub dataset configuration name")
    p.add_argument("--hf-split", default="train", help="hub dataset split (default train)")
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
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="baseline vs TST on the embedded corpus, on a CPU",
                       description="Prepare the embedded corpus (the Python standard library), train a tiny baseline "
                                   "and a tiny TST model at equal steps, batch and FLOPs per step, compare.")
    p.add_argument("--out", default="runs/demo", help="folder for the data and both runs (default runs/demo)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    p.add_argument("--max-bytes", type=int, default=12_000_000,
                   help="embedded corpus size (default 12 MB, so TST reads no token twice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)

    p = sub.add_parser("presets", help="list model presets with parameter counts")
    p.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SuperposeError as e:
        print(f"superpose: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("superpose: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
