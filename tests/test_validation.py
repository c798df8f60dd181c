"""Input validation at the edge: random configs and random corruptions give a one-line SuperposeError or work.

Case counts (hypothesis max_examples): configs 300, meta.json corruptions 150, shard corruptions 150.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from superpose.data.loader import WindowLoader
from superpose.data.shards import open_dataset
from superpose.errors import SuperposeError
from superpose.train.checkpoint import write_manifest
from superpose.train.config import RunConfig
from superpose.train.config_load import config_from_dict
from superpose.train.loop import train

SECTIONS = {name: sorted(getattr(RunConfig(), name).__dataclass_fields__) for name in
            ("model", "data", "tst", "optim", "train", "eval", "checkpoint")}
values = st.one_of(st.integers(-3, 2000), st.floats(-2, 3), st.just(float("nan")), st.booleans(), st.text(max_size=6),
                   st.lists(st.lists(st.one_of(st.integers(-1, 20), st.floats(0, 1.2)), max_size=3), max_size=4))


@st.composite
def raw_configs(draw):
    data = {}
    for section, keys in SECTIONS.items():
        if draw(st.booleans()):
            names = st.sampled_from(keys + ["bogus"])
            data[section] = draw(st.dictionaries(names, values, max_size=4))
    if draw(st.booleans()):
        data[draw(st.sampled_from(["name", "seed", "extra"]))] = draw(values)
    return data


@settings(max_examples=300, deadline=None)
@given(raw_configs())
def test_random_configs_are_valid_or_one_line_errors(data):
    try:
        cfg = config_from_dict(data)
    except SuperposeError as e:
        assert "\n" not in str(e) and str(e)
        return
    schedule = cfg.phase_schedule()  # a config that validates has a usable schedule
    assert schedule.bag_at(cfg.train.steps - 1) >= 1
    assert cfg.train.batch_size % cfg.micro_batch_size(1) == 0


def test_global_batch_must_divide_by_world_size():
    with pytest.raises(SuperposeError, match="train.batch_size: 16 is not divisible by the world size 3"):
        config_from_dict({"train": {"batch_size": 16}}, world_size=3)
    assert config_from_dict({"train": {"batch_size": 16}}, world_size=4).local_batch_size(4) == 4


@pytest.fixture(scope="module")
def pristine(embedded_data, tmp_path_factory):
    """A small copy of the prepared data to corrupt (the session fixture stays intact)."""
    out = tmp_path_factory.mktemp("pristine") / "data"
    shutil.copytree(embedded_data, out)
    return out


def exercise(folder: Path) -> None:
    """What training does with a dataset: open it, then read every training token through the loader."""
    ds = open_dataset(folder)
    stream = ds.split("train")
    loader = WindowLoader(stream, 1, seed=0)
    batch = loader.next_batch(len(stream))
    assert int(batch.max()) < ds.vocab_size


def corrupt_copy(pristine: Path, tmp: Path, name: str, edit) -> Path:
    target = tmp / "data"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(pristine, target)
    path = target / name
    path.write_bytes(edit(path.read_bytes()))
    return target


byte_edits = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 9), st.just(0)),
)


def apply(edit, blob: bytes) -> bytes:
    kind, at, value = edit
    if kind == "append":
        return blob + bytes(at)
    if not blob:
        return blob
    if kind == "flip":
        i = at % len(blob)
        return blob[:i] + bytes([blob[i] ^ value]) + blob[i + 1:]
    return blob[: at % len(blob)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(byte_edits, min_size=1, max_size=3))
def test_corrupt_meta_is_a_one_line_error_or_harmless(pristine, tmp_path, edits):
    def edit(blob):
        for e in edits:
            blob = apply(e, blob)
        return blob

    folder = corrupt_copy(pristine, tmp_path, "meta.json", edit)
    try:
        exercise(folder)
    except SuperposeError as e:
        assert "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=byte_edits, split=st.sampled_from(["train", "val"]))
def test_corrupt_shard_is_a_one_line_error_or_harmless(pristine, tmp_path, edit, split):
    folder = corrupt_copy(pristine, tmp_path, f"{split}-00000.bin", lambda blob: apply(edit, blob))
    try:
        exercise(folder)
    except SuperposeError as e:
        assert "\n" not in str(e)
        assert re.search(r"(shard|meta\.json|\.bin)", str(e)), str(e)  # names the file


def test_out_of_vocabulary_id_names_the_shard(pristine, tmp_path):
    vocab = json.loads((pristine / "meta.json").read_text())["vocab_size"]
    bad = np.array([vocab + 7], dtype=np.uint16).tobytes()
    folder = corrupt_copy(pristine, tmp_path, "train-00000.bin", lambda blob: blob[:100] + bad + blob[102:])
    with pytest.raises(SuperposeError, match="train-00000.bin is damaged"):  # the recorded checksum sees it first
        exercise(folder)
    meta = json.loads((folder / "meta.json").read_text())  # a dataset without checksums: the vocabulary check
    for split in meta["splits"].values():
        for shard in split["shards"]:
            shard.pop("sha256")
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SuperposeError, match=rf"train-00000.bin is corrupt: token 50 has id {vocab + 7}"):
        exercise(folder)


def test_training_on_corrupt_data_writes_nothing(pristine, tmp_path, tiny_config):
    folder = corrupt_copy(pristine, tmp_path, "train-00000.bin", lambda blob: blob[:-2])
    cfg = tiny_config(data={"path": str(folder)})
    with pytest.raises(SuperposeError, match="train-00000.bin has"):
        train(cfg, progress=False)
    assert not cfg.run_dir.exists()


def test_checkpoint_missing_files(tiny_config):
    cfg = tiny_config(train={"steps": 4})
    train(cfg, progress=False)
    (cfg.run_dir / "checkpoints/step-0000004/optimizer.pt").unlink()
    with pytest.raises(SuperposeError, match="step-0000004 is missing optimizer.pt"):
        train(cfg, resume=True, progress=False)


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.pt", "state.json", "state-keys"])
def test_corrupt_checkpoint_files_are_one_line_errors(tiny_config, damage):
    cfg = tiny_config(train={"steps": 4})
    train(cfg, progress=False)
    ckpt = cfg.run_dir / "checkpoints/step-0000004"
    if damage == "state-keys":
        (ckpt / "state.json").write_text("{}")
    else:
        blob = (ckpt / damage).read_bytes()
        (ckpt / damage).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SuperposeError, match="step-0000004") as e:
        train(cfg, resume=True, progress=False)
    assert "\n" not in str(e.value)


def _set_state(field, value):
    def edit(ckpt):
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, field: value}))
        write_manifest(ckpt)  # a consistent checkpoint, so only the content check can catch it
    return edit


def _empty_optimizer(ckpt):
    torch.save({"state": {}, "param_groups": torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]},
               ckpt / "optimizer.pt")
    write_manifest(ckpt)  # a consistent checkpoint, so only the content check can catch it


def _flip_a_weight_bit(ckpt):
    blob = bytearray((ckpt / "model.safetensors").read_bytes())
    blob[-5] ^= 0x10  # inside the last tensor's data: the file still parses
    (ckpt / "model.safetensors").write_bytes(bytes(blob))


CHECKPOINT_DAMAGE = {
    "state.json holds 42": (lambda c: ((c / "state.json").write_text("42"), write_manifest(c)), "state.json holds int"),
    "step is text": (_set_state("step", "abc"), "field step is corrupt"),
    "loader is null": (_set_state("loader", None), "field loader is corrupt"),
    "wall_time is text": (_set_state("wall_time", "x"), "field wall_time is corrupt"),
    "optimizer.pt replaced": (lambda c: torch.save([1, 2], c / "optimizer.pt"), "optimizer.pt is damaged"),
    "optimizer.pt holds a list": (lambda c: (torch.save([1, 2], c / "optimizer.pt"), write_manifest(c)),
                                  "optimizer.pt does not hold an optimizer state"),
    "optimizer state empty": (_empty_optimizer, "the optimizer state holds no moments"),
    "a weight bit flipped": (_flip_a_weight_bit, "model.safetensors is damaged"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE, ids=list(CHECKPOINT_DAMAGE))
def test_wrong_checkpoint_contents_are_one_line_errors_before_anything_is_rewritten(tiny_config, damage):
    edit, fragment = CHECKPOINT_DAMAGE[damage]
    cfg = tiny_config(train={"steps": 4}, checkpoint={"every": 2, "keep": 2})
    train(cfg, progress=False)
    edit(cfg.run_dir / "checkpoints/step-0000004")
    before = {p: p.read_bytes() for p in cfg.run_dir.iterdir() if p.is_file()}
    with pytest.raises(SuperposeError, match=re.escape(fragment)) as e:
        train(cfg, resume=True, progress=False)
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in cfg.run_dir.iterdir() if p.is_file()} == before


def test_bad_device_is_one_line_and_writes_nothing(tiny_config):
    cfg = tiny_config(train={"device": "gpu"})
    with pytest.raises(SuperposeError, match="train.device: 'gpu' is not a device"):
        train(cfg, progress=False)
    assert not cfg.run_dir.exists()


SOURCE = Path(__file__).parent.parent / "src" / "superpose"


def test_no_unsafe_deserialisation_anywhere():
    """Weights only through safetensors or weights_only torch.load; no pickle; no remote code by default."""
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"pickle\.loads?\(|Unpickler\(", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "trust_remote_code=True" not in text, path


OVERRIDE_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "rope_theta",
                 "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "bogus"]
override_values = st.one_of(st.integers(-2, 40), st.floats(-1, 1e6), st.just(float("nan")), st.booleans(),
                            st.text(max_size=3), st.none())


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["tiny", "tiny-moe"]), st.dictionaries(st.sampled_from(OVERRIDE_KEYS), override_values, max_size=4))
def test_random_model_overrides_are_refused_in_one_line_or_build_and_run(preset, overrides):
    """A validated override builds a model whose forward runs and gives finite logits."""
    from superpose.models import build_model, use_causal_sdpa

    try:
        config_from_dict({"model": {"preset": preset, "overrides": overrides}})
        model = build_model(preset, 64, **overrides)
    except SuperposeError as e:
        assert "\n" not in str(e) and str(e)
        return
    use_causal_sdpa(model)  # as the trainer runs it
    logits = model(input_ids=torch.zeros(1, 5, dtype=torch.long)).logits
    assert logits.shape == (1, 5, 64) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def finished_checkpoint(embedded_data, tmp_path_factory):
    from conftest import make_tiny_config

    cfg = make_tiny_config(embedded_data, tmp_path_factory.mktemp("ckpt"), "ckpt", train={"steps": 2},
                           optim={"warmup_steps": 0})
    train(cfg, progress=False)
    return cfg, cfg.run_dir / "checkpoints" / "step-0000002"


state_values = st.one_of(st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=4), st.none(),
                         st.booleans(), st.lists(st.integers(0, 3), max_size=2),
                         st.dictionaries(st.sampled_from(["seed", "position", "batch_size", "x"]), st.integers(-1, 99),
                                         max_size=3))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.dictionaries(st.sampled_from(["step", "text_tokens", "flops", "wall_time", "skipped",
                                              "skipped_in_row", "loader", "sha256", "keep_always"]), state_values,
                             min_size=1, max_size=3))
def test_random_state_json_contents_resume_or_are_one_line_errors(finished_checkpoint, tmp_path_factory, edits):
    """Whatever a state.json holds, reading a checkpoint for a resume either works or names the problem in a line."""
    from superpose.models import build_model
    from superpose.train.checkpoint import load_checkpoint
    from superpose.train.state import TrainState

    cfg, pristine = finished_checkpoint
    ckpt = tmp_path_factory.mktemp("edited") / pristine.name
    shutil.copytree(pristine, ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, **edits}))
    write_manifest(ckpt)  # consistent: the content checks must catch it
    model = build_model("tiny", 512, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    try:
        saved = load_checkpoint(ckpt, model, optimizer)
        progress = TrainState.from_state_dict(saved, "edited")
        loader = WindowLoader(open_dataset(cfg.data.path).split("train"), cfg.train.batch_size, cfg.seed)
        loader.load_state_dict(progress.loader)
    except SuperposeError as e:
        assert "\n" not in str(e) and str(e)
