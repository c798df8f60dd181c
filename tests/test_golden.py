"""Golden losses: the tiny baseline and TST runs must reproduce a committed loss curve.

A refactor that moves any number (data order, initialisation, the loss, the LR schedule) fails here. When a change
is meant to move them, regenerate with ``SUPERPOSE_WRITE_GOLDEN=1 pytest tests/test_golden.py`` and say why in the
commit message.
"""

import json
import os
from pathlib import Path

import pytest

from superpose.train.metrics import read_metrics

GOLDEN = Path(__file__).parent / "golden" / "losses.json"


def _curve(run_dir: Path) -> dict[str, list[float]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {"train_loss": [r["train_loss"] for r in rows],
            "val_loss": [r["val_loss"] for r in rows if "val_loss" in r],
            "text_tokens": [r["text_tokens"] for r in rows]}


@pytest.mark.parametrize("kind", ["baseline", "tst"])
def test_losses_match_the_committed_curve(trained_run, kind):
    got = _curve(trained_run(kind))
    if os.environ.get("SUPERPOSE_WRITE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        GOLDEN.write_text(json.dumps({**golden, kind: got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())[kind]
    assert got["text_tokens"] == want["text_tokens"]
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-4)
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-4)
