from pathlib import Path

import pytest

from superpose.errors import SuperposeError
from superpose.models import PRESETS
from superpose.train.config import RunConfig
from superpose.train.config_load import config_from_dict, load_config, tomllib

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.preset in PRESETS
    schedule = cfg.phase_schedule()
    assert schedule.bag_at(cfg.train.steps - 1) == 1  # every shipped recipe ends in ordinary training


def test_shipped_configs_cover_the_paper_scales_and_the_cpu_demo():
    presets = {load_config(path).model.preset for path in CONFIGS}
    assert {"tiny", "tiny-moe", "llama-270m", "llama-600m", "smollm3-3b", "qwen3-moe-10b-a1b"} <= presets
    paper = [load_config(path) for path in CONFIGS if "8gpu" in path.name]
    assert paper and all(cfg.tst.bag > 1 and 0 < cfg.tst.ratio < 1 for cfg in paper)  # each one is a TST recipe


def test_toml_round_trip():
    cfg = config_from_dict({"tst": {"schedule": [[0.1, 8], [0.3, 4], [1.0, 1]]}, "train": {"steps": 50}, "optim": {"warmup_steps": 5}})
    again = config_from_dict(tomllib.loads(cfg.to_toml()))
    assert again == cfg
    assert again.phase_schedule().switch_steps() == [5, 15]


def test_overrides_parse_toml_values():
    cfg = config_from_dict({}, ["tst.bag=8", "tst.ratio=0.25", "train.compile=true", "name=abc", "optim.lr=1e-3"])
    assert (cfg.tst.bag, cfg.tst.ratio, cfg.train.compile, cfg.name, cfg.optim.lr) == (8, 0.25, True, "abc", 1e-3)
    assert cfg.phase_schedule().switch_steps() == [250]
    staged = config_from_dict({}, ["tst.schedule=[[10, 4], [1.0, 1]]"])
    assert staged.phase_schedule().switch_steps() == [10]
    assert "bag" not in staged.to_dict()["tst"]  # the schedule replaces them, in the saved config too


@pytest.mark.parametrize("given", ["tst.bag=8", "tst.ratio=0.2"])
def test_schedule_with_bag_or_ratio_is_refused(given):
    with pytest.raises(SuperposeError, match="tst.schedule and tst.bag/ratio exclude each other"):
        config_from_dict({}, [given, "tst.schedule=[[10, 4], [1.0, 1]]"])


def test_an_overrides_choice_replaces_the_files_in_every_section():
    """Each section's exclusive ways (bag/ratio vs schedule, path vs sources, preset vs config vs init_from): the
    command line's choice wins over the file's, and the file alone giving two is refused."""
    file = {"tst": {"bag": 8, "ratio": 0.2}, "data": {"path": "a"}, "model": {"preset": "tiny-qwen3"}}
    cfg = config_from_dict(file, ["tst.schedule=[[10, 4], [1.0, 1]]", 'data.sources=[{path = "b", weight = 1}]',
                                  "model.config=cfg.json"])
    assert (cfg.tst.schedule, cfg.data.mixture(), cfg.model.preset, cfg.model.config) == (
        [[10, 4], [1.0, 1]], [("b", "b", 1)], "", "cfg.json")
    back = config_from_dict({"tst": {"schedule": [[10, 4], [1.0, 1]]}, "data": {"sources": [{"path": "b", "weight": 1}]}},
                            ["tst.bag=8", "data.path=a"])  # and the other way round (compare --bag over a schedule)
    assert (back.tst.schedule, back.tst.bag, back.data.mixture()) == ([], 8, [("a", "a", 1.0)])
    with pytest.raises(SuperposeError, match=r"model.preset and model.config exclude each other.*\(in the config\)"):
        config_from_dict({"model": {"preset": "tiny", "config": "cfg.json"}})


def test_int_accepted_for_float():
    assert config_from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"tst": {"bagg": 4}}, [], "unknown config key tst.bagg"),
        ({"nonsense": 1}, [], "unknown config key nonsense"),
        ({}, ["train.stepz=3"], "unknown config key train.stepz"),
        ({"tst": {"bag": "four"}}, [], "tst.bag: expected int"),
        ({"train": {"compile": 1}}, [], "train.compile: expected bool"),
        ({"tst": {"bag": True}}, [], "tst.bag: expected int"),
        ({"tst": 3}, [], "tst: expected a table"),
        ({"tst": {"bag": 0}}, [], "tst.bag: must be >= 1"),
        ({"tst": {"ratio": 1.5}}, [], r"tst.ratio: must be in \[0, 1\]"),
        ({"tst": {"ratio": -0.1}}, [], r"tst.ratio: must be in \[0, 1\]"),
        ({"tst": {"mode": "sideways"}}, [], "tst.mode"),
        ({"tst": {"schedule": [[0.5, 4], [0.2, 2], [1.0, 1]]}}, [], "in order"),
        ({"tst": {"schedule": [[0.5, 4]]}}, [], "last stage"),
        ({"train": {"batch_size": 16, "micro_batch_size": 5}}, [], "does not divide"),
        ({"optim": {"lr_schedule": "linear"}}, [], "optim.lr_schedule"),
        ({"name": "../escape"}, [], "plain folder name"),
        ({}, ["noequals"], "key=value"),
    ],
)
def test_bad_configs_are_one_line_errors(data, overrides, message):
    with pytest.raises(SuperposeError, match=message) as e:
        config_from_dict(data, overrides)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(SuperposeError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tst\nbag = 4")
    with pytest.raises(SuperposeError, match="not valid TOML"):
        load_config(bad)


def test_defaults_are_the_paper_recipe():
    cfg = RunConfig()
    assert (cfg.tst.bag, cfg.tst.ratio, cfg.tst.mode, cfg.optim.lr_schedule) == (4, 0.3, "both", "wsd")


def test_config_reference_documents_every_key_and_is_current():
    from superpose.train.config_docs import config_reference

    reference = config_reference()
    cfg = RunConfig().to_dict()
    keys = [k for k, v in cfg.items() if not isinstance(v, dict)]
    keys += [f"{s}.{k}" for s, v in cfg.items() if isinstance(v, dict) for k in v]
    for key in keys:
        assert f"| `{key}` |" in reference
    assert all(line.split("|")[3].strip() for line in reference.splitlines()[2:]), "every key has a meaning"
    docs = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    assert reference in docs, "docs/config.md is stale: regenerate it with `superpose config`"


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.eps=-1"], "optim.eps"),
    (["optim.beta1=1.5"], "optim.beta1"),
    (["optim.beta2=nan"], "optim.beta2"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.weight_decay=nan"], "optim.weight_decay"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["tst.alpha=nan"], "tst.alpha"),
    (['name="a\\u0000b"'], "name"),
    (["model.overrides={num_attention_heads = 0}"], "model.overrides.num_attention_heads"),
    (['model.overrides={hidden_size = "x"}'], "model.overrides.hidden_size"),
    (["model.overrides={hidden_size = -64}"], "model.overrides.hidden_size"),
    (["model.overrides={head_dim = 0}"], "model.overrides.head_dim"),
    (["model.overrides={num_key_value_heads = 0}"], "model.overrides.num_key_value_heads"),
    (["train.steps=60", "optim.warmup_steps=50"], "optim.warmup_steps: 50 does not end before the LR decay starts at step 48"),
    (["train.steps=30", "optim.warmup_steps=50"], "optim.warmup_steps"),
    (["train.steps=100", "optim.warmup_steps=100", "optim.lr_schedule='cosine'"], "optim.warmup_steps"),
])
def test_values_that_would_fail_later_are_refused_up_front(overrides, fragment):
    with pytest.raises(SuperposeError, match=fragment.replace(".", r"\.")):
        config_from_dict({}, overrides)


def test_merged_stages_keep_their_real_end():
    from superpose.schedule import PhaseSchedule

    schedule = PhaseSchedule([(0.2, 4), (0.4, 4), (1.0, 1)], 10)
    assert [(st.until, st.bag) for st in schedule.stages] == [(4, 4), (10, 1)]
    assert schedule.ends == [4, 10]


def test_the_schema_imports_neither_its_loader_nor_its_docs():
    """train/config.py is the reference of the config: loading and the docs generator import it, never back."""
    import ast

    import superpose.train.config as schema

    tree = ast.parse(Path(schema.__file__).read_text())
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.endswith(("config_load", "config_docs"))}


def test_a_model_config_is_read_once_per_run(tiny_config, tmp_path, monkeypatch):
    """Start-up reads model.config once, checks it, and hands the config on to the TrainModule."""
    from transformers import AutoConfig, LlamaConfig

    from superpose.train.loop import train

    LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "llama")
    reads = []
    read = AutoConfig.from_pretrained
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *args, **kwargs: reads.append(args) or read(*args,
                                                                                                         **kwargs))
    result = train(tiny_config(model={"preset": "", "config": str(tmp_path / "llama")}, train={"steps": 2},
                               optim={"warmup_steps": 0}, eval={"every": 0}), progress=False)
    assert result.steps == 2
    assert reads == [(str(tmp_path / "llama"),)]


def test_hub_logs_are_quiet_while_a_model_config_is_fetched(monkeypatch, caplog):
    """A hub name that cannot be fetched is one line, without the retry logs of the hub's libraries beneath it."""
    import logging

    from transformers import AutoConfig

    from superpose.train.config import ModelConfig

    def offline(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=4)) after connection broken")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    with caplog.at_level(logging.WARNING), pytest.raises(SuperposeError, match="model.config: cannot read"):
        ModelConfig(config="owner/no-such-model").build_config(300)
    assert "Retrying" not in caplog.text
