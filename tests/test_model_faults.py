"""Model shapes and model folders from outside (issue 19, items 3, 7, 10, 14): a size no model can train from, in a
``model.config``, an ``init_from`` folder's config or ``model.overrides``, weights the model would not use, a pickle,
a model too large for the memory it would train in: one line and exit 2, before anything is allocated or written.

Case counts (hypothesis max_examples): sizes at or below zero 60, any small size 60.
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from conftest import run_error
from superpose.errors import SuperposeError
from superpose.models import build_model, custom_config, use_causal_sdpa
from superpose.models import memory
from superpose.train.loop import train

VOCAB = 512  # the embedded_data fixture's
SHAPES = {
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    "qwen3_moe": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16),
    "mixtral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def family_config(model_type: str, **fields) -> PretrainedConfig:
    """A tiny ``model_type`` config at the data's vocabulary (token ids of the family's default vocabulary dropped)."""
    ids = dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id"))
    return AutoConfig.for_model(model_type, **SHAPES[model_type], **ids, vocab_size=VOCAB, max_position_embeddings=64,
                                **fields)


def base_config(model_type: str) -> dict:
    return family_config(model_type).to_dict()


SIZES = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "intermediate_size", "n_inner", "max_position_embeddings", "decoder_sparse_step", "moe_intermediate_size",
         "num_experts", "num_experts_per_tok"]
"""Integer sizes of the families above, by their standard names (GPT-2's n_embd is hidden_size)."""
EXPERT_COUNTS = {"num_experts", "num_experts_per_tok", "moe_intermediate_size"}
"""Sizes of which 0 may mean none: no experts is a dense model."""


def sizes(model_type: str) -> list[str]:
    """The sizes a family's config has a value for, and GPT-2's optional MLP width."""
    config = AutoConfig.for_model(model_type, **SHAPES[model_type])
    return [name for name in SIZES if getattr(config, name, None) is not None or (name, model_type) == ("n_inner",
                                                                                                         "gpt2")]


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def toml(folder: Path, data: Path) -> Path:
    """A two-step CPU run on ``data`` writing under ``folder/runs``; the model comes from the command line."""
    path = folder / "run.toml"
    path.write_text(f'out_dir = "{folder / "runs"}"\n[data]\npath = "{data}"\n[optim]\nwarmup_steps = 0\n'
                    f'[train]\nsteps = 2\nbatch_size = 4\nseq_len = 16\ndevice = "cpu"\n[eval]\nevery = 0\n'
                    f'batches = 1\n[checkpoint]\nevery = 0\n')
    return path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A saved two-layer Llama at the data's vocabulary, untied."""
    folder = tmp_path_factory.mktemp("model") / "llama"
    config = family_config("llama", tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def edited_copy(folder: Path, to: Path, **fields) -> Path:
    shutil.copytree(folder, to)
    config = json.loads((to / "config.json").read_text())
    write_json(to / "config.json", {**config, **fields})
    return to


# --- item 3: an init_from folder's config is checked as overrides are, and its weights must all be used ----------


def test_an_init_from_config_of_negative_layers_is_refused(model_folder, embedded_data, tmp_path, capsys):
    folder = edited_copy(model_folder, tmp_path / "negative", num_hidden_layers=-4)
    line = run_error(capsys, ["train", str(toml(tmp_path, embedded_data)), f"model.init_from={folder}"])
    assert "model.init_from.num_hidden_layers" in line and "must be an integer >= 1, got -4" in line
    assert not (tmp_path / "runs").exists()


def test_weights_the_model_does_not_use_are_refused(model_folder, tiny_config, tmp_path):
    """One layer in config.json, two in the weights: the second layer's weights are named, not dropped."""
    folder = edited_copy(model_folder, tmp_path / "fewer", num_hidden_layers=1)
    cfg = tiny_config(model={"preset": "", "init_from": str(folder)})
    with pytest.raises(SuperposeError, match=r"holds weights its config.json builds no place for: "
                                             r"model\.layers\.1\.\S+, .* \(and 6 more\)$"):
        train(cfg, progress=False)
    assert not cfg.run_dir.exists()


def test_a_tied_head_copy_and_old_rotary_buffers_load(model_folder, tiny_config, tmp_path):
    """What transformers itself ignores still loads: the head saved beside tied embeddings with their values, and
    per-layer ``rotary_emb.inv_freq`` buffers of old checkpoints. A head of other values under a tied config is
    refused: transformers would untie it, and the trainer's tied model would keep one of the two."""
    folder = edited_copy(model_folder, tmp_path / "tied", tie_word_embeddings=True)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    result = train(tiny_config("tied", model={"preset": "", "init_from": str(folder)}, train={"steps": 2},
                               optim={"warmup_steps": 0}, eval={"every": 0}, checkpoint={"every": 0}), progress=False)
    assert result.run_dir.is_dir()
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SuperposeError, match="ties its embeddings .* but holds an LM head of other values"):
        train(tiny_config("untied", model={"preset": "", "init_from": str(folder)}), progress=False)


# --- items 7 and 14: sizes in a model.config and its overrides; a model too large for memory ------------------------


@pytest.mark.parametrize("fields, overrides, problem", [
    ({"hidden_size": -64}, {}, r"model\.config\.hidden_size \(in .*\): must be an integer >= 1, got -64"),
    ({"num_hidden_layers": -2}, {}, r"model\.config\.num_hidden_layers .*got -2"),
    ({"num_hidden_layers": 0}, {}, r"model\.config\.num_hidden_layers .*got 0"),
    ({}, {"num_hidden_layers": -1}, r"model\.overrides\.num_hidden_layers: must be an integer >= 1, got -1"),
    ({"intermediate_size": 0}, {}, r"model\.config\.intermediate_size .*got 0"),  # item 14: trained before
])
def test_sizes_below_one_in_a_model_config_are_one_line(fields, overrides, problem, embedded_data, tmp_path, capsys):
    path = write_json(tmp_path / "model.json", {**base_config("llama"), **fields})
    extra = [f"model.overrides.{k}={v}" for k, v in overrides.items()]
    line = run_error(capsys, ["train", str(toml(tmp_path, embedded_data)), f"model.config={path}", *extra])
    assert re.search(problem, line), line


def test_a_family_name_alone_is_refused_before_its_default_size_is_allocated(embedded_data, tiny_config, tmp_path,
                                                                              monkeypatch):
    """``{"model_type": "llama"}`` is Llama's default, 32 layers of width 4096: ~6.5B parameters, 97 GiB to train."""
    def allocate(*args, **kwargs):
        raise AssertionError("a weight was allocated before the size was checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", allocate)
    monkeypatch.setattr(memory, "available_memory", lambda device: 24 * 2**30)
    path = write_json(tmp_path / "bare.json", {"model_type": "llama"})
    cfg = tiny_config(model={"preset": "", "config": str(path)})
    with pytest.raises(SuperposeError, match=r"^model: 6\.\d\dB parameters need 9\d\.\d GiB to train \(16 bytes "
                                             r"each .*\), more than the 24\.0 GiB this host has"):
        train(cfg, progress=False)
    assert not cfg.run_dir.exists()


def test_training_memory_is_counted_per_rank_on_the_device_it_trains_on(monkeypatch):
    model = build_model("tiny", 256, device="meta")
    params = sum(p.numel() for p in model.parameters())
    need = params * memory.TRAINING_BYTES_PER_PARAMETER
    monkeypatch.setattr(memory, "available_memory", lambda device: need - 1)
    with pytest.raises(SuperposeError, match=r"more than the .* GiB this host has"):
        memory.check_fits(model, torch.device("cpu"))
    memory.check_fits(model, torch.device("cpu"), world_size=2, sharded=True)  # half on each rank
    with pytest.raises(SuperposeError):
        memory.check_fits(model, torch.device("cpu"), world_size=2, sharded=False)  # DDP: all of it on each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two FSDP ranks on one host's memory: all of it again
    with pytest.raises(SuperposeError, match="for its 2 ranks"):
        memory.check_fits(model, torch.device("cpu"), world_size=2, sharded=True)
    # on a GPU: that device's memory, whatever the host has
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: type("Properties", (), {"total_memory": need // 4})())
    with pytest.raises(SuperposeError, match="than the .* GiB cuda device 3 has"):
        memory.check_fits(model, torch.device("cuda", 3), world_size=2, sharded=True)
    memory.check_fits(model, torch.device("cuda", 3), world_size=8, sharded=True)


def test_host_memory_is_read_without_psutil():
    available = memory.available_memory(torch.device("cpu"))
    assert available is not None and 2**26 < available < 2**50
    assert memory.available_memory(torch.device("meta")) is None


# --- item 10: a refused pickle is one line -----------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_refused_pickle_is_one_line_on_stderr(model_folder, embedded_data, tmp_path):
    """A pickle of protocol 4 makes torch warn before it refuses: the user sees the refusal alone, and nothing ran."""
    folder = tmp_path / "pickled"
    shutil.copytree(model_folder, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)},
                                                            protocol=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "superpose", "train", str(toml(tmp_path, embedded_data)),
                           f"model.init_from={folder}", "--quiet"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds pickled weights that are not plain tensors" in lines[0], proc.stderr
    assert not marker.exists()


# --- the classes: any size of any family, from any of the three places a shape is given ---------------------------


def _from(route: str, model_type: str, name: str, value: int, model_folder: Path, tmp_path: Path) -> list[str]:
    """Command-line arguments giving ``name = value`` to a ``model_type`` model through ``route``."""
    config = base_config(model_type)
    json_name = AutoConfig.for_model(model_type).attribute_map.get(name, name)
    if route == "overrides":
        return [f"model.config={write_json(tmp_path / 'model.json', config)}", f"model.overrides.{name}={value}"]
    if route == "config":
        return [f"model.config={write_json(tmp_path / 'model.json', {**config, json_name: value})}"]
    folder = tmp_path / "folder"
    shutil.rmtree(folder, ignore_errors=True)
    return [f"model.init_from={edited_copy(model_folder, folder, **{json_name: value})}"]


@st.composite
def sizes_below_one(draw):
    model_type = draw(st.sampled_from(sorted(SHAPES)))
    route = draw(st.sampled_from(["config", "overrides"] + (["init_from"] if model_type == "llama" else [])))
    name = draw(st.sampled_from(sizes(model_type)))
    top = -1 if name in EXPERT_COUNTS else 0
    return model_type, route, name, draw(st.integers(-2**40, top) | st.integers(-3, top))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=sizes_below_one())
def test_any_size_below_one_from_anywhere_is_one_line(case, model_folder, embedded_data, tmp_path, capsys):
    model_type, route, name, value = case
    args = _from(route, model_type, name, value, model_folder, tmp_path)
    line = run_error(capsys, ["train", str(toml(tmp_path, embedded_data)), *args])
    assert not (tmp_path / "runs").exists(), line


@settings(max_examples=60, deadline=None)
@given(model_type=st.sampled_from(sorted(SHAPES)), data=st.data())
def test_any_small_size_is_refused_in_one_line_or_builds_and_runs(model_type, data, tmp_path_factory):
    """Sizes a config may hold (not the positions, which the trainer's seq_len must fit): one line, or a model
    whose forward gives finite logits, as the trainer runs it."""
    names = [n for n in sizes(model_type) if n not in ("max_position_embeddings", "vocab_size")]
    fields = data.draw(st.dictionaries(st.sampled_from(names), st.integers(-3, 40), min_size=1, max_size=3))
    path = write_json(tmp_path_factory.mktemp("config") / "model.json", base_config(model_type))
    try:
        model = build_model(custom_config(str(path), VOCAB, fields), seed=0)
    except SuperposeError as e:
        assert "\n" not in str(e) and str(e)
        return
    use_causal_sdpa(model)
    logits = model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()
