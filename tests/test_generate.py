"""Generation: a run and its export sample the same text for the same seed; top-k, repetition penalty, several
samples and stop strings do what they say; bad settings are one-line errors."""

from collections import Counter

import pytest
from conftest import run_error

from superpose.cli import main
from superpose.export import export, load_model
from superpose.generate import Sampling, complete, generate


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_model(trained_run("tst"))


def test_run_and_export_generate_the_same_text(tst_run, tmp_path):
    out = export(tst_run, tmp_path / "hf")
    for sampling in (Sampling(12, temperature=0.0), Sampling(12, temperature=1.0, top_k=20, repetition_penalty=1.3,
                                                             num_samples=2, seed=3)):
        texts = [generate(src, "def ", sampling) for src in (tst_run, out)]
        assert texts[0] == texts[1] and len(texts[0]) == sampling.num_samples


def test_sampling_follows_the_seed_and_the_token_budget(loaded):
    model, tokenizer = loaded
    sampling = Sampling(16, temperature=1.0, top_p=0.9, seed=7)
    assert complete(model, tokenizer, "import ", sampling) == complete(model, tokenizer, "import ", sampling)
    assert complete(model, tokenizer, "import ", sampling) != complete(model, tokenizer, "import ",
                                                                       Sampling(16, 1.0, 0.9, seed=8))
    (greedy,) = complete(model, tokenizer, "", Sampling(5, temperature=0.0))
    assert 0 < len(tokenizer(greedy).input_ids) <= 6  # re-tokenizing may merge or split at most one boundary


def test_several_samples_differ_and_top_k_1_is_greedy(loaded):
    model, tokenizer = loaded
    samples = complete(model, tokenizer, "class ", Sampling(16, temperature=1.0, top_p=1.0, num_samples=4, seed=1))
    assert len(samples) == 4 and len(set(samples)) > 1
    greedy = complete(model, tokenizer, "class ", Sampling(16, temperature=0.0))
    assert complete(model, tokenizer, "class ", Sampling(16, temperature=1.0, top_p=1.0, top_k=1, seed=5)) == greedy


def test_repetition_penalty_avoids_seen_tokens(loaded):
    model, tokenizer = loaded
    (plain,) = complete(model, tokenizer, "x = ", Sampling(24, temperature=0.0))
    (penalised,) = complete(model, tokenizer, "x = ", Sampling(24, temperature=0.0, repetition_penalty=1e9))

    def most_repeated(text: str) -> int:  # over re-tokenized text, which may merge or split a few boundaries
        return max(Counter(tokenizer(text).input_ids).values())

    assert penalised != plain and most_repeated(penalised) < most_repeated(plain)


def test_stop_strings_end_the_continuation_before_them(loaded):
    model, tokenizer = loaded
    (full,) = complete(model, tokenizer, "def ", Sampling(24, temperature=0.0))
    stop = full[len(full) // 2]
    (cut,) = complete(model, tokenizer, "def ", Sampling(24, temperature=0.0, stop=("never-generated", stop)))
    assert cut == full[: full.index(stop)]


def test_generate_cli_prints_prompt_and_continuation(tst_run, capsys):
    assert main(["generate", str(tst_run), "--prompt", "class ", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    expected = generate(tst_run, "class ", Sampling(4, 0.0, 0.95, 0, 1.0, 1, (), 0), "cpu")[0]
    assert expected and capsys.readouterr().out == "class " + expected + "\n"  # the prompt, then the greedy text
    assert main(["generate", str(tst_run), "--prompt", "class ", "--max-new-tokens", "4", "--num-samples", "2",
                 "--top-k", "5", "--repetition-penalty", "1.2", "--stop", "\n"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headers = [line for line in lines if line.startswith("--- sample")]
    assert headers == ["--- sample 1 of 2 ---", "--- sample 2 of 2 ---"]


@pytest.mark.parametrize("option, value", [("--top-p", "0"), ("--temperature", "-1"), ("--max-new-tokens", "0"),
                                           ("--top-k", "-1"), ("--repetition-penalty", "0"), ("--num-samples", "0"),
                                           ("--stop", "")])
def test_generate_bad_settings(tmp_path, capsys, option, value):
    msg = run_error(capsys, ["generate", str(tmp_path / "nothing"), option, value])
    assert option in msg


def test_several_greedy_samples_are_refused(tmp_path, capsys):
    msg = run_error(capsys, ["generate", str(tmp_path / "nothing"), "--temperature", "0", "--num-samples", "2"])
    assert "--num-samples" in msg
