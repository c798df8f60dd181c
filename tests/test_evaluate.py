"""Evaluation: lm-eval accuracy on a local task for a model whose answers are known; perplexity and bits per byte."""

import json
import math
import sys

import pytest
import torch
from conftest import run_error

from superpose.cli import main
from superpose.data.tokenizer import load_tokenizer
from superpose.export import hf_tokenizer, save_hf
from superpose.models import build_model
from superpose.train.metrics import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

# Every question offers "x", "x x" and "x x x" (2, 4 and 6 tokens after the " " delimiter) in some order.
DOCS = [
    {"question": "Q1:", "choices": ["x", "x x", "x x x"], "gold": 0},
    {"question": "Q2:", "choices": ["x x", "x", "x x x"], "gold": 1},
    {"question": "Q3:", "choices": ["x x x", "x x", "x"], "gold": 2},
    {"question": "Q4:", "choices": ["x", "x x", "x x x"], "gold": 2},
]
# The uniform model gives every token log-probability -ln V, so a choice of n tokens scores -n ln V and the model always
# picks the shortest choice: right on Q1-Q3, wrong on Q4.
EXPECTED_ACC = 3 / 4

TASK_YAML = """task: superpose_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def local_task(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "superpose_mc.yaml").write_text(TASK_YAML.format(docs=folder / "docs.jsonl"))
    return folder


@pytest.fixture
def uniform_model(embedded_data, tmp_path):
    """An exported model with zero embeddings (tied to the head): all logits are exactly 0, every token has p = 1/V."""
    tokenizer = load_tokenizer(str(embedded_data / "tokenizer.json"))
    model = build_model("tiny", tokenizer.get_vocab_size())
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    return save_hf(model, hf_tokenizer(tokenizer, 2048), tmp_path / "uniform")


def test_eval_local_task_accuracy_and_bits_per_byte(uniform_model, local_task, embedded_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "results" / "eval.json"
    code = main(["eval", str(uniform_model), "--tasks", "superpose_mc", "--include-path", str(local_task),
                 "--data", str(embedded_data), "--seq-len", "32", "--val-batches", "2", "--output", str(out), "--device", "cpu",
                 "--log-samples", "--model-args", "max_length=64,logits_cache=False"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["results"]["superpose_mc"]["acc,none"] == EXPECTED_ACC
    samples = [json.loads(line) for line in (out.parent / "eval.samples.jsonl").read_text().splitlines()]
    assert [(s["task"], s["doc"]["question"], s["acc"]) for s in samples] == [
        ("superpose_mc", d["question"], float(i < 3)) for i, d in enumerate(DOCS)]
    ppl = report["perplexity"]
    vocab = load_tokenizer(str(embedded_data / "tokenizer.json")).get_vocab_size()
    assert ppl["val_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert ppl["perplexity"] == pytest.approx(vocab, rel=1e-5)
    # log2(V) bits for every scored token, spread over the bytes of the text they spell
    assert ppl["bits_per_byte"] == pytest.approx(math.log2(vocab) * ppl["tokens"] / ppl["bytes"], rel=1e-6)
    assert ppl["tokens"] == 2 * 8 * 32 and ppl["bytes"] > ppl["tokens"]


def test_eval_perplexity_matches_the_trainers_validation_loss(tst_run, embedded_data, tmp_path):
    """At the run's seq_len, batch and eval.batches the windows are the trainer's, so the loss is its val_loss."""
    out = tmp_path / "ppl.json"
    assert main(["eval", str(tst_run), "--tasks", "none", "--data", str(embedded_data), "--seq-len", "16",
                 "--batch-size", "4", "--val-batches", "2", "--output", str(out)]) == 0
    final = [r for r in read_metrics(tst_run / "metrics.jsonl") if "val_loss" in r][-1]
    assert json.loads(out.read_text())["perplexity"]["val_loss"] == pytest.approx(final["val_loss"], abs=1e-5)


def test_eval_missing_include_path(uniform_model, tmp_path, capsys):
    msg = run_error(capsys, ["eval", str(uniform_model), "--tasks", "x", "--include-path", str(tmp_path / "nope")])
    assert "--include-path" in msg
    assert not (uniform_model / "eval.json").exists()


@pytest.mark.slow
def test_eval_unknown_task(uniform_model, local_task, capsys):
    """Unknown names are checked against lm-eval's full task index (~15k YAML files), before the model is loaded."""
    msg = run_error(capsys, ["eval", str(uniform_model), "--tasks", "superpose_mc,no_such_task", "--include-path",
                             str(local_task)])
    assert "no_such_task" in msg
    assert not (uniform_model / "eval.json").exists()


def test_eval_results_go_beside_an_export(uniform_model, embedded_data, capsys):
    """An export stays the folder that was written; the results land next to it."""
    assert main(["eval", str(uniform_model), "--tasks", "none", "--data", str(embedded_data), "--seq-len", "8",
                 "--val-batches", "1"]) == 0
    beside = uniform_model.parent / "uniform-eval.json"
    assert "perplexity" in json.loads(beside.read_text())
    assert not (uniform_model / "eval.json").exists()


def test_eval_without_lm_eval_says_how_to_install_it(uniform_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra sees: ImportError
    msg = run_error(capsys, ["eval", str(uniform_model), "--tasks", "hellaswag"])
    assert "pip install 'superpose[eval]'" in msg


def test_eval_unknown_model_arg(uniform_model, local_task, capsys):
    msg = run_error(capsys, ["eval", str(uniform_model), "--tasks", "superpose_mc", "--include-path", str(local_task),
                             "--model-args", "max_lenght=64"])
    assert "max_lenght" in msg
    assert not list(uniform_model.parent.glob("*eval*.json"))
