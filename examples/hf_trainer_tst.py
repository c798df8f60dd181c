"""A plain Hugging Face ``Trainer`` pretraining script, switched to TST by the two lines marked ``# TST``.

    python examples/hf_trainer_tst.py                  # prepares a slice of the embedded corpus in a temp folder
    python examples/hf_trainer_tst.py --data DIR --steps 200 --bag 4 --ratio 0.3

Everything else is what such a script already has: a ``transformers`` config and model, a dataset of equal token
chunks (``input_ids`` and ``labels``), ``TrainingArguments`` and ``trainer.train()``. Without the two ``# TST`` lines
(``Trainer(model=model, args=args, train_dataset=dataset)``) it is the baseline.
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
    args = parser.parse_args(argv)
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
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-3,
        warmup_steps=5, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = TSTTrainer(model=model, args=training_args, train_dataset=dataset, bag=args.bag, ratio=args.ratio)  # TST
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
