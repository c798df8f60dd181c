"""The GPU path rehearsed on the CPU: what a CUDA run hands to torch (an indexed device, the allocator setting), the
context each parallel mode's forward runs under, MoE experts in bf16 under autocast, torchtitan's FSDP units, and
compiled blocks after wrapping (no graph breaks at FSDP's hooks, no compile during eval, eager without a compiler).
CUDA is patched in where the code only asks torch about it; tests/test_gpu.py runs the rest on a GPU."""

from __future__ import annotations

import collections
import functools
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from superpose import method
from superpose.train import distributed
from superpose.train.config_load import config_from_dict
from superpose.train.distributed import CUDA_ALLOC_CONF, init_one_rank_group, resolve_device, shutdown
from superpose.train.loop import train
from superpose.train.step import TrainModule

VOCAB = 512


def make_module(preset: str = "tiny", overrides: dict | None = None, tst: dict | None = None, **train) -> TrainModule:
    model = {"preset": preset, **({"overrides": overrides} if overrides else {})}
    cfg = config_from_dict({"model": model, "tst": {"bag": 4, **(tst or {})},
                            "train": {"batch_size": 4, "seq_len": 16, "device": "cpu", "micro_batch_size": 2, **train}})
    return TrainModule(cfg, VOCAB, torch.device("cpu"))


def window(bag: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, method.window_length(16, bag)), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_rank_group():
    """A one-rank gloo group: TrainModule then shards with FSDP2, as one GPU does."""
    init_one_rank_group(torch.device("cpu"))
    yield
    shutdown()


class Reached(Exception):
    """Raised by the stand-in for init_process_group once it has recorded its call."""


@pytest.fixture
def cuda_patched(monkeypatch):
    """torch reports one GPU (an H200, current device 0); init_process_group records its call, then stops the run."""
    calls = []

    def init_process_group(backend, **kwargs):
        calls.append({"backend": backend, **kwargs})
        raise Reached

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    h200 = SimpleNamespace(name="NVIDIA H200", total_memory=141 << 30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: h200)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize(("device", "env", "expected"), [
    ("auto", {}, torch.device("cuda", 0)),  # one GPU: FSDP2 over a one-rank NCCL group
    ("cuda", {}, torch.device("cuda", 0)),
    ("cuda", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, torch.device("cuda", 1)),  # torchrun
])
def test_the_cuda_device_reaching_the_process_group_has_an_index(cuda_patched, monkeypatch, tiny_config, device, env,
                                                                 expected):
    """init_process_group refuses ``device_id=cuda`` ("Please use a device_id with index."): the whole start-up
    path of ``train`` up to the process group, with one GPU patched in."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Reached):
        train(tiny_config(train={"device": device, "parallel": "fsdp"}), progress=False)
    (call,) = cuda_patched
    assert call["backend"] == "nccl" and call["device_id"] == expected and call["device_id"].index is not None


def test_cuda_gets_expandable_segments_before_it_initialises_unless_the_user_chose(cuda_patched, monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "current_device",
                        lambda: seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF")) or 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert seen == [CUDA_ALLOC_CONF]  # set before the first call that initialises CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    resolve_device("cuda")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    resolve_device("cuda")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert resolve_device("cpu") == torch.device("cpu")


def forward_contexts(module: TrainModule) -> set[tuple[bool, torch.dtype]]:
    """(autocast on, weight dtype) as each block's forward saw them during one step."""
    seen = set()

    def record(block, args):
        seen.add((torch.is_autocast_enabled("cpu"), block.self_attn.q_proj.weight.dtype))

    handles = [block.register_forward_pre_hook(record) for block in distributed.decoder_layers(module.model)]
    module.train_step(window(4), 4, 1e-3)
    for handle in handles:
        handle.remove()
    return seen


def test_bf16_forward_runs_under_autocast_only_over_fp32_weights(one_rank_group):
    """FSDP2 with bf16 parameters: no autocast on top (it would upcast ops again); DDP and one process keep their
    fp32 weights and compute under autocast. The same step either way, within bf16 rounding."""
    sharded = make_module(dtype="bf16")
    assert sharded.sharded and forward_contexts(sharded) == {(False, torch.bfloat16)}
    shutdown()
    plain = make_module(dtype="bf16")
    assert not plain.sharded and forward_contexts(plain) == {(True, torch.float32)}
    init_one_rank_group(torch.device("cpu"))  # for the fixture's shutdown


def test_moe_experts_run_bf16_grouped_mm_under_autocast(monkeypatch):
    """Autocast does not cover grouped_mm: over fp32 expert weights it would run in fp32 (on CUDA: off the bf16
    kernel, into a fallback that reads the offsets back to the host in every MoE layer)."""
    seen = collections.Counter()
    real = torch.nn.functional.grouped_mm

    def recorded(a, b, **kwargs):
        seen[(a.dtype, b.dtype)] += 1
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", recorded)
    module = make_module("tiny-moe", dtype="bf16")
    row = module.train_step(window(4), 4, 1e-3).to_host()
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert row["finite"] == 1.0
    experts = [p for n, p in module.model.named_parameters() if ".experts." in n]
    assert experts and all(p.dtype == torch.float32 for p in experts)  # master weights stay fp32
    # fp32 training is untouched: no autocast, no cast
    seen.clear()
    make_module("tiny-moe").train_step(window(4), 4, 1e-3)
    assert set(seen) == {(torch.float32, torch.float32)}


def fsdp_units(module: TrainModule) -> list[set[str]]:
    """The parameter names each FSDP unit holds: the root's first (empty when it holds none), then the others'."""
    names = {id(p): n for n, p in module.model.named_parameters()}
    units = []
    for m in module.objective.modules():
        state = m._get_fsdp_state() if isinstance(m, FSDPModule) else None
        if state is not None and state._modules[0] is m and (m is module.objective or state._fsdp_param_group):
            group = state._fsdp_param_group
            units.append({names[id(fp.sharded_param)] for fp in group.fsdp_params} if group else set())
    return units


def block_units(layers: int) -> list[set[str]]:
    per_block = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
    return [{f"model.layers.{i}.{m}.weight" for m in per_block} | {f"model.layers.{i}.input_layernorm.weight",
                                                                    f"model.layers.{i}.post_attention_layernorm.weight"}
            for i in range(layers)]


UNTIED = {"tie_word_embeddings": False}


@pytest.mark.parametrize(("loss_chunk", "rescale"), [(0, False), (8, False), (0, True)])
def test_fsdp_units_as_torchtitan_lays_them_out(one_rank_group, loss_chunk, rescale):
    """Untied: the embeddings are a unit, each block is one, the final norm with the head is one (the fused loss
    never calls the head: the norm's forward gathers it), and the root holds nothing. The first steps are those of
    one process, the rescaled bag mean too (its backward reads the table, so that unit gathers it for backward)."""
    module = make_module(overrides=UNTIED, tst={"rescale_mean": rescale}, loss_chunk=loss_chunk)
    head = {"model.norm.weight", "lm_head.weight"}
    assert fsdp_units(module) == [set(), {"model.embed_tokens.weight"}, *block_units(4), head]
    steps = [module.train_step(window(bag, i), bag, 1e-3).to_host() for i, bag in enumerate((4, 1))]
    weights = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True))
    shutdown()
    plain = make_module(overrides=UNTIED, tst={"rescale_mean": rescale}, loss_chunk=loss_chunk)
    for i, (bag, got) in enumerate(zip((4, 1), steps)):
        want = plain.train_step(window(bag, i), bag, 1e-3).to_host()
        assert all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)
    for name, value in plain.model.state_dict().items():  # what a checkpoint of either run holds
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0)
    init_one_rank_group(torch.device("cpu"))


def test_tied_embeddings_keep_embeddings_norm_and_head_in_the_root(one_rank_group):
    module = make_module()  # tiny ties its head to the embeddings: one weight, one unit
    assert fsdp_units(module) == [{"model.embed_tokens.weight", "model.norm.weight"}, *block_units(4)]
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight


@pytest.mark.parametrize("rescale", [False, True])
def test_the_embedding_unit_holds_the_table_for_the_bag_mean_alone(one_rank_group, monkeypatch, rescale):
    """Per micro-batch: the table is gathered as the bag mean starts and freed when it returns (the first block
    sees the shard again), gathered again for backward only when backward reads it (the rescaled mean), and its
    gradient is reduce-scattered once, after every other unit's, before the next micro-batch's forward."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor import DTensor

    module = make_module(overrides=UNTIED, tst={"rescale_mean": rescale})
    table = module.model.get_input_embeddings()
    events = []

    def bag_means(weight, bags, rescale):
        events.append("bag mean over the full table" if type(weight) is torch.nn.Parameter else "bag mean, sharded")
        return real_bag_means(weight, bags, rescale)

    def to_unsharded(fsdp_param):
        if fsdp_param.sharded_param is table.weight:
            events.append("table gathered")
        return real_to_unsharded(fsdp_param)

    def post_backward(group, *args):
        events.append(f"reduce-scatter {group._module_fqn.removeprefix('lm.model.')}")
        return real_post_backward(group, *args)

    real_bag_means, real_to_unsharded, real_post_backward = (method.bag_means, FSDPParam.to_unsharded,
                                                             FSDPParamGroup.post_backward)
    monkeypatch.setattr(method, "bag_means", bag_means)
    monkeypatch.setattr(FSDPParam, "to_unsharded", to_unsharded)
    monkeypatch.setattr(FSDPParamGroup, "post_backward", post_backward)
    module.model.model.layers[0].register_forward_pre_hook(
        lambda *_: events.append("block 0, table " + ("sharded" if isinstance(table.weight, DTensor) else "held")))
    module.train_step(window(4), 4, 1e-3)
    backward = ["reduce-scatter norm, lm.lm_head", *(f"reduce-scatter layers.{i}" for i in (3, 2, 1, 0)),
                *(["table gathered"] if rescale else []), "reduce-scatter embed_tokens"]
    micro_batch = ["table gathered", "bag mean over the full table", "block 0, table sharded", *backward]
    assert events == micro_batch * 2


def test_gemma_scales_the_bag_means_its_embedding_unit_returns(one_rank_group, tmp_path):
    """Gemma scales lookups (by sqrt(d)) inside its embedding's forward, which the objective never calls: the inputs
    the objective builds at bag 1 are still the module's own lookups, its table in a unit of its own."""
    from test_families import write_config

    path = write_config(tmp_path, "gemma3_text", sliding_window=8, query_pre_attn_scalar=8, tie_word_embeddings=False)
    cfg = config_from_dict({"model": {"config": str(path)}, "tst": {"bag": 4},
                            "train": {"batch_size": 4, "seq_len": 16, "device": "cpu", "micro_batch_size": 2}})
    module = TrainModule(cfg, 1024, torch.device("cpu"))
    assert fsdp_units(module)[1] == {"model.embed_tokens.weight"}
    module.train_step(window(4), 4, 1e-3)  # the root's first forward (FSDP2's lazy init)
    embedding, ids = module.model.get_input_embeddings(), window(1)[:, :16]
    with torch.no_grad():
        ours, own = module.objective.embed(ids, 1), embedding(ids)
    assert embedding.embed_scale.item() == pytest.approx(32**0.5)  # the hidden size of test_families.SHAPE
    torch.testing.assert_close(ours, own, atol=0, rtol=0)


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with dynamo's eager backend: graph capture (breaks, guards, recompiles) without inductor."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_compiled_blocks_under_fsdp_have_no_graph_breaks_and_eval_compiles_nothing(one_rank_group, eager_backend):
    """Blocks compiled after fully_shard, by their forward: FSDP2's hooks (which dynamo skips) stay outside the
    graph. Eval (no grad, another batch size) runs on what training compiled, or eagerly: nothing compiles mid-run."""
    module, eager = make_module(compile=True), make_module()
    assert module.compiled and not eager.compiled
    for i, bag in enumerate((4, 4, 1)):
        module.train_step(window(bag, i), bag, 1e-3)
        eager.train_step(window(bag, i), bag, 1e-3)
    # one frame, one graph for the 4 blocks and both phases: no resumption frames around the hooks (compiling the
    # module's call, the hooks split it into 3 frames)
    assert eager_backend["frames"]["total"] == eager_backend["stats"]["unique_graphs"] == 1
    assert eager_backend["graph_break"] == {}
    windows = torch.randint(0, VOCAB, (7, 17), generator=torch.Generator().manual_seed(5))
    assert module.eval_loss(windows) == pytest.approx(eager.eval_loss(windows), abs=1e-6)
    assert eager_backend["frames"]["total"] == eager_backend["stats"]["unique_graphs"] == 1
    assert "model.layers.0.self_attn.q_proj.weight" in dict(module.model.named_parameters())  # no _orig_mod


def test_compile_without_a_compiler_trains_eagerly_with_one_warning():
    from torch._inductor import config as inductor_config

    no_compiler = inductor_config.patch({"cpp.cxx": (None, "no-such-c++-compiler")})
    with no_compiler, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = make_module(compile=True)
    messages = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    assert messages == ["train.compile: no C++ compiler for inductor's CPU kernels (g++ or $CXX); the blocks run "
                        "eagerly"]
    assert not module.compiled
    assert all("forward" not in vars(block) for block in distributed.decoder_layers(module.model))
    assert module.train_step(window(4), 4, 1e-3).to_host()["finite"] == 1.0


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager_on_cpu():
    """The real backend on this machine's C++ compiler: compiled blocks train as the eager ones do."""
    if distributed.compile_unavailable(torch.device("cpu")):
        pytest.skip("no C++ compiler for inductor")
    torch._dynamo.reset()
    compiled, eager = make_module(compile=True), make_module()
    for i, bag in enumerate((4, 1)):
        a = eager.train_step(window(bag, i), bag, 1e-3).to_host()
        b = compiled.train_step(window(bag, i), bag, 1e-3).to_host()
        assert all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5) for k in a)
