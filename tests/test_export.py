"""Export: a trained run becomes a plain Hugging Face folder that transformers loads alone, from either checkpoint layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import run_error
from safetensors.torch import load_file

import superpose
from superpose.cli import main
from superpose.errors import SuperposeError
from superpose.export import export, load_run
from superpose.models import build_model
from superpose.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.save, one process

SRC = Path(superpose.__file__).resolve().parents[1]

# Runs in `python -I` (no PYTHONPATH, no user site, no cwd); the editable install's .pth still puts src/ on the path,
# so it is removed before anything is imported, and the absence of superpose is asserted.
CLEAN_LOAD = """
import importlib.util, json, sys
sys.path = [p for p in sys.path if p != {src!r}]
assert importlib.util.find_spec("superpose") is None, "superpose is importable"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({out!r}).eval()
tok = AutoTokenizer.from_pretrained({out!r})
ids = torch.tensor([tok({text!r}).input_ids])
with torch.no_grad():
    logits = model(ids).logits
assert "superpose" not in sys.modules
print(json.dumps({{"ids": ids[0].tolist(), "logits": logits[0].tolist(), "eos": tok.eos_token,
                   "class": type(model).__name__}}))
"""


def test_export_loads_in_clean_interpreter_with_equal_logits(tst_run, tmp_path):
    out = export(tst_run, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    text = "def superpose(x):\n    return x"
    code = CLEAN_LOAD.format(src=str(SRC), out=str(out), text=text)
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "LlamaForCausalLM" and loaded["eos"] == "<|endoftext|>"

    model, tokenizer = load_run(tst_run)  # the trainer's model: preset + checkpoint weights
    ids = torch.tensor([tokenizer(text).input_ids])
    assert ids[0].tolist() == loaded["ids"]
    with torch.no_grad():
        ours = model(ids).logits[0]
    diff = (ours - torch.tensor(loaded["logits"])).abs().max().item()
    print(f"clean-interpreter logits max |diff| = {diff:.3g}")
    assert diff == 0.0


def test_tst_and_baseline_exports_have_identical_layout(trained_run, tst_run, tmp_path):
    base_run = trained_run("baseline")
    a, b = export(tst_run, tmp_path / "tst"), export(base_run, tmp_path / "base")
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert (a / "generation_config.json").read_text() == (b / "generation_config.json").read_text()
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # different training, same model


@pytest.mark.parametrize("tied_saved_once", [False, True])
def test_load_weights_from_sharded_checkpoint(tmp_path, tied_saved_once):
    """A distributed checkpoint (``dcp/`` with full parameter names) loads into one process without a process group."""
    trained = build_model("tiny", 512, seed=1)
    state = trained.state_dict()
    if tied_saved_once:
        state.pop("lm_head.weight")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000004"
    dcp.save({"model": state}, checkpoint_id=str(checkpoint / "dcp"))
    (checkpoint / "state.json").write_text(json.dumps({"step": 4}))
    fresh = build_model("tiny", 512, seed=2)
    assert load_checkpoint(tmp_path / "run", fresh, None)["step"] == 4
    for key, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_sharded_checkpoint_of_another_model_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-0000001"
    dcp.save({"model": build_model("tiny-qwen3", 512).state_dict()}, checkpoint_id=str(checkpoint / "dcp"))
    (checkpoint / "state.json").write_text("{}")
    with pytest.raises(SuperposeError, match="does not match the model"):
        load_checkpoint(tmp_path, build_model("tiny", 512), None)


def test_export_into_non_empty_folder_keeps_it(tst_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = run_error(capsys, ["export", str(tst_run), "--out", str(out)])
    assert "not empty" in msg
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_run_without_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    msg = run_error(capsys, ["export", str(run), "--out", str(tmp_path / "out")])
    assert "no checkpoint found" in msg
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left behind


def test_export_cli_into_empty_folder(tst_run, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["export", str(tst_run / "checkpoints" / "step-0000006"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))
