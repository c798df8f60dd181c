from pathlib import Path

import pytest

from superpose.errors import SuperposeError
from superpose.models import PRESETS
from superpose.train.config import RunConfig, config_from_dict, load_config, tomllib

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.preset in PRESETS
    schedule = cfg.phase_schedule()
    assert schedule.bag_at(cfg.train.steps - 1) == 1  # every shipped recipe ends in ordinary training


def test_shipped_configs_exist():
    assert len(CONFIGS) >= 4


def test_toml_round_trip():
    cfg = config_from_dict({"tst": {"schedule": [[0.1, 8], [0.3, 4], [1.0, 1]]}, "train": {"steps": 50}})
    again = config_from_dict(tomllib.loads(cfg.to_toml()))
    assert again == cfg
    assert again.phase_schedule().switch_steps() == [5, 15]


def test_overrides_parse_toml_values():
    cfg = config_from_dict({}, ["tst.bag=8", "tst.ratio=0.25", "train.compile=true", "name=abc",
                                "tst.schedule=[[10, 4], [1.0, 1]]", "optim.lr=1e-3"])
    assert (cfg.tst.bag, cfg.tst.ratio, cfg.train.compile, cfg.name, cfg.optim.lr) == (8, 0.25, True, "abc", 1e-3)
    assert cfg.phase_schedule().switch_steps() == [10]


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
        ({"optim": {"schedule": "linear"}}, [], "optim.schedule"),
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
    assert (cfg.tst.bag, cfg.tst.ratio, cfg.tst.mode, cfg.optim.schedule) == (4, 0.3, "both", "wsd")


def test_config_reference_documents_every_key_and_is_current():
    from superpose.train.config import config_reference

    reference = config_reference()
    cfg = RunConfig().to_dict()
    keys = [k for k, v in cfg.items() if not isinstance(v, dict)]
    keys += [f"{s}.{k}" for s, v in cfg.items() if isinstance(v, dict) for k in v]
    for key in keys:
        assert f"| `{key}` |" in reference
    assert all(line.split("|")[3].strip() for line in reference.splitlines()[2:]), "every key has a meaning"
    docs = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    assert reference in docs, "docs/config.md is stale: regenerate it with `superpose config`"
