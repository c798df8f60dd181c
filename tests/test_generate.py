"""Generation: a run and its export sample the same text for the same seed; bad settings are one-line errors."""

import pytest
from conftest import run_error

from superpose.cli import main
from superpose.export import export, load_model
from superpose.generate import complete, generate


def test_run_and_export_generate_the_same_text(tst_run, tmp_path):
    out = export(tst_run, tmp_path / "hf")
    for temperature in (0.0, 1.0):
        texts = {generate(src, "def ", max_new_tokens=12, temperature=temperature, seed=3) for src in (tst_run, out)}
        assert len(texts) == 1


def test_sampling_follows_the_seed_and_the_token_budget(tst_run):
    model, tokenizer = load_model(tst_run)
    a, b = (complete(model, tokenizer, "import ", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7) for _ in "ab")
    assert a == b
    assert a != complete(model, tokenizer, "import ", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    greedy = complete(model, tokenizer, "", max_new_tokens=5, temperature=0.0)
    assert 0 < len(tokenizer(greedy).input_ids) <= 6  # re-tokenizing may merge or split at most one boundary


def test_generate_cli_prints_prompt_and_continuation(tst_run, capsys):
    assert main(["generate", str(tst_run), "--prompt", "class ", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("class ")


@pytest.mark.parametrize("option, value", [("--top-p", "0"), ("--temperature", "-1"), ("--max-new-tokens", "0")])
def test_generate_bad_settings(tmp_path, capsys, option, value):
    msg = run_error(capsys, ["generate", str(tmp_path / "nothing"), option, value])
    assert option in msg
