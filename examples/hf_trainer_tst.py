"""A plain Hugging Face ``Trainer`` pretraining script, switched to TST by the two lines marked ``# TST``.

    python examples/hf_trainer_tst.py                  # prepares a slice of the embedded corpus in a temp folder
    python examples/hf_trainer_tst.py --data DIR --steps 200 --bag 4 --ratio 0.3
    torchrun --nproc_per_node 2 examples/hf_trainer_tst.py --data DIR --batch-size 4       # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 examples/hf_trainer_tst.py --data DIR --gpu --fsdp         # FSDP2 on 8 GPUs
    python examples/hf_trainer_tst.py --data DIR --save-steps 20 --resume last             # continue a killed run

Everything else is what such a script already has: a ``transformers`` config and model, a dataset of equal token
chunks (``input_ids`` and ``labels``), ``TrainingArguments``, ``trainer.train()`` and ``trainer.save_model()``. Without
the two ``# TST`` lines (``Trainer(model=model, args=args, train_dataset=dataset)``) it is the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)

from superpose.data.prepare import prepare
from superpose.data.shards import open_dataset
from superpose.integrations.transformers import TSTTrainer  # TST


def token_chunks(data_dir: Path, block_size: int) -> tuple[Dataset, int]:
    """The training split of a prepared corpus as chunks of ``block_size`` tokens in text order, and the vocab size."""
    data = open_dataset(data_dir)
    stream = data.split("train")
    chunks = stream.read(0, len(stream) // block_size * block_size).reshape(-1, block_size)
    return Dataset.from_dict({"input_ids": chunks, "labels": chunks}), data.vocab_size


def main(argv: list[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder written by `superpose prepare` (default: a small embedded slice)")
    parser.add_argument("--out", type=Path, default=Path("runs/hf-trainer-tst"), help="Trainer output_dir")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--block-size", type=int, default=33, help="tokens per chunk: 32 positions + 1 target")
    parser.add_argument("--bag", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per device (the global batch is this x ranks)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (default: none)")
    parser.add_argument("--resume", help="checkpoint folder to continue from, or 'last' (the newest in --out)")
    parser.add_argument("--gpu", action="store_true", help="train on the GPUs (default: CPU)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (needs --gpu: accelerate shards only "
                                                            "on accelerators)")
    args = parser.parse_args(argv)
    if args.fsdp and not args.gpu:
        parser.error("--fsdp needs --gpu")
    if args.data is None:
        args.data = Path(tempfile.mkdtemp()) / "embedded"
        prepare(["embedded"], args.data, vocab_size=512, max_bytes=400_000, progress=False)

    dataset, vocab_size = token_chunks(args.data, args.block_size)
    set_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    training_args = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=3e-3, warmup_steps=5, lr_scheduler_type="cosine",
        logging_steps=1, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        dataloader_num_workers=args.workers, report_to=[], use_cpu=not args.gpu, seed=0, disable_tqdm=True,
        fsdp="full_shard" if args.fsdp else "", fsdp_config={"version": 2} if args.fsdp else None,
    )
    trainer = TSTTrainer(model=model, args=training_args, train_dataset=dataset, bag=args.bag, ratio=args.ratio)  # TST
    trainer.train(resume_from_checkpoint=True if args.resume == "last" else args.resume)
    trainer.save_model()
    trainer.save_state()
    return trainer


if __name__ == "__main__":
    main()
