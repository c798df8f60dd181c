"""Any transformers causal LM (``model.config``) and continued pretraining (``model.init_from``).

Each family trains across the TST switch (bag 2, then bag 1), resumes with the losses of the uninterrupted run, and
exports a folder that plain ``AutoModelForCausalLM`` loads with the trainer's own loss and logits, for families that
change their logits after the head too (Gemma 2, Cohere, Granite: the loss applies the same map, full or fused).
Families the TST input path cannot drive, or whose logit map it does not know, are refused in one line before
anything is written.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import run_error, torchrun
from superpose.data.tokenizer import train_tokenizer
from superpose.errors import SuperposeError
from superpose.export import export
from superpose.flops import counted_matmul_parameters, flops_per_step, matmul_parameters
from superpose.models import CAUSAL_SDPA, PRESETS, model_config, moe_shape, parameter_counts
from superpose.train.checkpoint import list_checkpoints, load_checkpoint
from superpose.train.config import ModelConfig
from superpose.train.config_load import config_from_dict
from superpose.train.distributed import decoder_layers
from superpose.train.loop import train
from superpose.train.metrics import read_metrics
from superpose.train.step import TrainModule

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             head_dim=8, max_position_embeddings=64)

FAMILIES = {
    "qwen2": {},
    "mistral": {"sliding_window": 8},  # shorter than the windows: the trainer must keep transformers' mask
    "gemma3_text": {"sliding_window": 8, "query_pre_attn_scalar": 8},  # 1 + w norms, scaled embeddings
    "olmo2": {},
    "phi3": {},
    "gpt_neox": {"rotary_pct": 0.5},
    # learned positions, Conv1D projections, a backbone under another prefix (transformer.); no dropout, which draws
    # from the global RNG that a checkpoint does not hold (docs/models.md)
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # MoE under other field names, router loss
    # logits changed after the head: a soft cap low enough to bend these logits, a scale, a division (Granite's
    # other multipliers too, which act inside the backbone)
    "gemma2": {"final_logit_softcapping": 2.0, "sliding_window": 8, "query_pre_attn_scalar": 8},
    "cohere": {"logit_scale": 0.5},
    "granite": {"logits_scaling": 0.25, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.2},
}


def write_config(folder, model_type: str, **fields):
    """A tiny random-architecture config.json of ``model_type``."""
    ids = dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id"))  # defaults beyond 1024 only warn here
    config = AutoConfig.for_model(model_type, **{**SHAPE, **ids, "vocab_size": 1024, **fields})
    config.save_pretrained(folder)
    return folder / "config.json"


def losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def family_run(tiny_config, model: dict, name: str = "run", steps: int = 4):
    """A few steps across the switch: bag 2 for the first half, then bag 1; checkpoints at 2 (the switch) and 4.
    ``model`` replaces the tiny preset of the shared config."""
    return tiny_config(name, model={"preset": "", **model}, tst={"bag": 2, "ratio": 0.5}, optim={"warmup_steps": 1},
                       train={"steps": steps, "log_every": 1}, eval={"every": 0, "batches": 1},
                       checkpoint={"every": 0})


def trainer_loss_and_logits(cfg, checkpoint, vocab_size, window):
    """The trainer's bag-1 loss and logits (the LM head's, then the family's logit map) on ``window`` from a
    checkpoint, as training computes them."""
    module = TrainModule(cfg, vocab_size, torch.device("cpu"), init=False)
    load_checkpoint(checkpoint, module.model, None)
    module.model.eval()
    lm = module.model
    with torch.no_grad():
        hidden = lm.base_model(inputs_embeds=lm.get_input_embeddings()(window[:, :-1])).last_hidden_state
        return module.loss(window, 1, "both").loss, module.objective.logits(hidden)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_resumes_and_exports(family, tiny_config, embedded_data, tmp_path):
    path = write_config(tmp_path / family, family, **FAMILIES[family])
    cfg = family_run(tiny_config, {"config": str(path)})
    cfg.train.loss_chunk = 24 if family in ("gemma2", "granite") else 0  # the map in the fused loss, and in full
    result = train(cfg, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["bag"] for r in rows] == [2, 2, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert (info["family"], info["model"], info["preset"]) == (family, f"config {path}", None)
    vocab = info["vocab_size"]
    assert json.loads((result.run_dir / "config.json").read_text())["vocab_size"] == vocab  # the data's, not 1024

    cut = family_run(tiny_config, {"config": str(path)}, name="cut")
    cut.train.loss_chunk = cfg.train.loss_chunk
    shutil.copytree(result.run_dir, cut.run_dir)
    shutil.rmtree(list_checkpoints(cut.run_dir)[-1])  # killed after the switch checkpoint (step 2)
    assert losses(train(cut, resume=True, progress=False).run_dir) == losses(result.run_dir)

    out = export(result.run_dir, tmp_path / "export")
    served = AutoModelForCausalLM.from_pretrained(out).eval()
    window = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    loss, logits = trainer_loss_and_logits(cfg, list_checkpoints(result.run_dir)[-1], vocab, window)
    with torch.no_grad():
        plain = served(input_ids=window[:, :-1]).logits
    torch.testing.assert_close(plain, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.cross_entropy(plain.flatten(0, 1), window[:, 1:].flatten()), loss,
                               atol=1e-5, rtol=1e-5)


def test_family_specifics_are_found_generically(tmp_path):
    """Blocks by class, MoE shape by the family's own field names, FLOPs counted off the model."""
    gpt2 = ModelConfig(config=str(write_config(tmp_path / "gpt2", "gpt2"))).build_config(300)
    module = TrainModule(config_from_dict({"model": {"config": str(tmp_path / "gpt2")}}), 300, torch.device("cpu"))
    assert [type(b).__name__ for b in decoder_layers(module.model)] == ["GPT2Block"] * 2
    assert module.model.config._attn_implementation == CAUSAL_SDPA
    assert counted_matmul_parameters(gpt2) == 2 * (4 * 32 * 32 + 8 * 32 * 32) + 300 * 32  # blocks + tied head
    attention = 12 * 2 * 4 * 8 * 16  # layers, heads, head width, L: PaLM's score-matrix term
    assert flops_per_step(gpt2, 4, 16) == (6 * counted_matmul_parameters(gpt2) + attention) * 4 * 16
    write_config(tmp_path / "mistral", "mistral", sliding_window=8)
    assert TrainModule(config_from_dict({"model": {"config": str(tmp_path / "mistral")}}), 300,
                       torch.device("cpu")).model.config._attn_implementation == "sdpa"  # the window needs a mask
    mixtral = ModelConfig(config=str(write_config(tmp_path / "mixtral", "mixtral", num_local_experts=4,
                                                  num_experts_per_tok=2))).build_config(300)
    assert moe_shape(mixtral) == (4, 2)
    total, active = parameter_counts(mixtral)
    assert total - active == 2 * 2 * 3 * 32 * 64  # per layer, two idle experts of gate, up, down
    for name in PRESETS:  # the counted path agrees with the preset arithmetic it stands in for
        assert counted_matmul_parameters(model_config(name)) == matmul_parameters(model_config(name))


@pytest.mark.parametrize(("model_type", "fields", "problem"), [
    ("vit", {}, "is vit, which is not a causal LM"),
    ("t5", {}, "is t5, an encoder-decoder model"),
    ("bert", {}, "LM head is more than one linear layer"),  # BertLMHeadModel: a transform before the decoder
    ("hyperclovax", {"logits_scaling": 2.0}, r"\(logits_scaling = 2.0\), a map the TST loss does not know"),
    ("mpt", {"logit_scale": 0.5}, r"\(logit_scale = 0.5\), a map the TST loss does not know"),
])
def test_family_tst_cannot_drive_is_refused_in_one_line(model_type, fields, problem, tiny_config, tmp_path, capsys):
    path = write_config(tmp_path / model_type, model_type, **fields)
    cfg = family_run(tiny_config, {"config": str(path)})
    with pytest.raises(SuperposeError, match=problem):
        train(cfg, progress=False)
    assert not cfg.run_dir.exists()


def test_model_config_input_errors_are_one_line(tiny_config, embedded_data, tmp_path, capsys):
    small = write_config(tmp_path / "small", "qwen2", vocab_size=100)
    with pytest.raises(SuperposeError, match="vocab_size 100, smaller than the 512 token ids"):
        train(family_run(tiny_config, {"config": str(small)}), progress=False)
    with pytest.raises(SuperposeError, match="qwen2 config has no such field"):
        train(family_run(tiny_config, {"config": str(small), "overrides": {"no_such": 1}}), progress=False)
    with pytest.raises(SuperposeError, match="must be of the type"):
        train(family_run(tiny_config, {"config": str(small), "overrides": {"hidden_size": 3.5}}), progress=False)
    line = run_error(capsys, ["train", str(_toml(tmp_path, embedded_data)), "model.preset=tiny",
                              f"model.config={small}"])
    assert "model.preset and model.config exclude each other" in line
    line = run_error(capsys, ["train", str(_toml(tmp_path, embedded_data)), f"model.config={tmp_path}/none.json"])
    assert "none.json not found" in line


def _toml(tmp_path, data):
    path = tmp_path / "run.toml"
    path.write_text(f'out_dir = "{tmp_path / "runs"}"\n[data]\npath = "{data}"\n[optim]\nwarmup_steps = 0\n'
                    f'[train]\nsteps = 2\ndevice = "cpu"\n')
    return path


# --- model.init_from -------------------------------------------------------------------------------------------


@pytest.fixture
def exported(tst_run, tmp_path):
    return export(tst_run, tmp_path / "export")


def test_init_from_an_export_reproduces_its_weights_bit_for_bit(exported, tiny_config, embedded_data):
    cfg = tiny_config(model={"preset": "", "init_from": str(exported)})
    vocab = json.loads((exported / "config.json").read_text())["vocab_size"]
    module = TrainModule(cfg, vocab, torch.device("cpu"))
    want = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    got = module.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_run_continued_from_an_export_trains_and_resumes_without_it(exported, tiny_config):
    cfg = family_run(tiny_config, {"init_from": str(exported)}, name="continued")
    fresh = read_metrics(train(family_run(tiny_config, {"preset": "tiny"}, name="fresh"),
                               progress=False).run_dir / "metrics.jsonl")
    result = train(cfg, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    # the same steps from the export's weights instead of the seeded init: TST phase 1 on a trained model
    assert all(a["train_loss"] < b["train_loss"] - 0.3 for a, b in zip(rows, fresh))
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert (info["model"], info["family"]) == (f"init_from {exported}", "llama")
    # a resume takes the weights from its checkpoint: the export's weights are not read again
    shutil.rmtree(list_checkpoints(result.run_dir)[-1])
    (exported / "model.safetensors").unlink()
    train(cfg, resume=True, progress=False)
    assert losses(result.run_dir) == [(r["step"], r["train_loss"]) for r in rows]


def test_init_from_refuses_another_tokenizer_or_vocabulary(exported, tiny_config, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(exported, other)
    train_tokenizer(["a different corpus, a different vocabulary"] * 4, 512).save(str(other / "tokenizer.json"))
    cfg = family_run(tiny_config, {"init_from": str(other)})
    with pytest.raises(SuperposeError, match=r"init_from .*tokenizer.json does not match the shards"):
        train(cfg, progress=False)
    (other / "tokenizer.json").unlink()
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(SuperposeError, match="must be equal"):
        train(cfg, progress=False)
    # weights that do not fit the config: the one line names the weight and both shapes, and no run folder is left
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 8}))
    with pytest.raises(SuperposeError, match=r"layers\.0\.mlp\.\w+_proj\.weight is \[\d+, \d+\] in "
                                             r"model\.safetensors but \[\d+, \d+\] for its config\.json"):
        train(cfg, progress=False)
    with pytest.raises(SuperposeError, match="model.preset and model.init_from exclude each other"):
        ModelConfig(preset="tiny", init_from=str(other)).validate()
    assert not cfg.run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("family, parallel", [("gpt2", "fsdp"), ("gemma3_text", "fsdp"), ("gpt2", "ddp")])
def test_init_from_on_two_ranks_matches_one_process(family, parallel, tiny_config, tmp_path):
    """Two gloo ranks start from an export's weights: under FSDP2 each copies its shard (blocks found by class;
    Gemma's buffers and gains set on shards), under DDP each loads them whole. The losses are one process's."""
    path = write_config(tmp_path / family, family, **FAMILIES[family])
    source = train(family_run(tiny_config, {"config": str(path)}, name="source"), progress=False).run_dir
    exported = export(source, tmp_path / "export")
    one = train(family_run(tiny_config, {"init_from": str(exported)}, name="one"), progress=False).run_dir
    two = family_run(tiny_config, {"init_from": str(exported)}, name="two")
    two.train.parallel = parallel
    (tmp_path / "two.toml").write_text(two.to_toml())
    torchrun(tmp_path / "two.toml")
    assert json.loads((two.run_dir / "run.json").read_text())["parallel"] == parallel
    for a, b in zip(read_metrics(one / "metrics.jsonl"), read_metrics(two.run_dir / "metrics.jsonl"), strict=True):
        assert (a["step"], a["bag"]) == (b["step"], b["bag"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
