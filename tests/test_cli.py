"""The command line: every bad input is one line on stderr, exit code 2, and nothing written."""

import re
import subprocess
import sys

import pytest
from conftest import run_error

from superpose.cli import main
from superpose.data.tokenizer import train_tokenizer


def write_config(tmp_path, embedded_data, extra=""):
    path = tmp_path / "cfg.toml"
    path.write_text(f"""
name = "cli"
out_dir = "{tmp_path / 'runs'}"
[data]
path = "{embedded_data}"
[train]
steps = 4
batch_size = 2
seq_len = 16
device = "cpu"
[optim]
warmup_steps = 1
[eval]
batches = 1
{extra}
""")
    return path


def test_prepare_missing_corpus(tmp_path, capsys):
    msg = run_error(capsys, ["prepare", str(tmp_path / "nothere.txt"), "--out", str(tmp_path / "out")])
    assert "nothere.txt" in msg
    assert not (tmp_path / "out").exists()


def test_prepare_into_non_empty_folder_keeps_it(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("hello world " * 200)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = run_error(capsys, ["prepare", str(tmp_path / "corpus.txt"), "--out", str(out)])
    assert "not empty" in msg
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "overrides, extra, fragment",
    [
        (["tst.bag=0"], "", "tst.bag"),
        (["tst.ratio=1.5"], "", "tst.ratio"),
        (["tst.ratio=-0.2"], "", "tst.ratio"),
        (["tst.bagsize=4"], "", "unknown config key tst.bagsize"),
        ([], "[tst]\nflavour = 'x'", "unknown config key tst.flavour"),
        (["train.seq_len=400000"], "", "needs"),
        (["tst.schedule=[[0.5, 4], [0.2, 2], [1.0, 1]]"], "", "in order"),
        (["model.preset=gigantic"], "", "gigantic"),
    ],
)
def test_train_bad_input(tmp_path, capsys, embedded_data, overrides, extra, fragment):
    cfg = write_config(tmp_path, embedded_data, extra)
    msg = run_error(capsys, ["train", str(cfg), *overrides, "--quiet"])
    assert fragment in msg
    assert not (tmp_path / "runs").exists()


def test_train_tokenizer_not_matching_shards(tmp_path, capsys, embedded_data):
    other = train_tokenizer(["a completely different corpus of words " * 50], vocab_size=300)
    other.save(str(tmp_path / "other.json"))
    cfg = write_config(tmp_path, embedded_data)
    msg = run_error(capsys, ["train", str(cfg), f"data.tokenizer='{tmp_path / 'other.json'}'", "--quiet"])
    assert "does not match" in msg
    assert not (tmp_path / "runs").exists()


def test_train_missing_config_and_data(tmp_path, capsys, embedded_data):
    run_error(capsys, ["train", str(tmp_path / "none.toml")])
    cfg = write_config(tmp_path, embedded_data)
    msg = run_error(capsys, ["train", str(cfg), f"data.path='{tmp_path / 'nodata'}'", "--quiet"])
    assert "nodata" in msg


def test_resume_from_a_missing_checkpoint(tmp_path, capsys, embedded_data):
    cfg = write_config(tmp_path, embedded_data)
    msg = run_error(capsys, ["train", str(cfg), "--resume", str(tmp_path / "runs/cli/checkpoints/step-0000002"),
                             "--quiet"])
    assert "no checkpoint found" in msg


def test_train_and_resume_from_cli(tmp_path, capsys, embedded_data):
    cfg = write_config(tmp_path, embedded_data)
    assert main(["train", str(cfg), "--quiet"]) == 0
    assert "final val loss" in capsys.readouterr().out
    assert (tmp_path / "runs/cli/checkpoints/step-0000004/model.safetensors").is_file()
    assert main(["train", str(cfg), "train.steps=6", "--resume", "--quiet"]) == 0
    assert "6 steps" in capsys.readouterr().out


def test_console_entry_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "superpose", "train", str(tmp_path / "x.toml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"superpose: error: config file not found: {tmp_path / 'x.toml'}"


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    listed = set(re.findall(r"^ {4}([a-z]+) +\S", out, re.M))  # each subcommand with its one-line help
    assert listed == {"prepare", "train", "demo", "compare", "sweep", "export", "generate", "eval", "config", "presets"}


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "12", "--max-bytes", "300000", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "tst" in out and "final val loss" in out
    assert (tmp_path / "demo/baseline/metrics.jsonl").is_file() and (tmp_path / "demo/tst/metrics.jsonl").is_file()
    # idempotent: a second call finds the finished runs and reports them again
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "12", "--quiet"]) == 0


def test_overrides_may_follow_options(tmp_path, capsys, embedded_data):
    cfg = write_config(tmp_path, embedded_data)
    assert main(["train", str(cfg), "--quiet", "train.steps=2", "optim.warmup_steps=0"]) == 0
    assert "cli: 2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg), "--quiet", "--bogus"])
    assert e.value.code == 2


def test_a_run_folder_the_os_refuses_is_one_line(tmp_path, capsys, embedded_data):
    cfg = write_config(tmp_path, embedded_data)
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    line = run_error(capsys, ["train", str(cfg), "--quiet"])
    assert "runs" in line
