"""What recording and verifying checkpoint checksums costs: save and load of a real checkpoint, with the SHA-256
pass timed on its own (side by side in one run).

    python bench/checkpoint_checksum.py --out bench/results/checkpoint_checksum.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from superpose.models import build_model
from superpose.provenance import provenance
from superpose.train.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = build_model("small", 32768, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=12, num_key_value_heads=4, intermediate_size=4 * args.hidden)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
    optimizer.step()  # moments exist, as in any checkpoint after the first step
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = save_checkpoint(Path(tmp), model, optimizer, {"step": 1, "skipped": 0}, {}, keep=1)
        save_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        verify_checkpoint(path)
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_checkpoint(path, model, None)
        load_s = time.perf_counter() - t0  # weights only, verification included
    result = {"provenance": provenance(), "parameters": sum(p.numel() for p in model.parameters()),
              "checkpoint_bytes": size, "save_s_with_hashing": round(save_s, 3), "verify_s": round(verify_s, 3),
              "hash_mb_per_s": round(size / verify_s / 1e6, 1), "load_weights_s_with_verify": round(load_s, 3),
              "verify_share_of_save": round(verify_s / save_s, 3)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
