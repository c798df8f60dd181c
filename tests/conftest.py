import pytest

from superpose.data.prepare import prepare
from superpose.train.config import RunConfig, config_from_dict


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """A small prepared slice of the embedded corpus (the Python standard library), shared by the trainer tests."""
    out = tmp_path_factory.mktemp("data") / "embedded"
    prepare(["embedded"], out, vocab_size=512, max_bytes=400_000, val_fraction=0.05, progress=False)
    return out


@pytest.fixture
def tiny_config(embedded_data, tmp_path):
    """Factory of a seconds-long CPU run: tiny preset, 12 steps, bag 4 for the first half."""

    def make(name: str = "run", **sections) -> RunConfig:
        data = {
            "name": name,
            "out_dir": str(tmp_path / "runs"),
            "model": {"preset": "tiny"},
            "data": {"path": str(embedded_data)},
            "tst": {"bag": 4, "ratio": 0.5},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"steps": 12, "batch_size": 4, "seq_len": 16, "device": "cpu", "log_every": 1},
            "eval": {"every": 4, "batches": 2},
            "checkpoint": {"every": 4, "keep": 2},
        }
        for section, values in sections.items():
            data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
        return config_from_dict(data)

    return make
