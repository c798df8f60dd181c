"""Export: a trained run becomes a plain Hugging Face folder that transformers loads alone, from either checkpoint layout."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import run_error, torch_settings
from safetensors.torch import load_file

from superpose.cli import main
from superpose.errors import SuperposeError
from superpose.export import PORTABLE_TOKENIZER_CLASS, export, load_export, load_model, load_run
from superpose.models import build_model, model_config
from superpose.train.checkpoint import load_checkpoint, write_manifest
from superpose.train.loop import train

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.save, one process

# Runs in `python -I` (no PYTHONPATH, no user site, no cwd). superpose stays installed (editable or not, this checkout
# or another), so the child makes every import of it fail before importing anything else.
# Logits are compared bitwise, so both interpreters compute under the same process-global torch settings: one thread
# (a thread count can change how an op splits its sums, and a fresh interpreter takes one per core), and the rest of
# conftest.torch_settings checked equal.
CLEAN_LOAD = """
import json, sys
sys.modules["superpose"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
{settings}
model = AutoModelForCausalLM.from_pretrained({out!r}).eval()
tok = AutoTokenizer.from_pretrained({out!r})
ids = torch.tensor([tok({text!r}).input_ids])
with torch.no_grad():
    logits = model(ids).logits
assert sys.modules["superpose"] is None
print(json.dumps({{"ids": ids[0].tolist(), "logits": logits[0].tolist(), "eos": tok.eos_token,
                   "class": type(model).__name__, "settings": torch_settings()}}))
"""


def clean_load(out: Path, text: str, prefix: str = "", timeout: int = 120) -> dict:
    """Load the export ``out`` in a fresh interpreter without superpose; its tokens, logits and settings of ``text``."""
    code = prefix + CLEAN_LOAD.format(settings=inspect.getsource(torch_settings), out=str(out), text=text)
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=out.parent,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_loads_in_clean_interpreter_with_equal_logits(tst_run, tmp_path):
    out = export(tst_run, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    text = "def superpose(x):\n    return x"
    loaded = clean_load(out, text)
    assert loaded["class"] == "LlamaForCausalLM" and loaded["eos"] == "<|endoftext|>"

    model, tokenizer = load_run(tst_run)  # the trainer's model: preset + checkpoint weights
    ids = torch.tensor([tokenizer(text).input_ids])
    assert ids[0].tolist() == loaded["ids"]
    torch.set_num_threads(1)  # conftest puts the thread count back after the test
    assert torch_settings() == loaded["settings"]
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
    write_manifest(checkpoint)
    fresh = build_model("tiny", 512, seed=2)
    assert load_checkpoint(tmp_path / "run", fresh, None)["step"] == 4
    for key, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_sharded_checkpoint_of_another_model_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-0000001"
    dcp.save({"model": build_model("tiny-qwen3", 512).state_dict()}, checkpoint_id=str(checkpoint / "dcp"))
    (checkpoint / "state.json").write_text("{}")
    write_manifest(checkpoint)
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
    """An existing empty folder receives the named checkpoint's model (not the run's newest), complete."""
    out = tmp_path / "empty"
    out.mkdir()
    checkpoint = tst_run / "checkpoints" / "step-0000006"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"exported {out}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary folder left behind
    exported, tokenizer = load_export(out)  # transformers alone
    trained, trained_tokenizer = load_run(checkpoint)
    newest = load_run(tst_run)[0].state_dict()
    weights = exported.state_dict()
    assert weights.keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in weights.items())
    assert any(not torch.equal(v, newest[k]) for k, v in weights.items())
    assert tokenizer.get_vocab() == trained_tokenizer.get_vocab() and tokenizer.eos_token == trained_tokenizer.eos_token


def test_run_with_model_overrides_exports_and_loads(tiny_config, tmp_path):
    """A run whose shape differs from its preset (issue 11) exports, and the export holds the trained shape."""
    overrides = {"hidden_size": 64, "intermediate_size": 192}
    cfg = tiny_config(model={"preset": "tiny", "overrides": overrides}, train={"steps": 6})
    run = train(cfg, progress=False).run_dir
    out = export(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"]) == (64, 192)
    exported, tokenizer = load_model(out)
    ids = torch.tensor([tokenizer("import os").input_ids])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, load_run(run)[0](ids).logits)


def test_config_json_of_the_run_decides_the_model(tst_run, tmp_path):
    """config.json (written by training in the run folder and every checkpoint, covered by its manifest) is the
    model; run.json's preset is not read."""
    run = Path(shutil.copytree(tst_run, tmp_path / "run"))
    assert (run / "config.json").is_file() and all((c / "config.json").is_file() for c in run.glob("checkpoints/step-*"))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "preset": "no-such-preset"}))
    out = export(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["hidden_size"] == model_config("tiny").hidden_size


def test_export_loads_in_every_supported_transformers(tst_run, tmp_path):
    """transformers 5 writes tokenizer_class TokenizersBackend and RoPE only as rope_parameters, which 4.x (the floor
    in pyproject) cannot load or silently misreads; the export names a class and keys both read."""
    out = export(tst_run, tmp_path / "hf")
    tokenizer_class = json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tokenizer_class == PORTABLE_TOKENIZER_CLASS == "PreTrainedTokenizerFast"  # in transformers since 3.x
    import transformers

    assert hasattr(transformers, tokenizer_class)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    floor = os.environ.get("SUPERPOSE_TRANSFORMERS_FLOOR")  # site folder of transformers 4.56 (+ tokenizers 0.22)
    if floor is None:
        pytest.skip("set SUPERPOSE_TRANSFORMERS_FLOOR to load the export with the lowest supported transformers")
    clean_load(out, "x = 1", prefix=f"import sys; sys.path.insert(0, {floor!r})\n", timeout=300)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be created in: read-only permissions, or /sys where root ignores them."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "probe").mkdir()
        except OSError:
            yield candidate
            break
        shutil.rmtree(candidate / "probe")
    else:
        pytest.skip("no read-only folder available")
    folder.chmod(0o755)


def test_export_into_read_only_folder(tst_run, read_only_dir, capsys):
    msg = run_error(capsys, ["export", str(tst_run), "--out", str(read_only_dir / "superpose-model")])
    assert "cannot write export" in msg


def test_eval_into_read_only_folder(tst_run, read_only_dir, embedded_data, capsys):
    msg = run_error(capsys, ["eval", str(tst_run), "--tasks", "none", "--data", str(embedded_data),
                             "--output", str(read_only_dir / "superpose-eval.json")])
    assert "cannot write" in msg


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return export(trained_run("tst"), tmp_path_factory.mktemp("export") / "hf")


def deploy_command(command: str, source: Path, data: Path) -> list[str]:
    """The cheapest call of each command that loads ``source``."""
    if command == "eval":
        return ["eval", str(source), "--tasks", "none", "--data", str(data), "--seq-len", "8", "--val-batches", "1"]
    if command == "generate":
        return ["generate", str(source), "--max-new-tokens", "1"]
    return ["export", str(source), "--out", str(source.parent / "out")]


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("damaged", ["model.safetensors", "config.json", "tokenizer.json"])
def test_damaged_export_folder(exported, embedded_data, tmp_path, capsys, command, damaged):
    folder = Path(shutil.copytree(exported, tmp_path / "hf"))
    truncate(folder / damaged)
    msg = run_error(capsys, deploy_command(command, folder, embedded_data))
    assert damaged in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no results written


@pytest.mark.parametrize("command", ["export", "generate", "eval"])
def test_truncated_run_json(tst_run, embedded_data, tmp_path, capsys, command):
    run = Path(shutil.copytree(tst_run, tmp_path / "run"))
    truncate(run / "run.json")
    msg = run_error(capsys, deploy_command(command, run, embedded_data))
    assert "run.json is corrupt" in msg
    assert not (tmp_path / "out").exists() and not (run / "eval.json").exists()
