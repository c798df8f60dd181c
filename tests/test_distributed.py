"""2-4 gloo processes on CPU: FSDP2, HSDP and DDP match one process (weights at init, losses, eval); gradients stay
sharded during accumulation; DCP checkpoints resume at any world size (torchrun runs of the whole trainer)."""

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_config, torchrun
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from superpose import method
from superpose.export import export
from superpose.models import build_model
from superpose.train.checkpoint import list_checkpoints
from superpose.train.config_load import config_from_dict
from superpose.train.distributed import DistInfo, init_distributed, shutdown
from superpose.train.loop import train
from superpose.train.metrics import read_metrics
from superpose.train.step import TrainModule
from test_gpu_path import block_units, fsdp_units

pytestmark = pytest.mark.slow


def rows(run_dir):
    return read_metrics(run_dir / "metrics.jsonl")


def assert_same_losses(a, b, tol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["bag"] == y["bag"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=tol), x["step"]
        assert x.get("val_loss", 0.0) == pytest.approx(y.get("val_loss", 0.0), abs=tol), x["step"]
        assert x["text_tokens"] == y["text_tokens"]


@pytest.fixture(scope="module")
def runs(embedded_data, tmp_path_factory):
    """One single-process run and its config factory; all runs share B=4, 12 steps, a switch at step 6."""
    root = tmp_path_factory.mktemp("dist")

    def config(name, **sections):
        cfg = make_tiny_config(embedded_data, root / "runs", name, **sections)
        path = root / f"{name}.toml"
        path.write_text(cfg.to_toml())
        return cfg, path

    single, _ = config("single")
    train(single, progress=False)
    return config, rows(single.run_dir)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_ranks_match_one_process(runs, parallel):
    config, reference = runs
    cfg, path = config(parallel, train={"parallel": parallel})
    torchrun(path)
    assert_same_losses(rows(cfg.run_dir), reference)
    switch = cfg.run_dir / "checkpoints" / "step-0000006"
    assert (switch / "dcp" / ".metadata").is_file() and not (switch / "model.safetensors").exists()
    # the sharded run exports to the same plain Hugging Face layout as a single-process run
    sharded = load_file(export(cfg.run_dir, cfg.run_dir.parent / f"{parallel}-hf") / "model.safetensors")
    single = make_tiny_config(cfg.data.path, cfg.out_dir, "single").run_dir
    plain = load_file(export(single, cfg.run_dir.parent / f"single-hf-{parallel}") / "model.safetensors")
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in plain.items()}
    assert max((sharded[k] - plain[k]).abs().max().item() for k in plain) < 1e-4


UNTIED = {"preset": "tiny", "overrides": {"tie_word_embeddings": False}}


def test_dcp_resume_and_resume_on_one_rank(runs):
    """Untied embeddings, so the embeddings and the final norm with the head are units of their own: a unit holds
    its parameters under their model names, and a checkpoint resumes with and without FSDP."""
    config, reference = runs
    cfg, path = config("fsdp-resume", model=UNTIED, train={"parallel": "fsdp"})
    torchrun(path)
    full = rows(cfg.run_dir)
    # 2 ranks -> 1 process, from the phase-switch checkpoint
    solo, _ = config("solo", model=UNTIED)
    train(solo, resume=cfg.run_dir / "checkpoints" / "step-0000006", progress=False)
    assert_same_losses(rows(solo.run_dir), [r for r in full if r["step"] > 6])
    # 2 ranks -> 2 ranks, as after a crash past step 4
    for ckpt in list_checkpoints(cfg.run_dir):
        if ckpt.name > "step-0000004":
            shutil.rmtree(ckpt)
    torchrun(path, "--resume")
    assert_same_losses(rows(cfg.run_dir), full)


def test_one_process_checkpoint_resumes_on_two_ranks(runs):
    config, reference = runs
    cfg, path = config("grow", train={"parallel": "fsdp"})
    single = make_tiny_config(cfg.data.path, cfg.out_dir, "single")
    torchrun(path, f"--resume={single.run_dir / 'checkpoints' / 'step-0000004'}")
    assert_same_losses(rows(cfg.run_dir), [r for r in reference if r["step"] > 4])


def test_sigterm_to_torchrun_checkpoints_every_rank_and_resumes_exactly(runs):
    """SIGTERM as SLURM delivers it (to torchrun, which passes it to each worker once): the ranks agree to stop,
    write one checkpoint, exit 143; a --resume gives the uninterrupted losses."""
    config, reference = runs
    cfg, path = config("terminated", train={"parallel": "fsdp", "micro_batch_size": 1})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--shutdown-timeout=120", "-m", "superpose", "train", str(path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = cfg.run_dir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    done = rows(cfg.run_dir)[-1]["step"]
    if done < 12:  # the usual case: the signal arrived mid-run
        # rank 0's own words (the CLI then exits 143); torchrun itself ends on its SignalException
        assert f"stopped by SIGTERM after {done} steps; a checkpoint was saved" in out, err[-2000:]
        assert proc.returncode != 0
        assert list_checkpoints(cfg.run_dir)[-1].name == f"step-{done:07d}"
        torchrun(path, "--resume")
    assert_same_losses(rows(cfg.run_dir), reference)


def test_moe_trains_under_fsdp(runs):
    config, _ = runs
    cfg, path = config("moe", model={"preset": "tiny-moe"}, train={"parallel": "fsdp", "steps": 8})
    torchrun(path)
    out = rows(cfg.run_dir)
    assert [r["step"] for r in out] == list(range(1, 9))
    assert all(r["aux_loss"] > 0 and r["expert_load_max"] >= 1.0 and r["expert_load_cv"] >= 0 for r in out)


# --- TrainModule on 2-4 gloo ranks, driven directly (spawned processes, no loop): one process is the reference ---

VOCAB = 512
BAGS = (4, 4, 1)  # three steps across a phase switch
BATCH = 8


def module_config(model=None, world_size=1, **train):
    return config_from_dict({"model": model or {"preset": "tiny"}, "tst": {"bag": 4, "ratio": 0.5},
                             "optim": {"lr": 3e-3, "warmup_steps": 0},
                             "train": {"batch_size": BATCH, "seq_len": 16, "device": "cpu", **train}},
                            world_size=world_size)


def global_window(step, bag):
    return torch.randint(0, VOCAB, (BATCH, method.window_length(16, bag)), generator=torch.Generator().manual_seed(step))


def validation():
    return torch.randint(0, VOCAB, (7, 17), generator=torch.Generator().manual_seed(99))  # 7: uneven over ranks


def full_weights(module):
    """A copy of every parameter in full on this process (a collective under FSDP)."""
    full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in full.items()}


def fsdp_groups(module):
    """FSDP2's parameter groups (one per unit that holds parameters)."""
    states = {id(s): s for m in module.objective.modules() if isinstance(m, FSDPModule) for s in [m._get_fsdp_state()]}
    return [s._fsdp_param_group for s in states.values() if s._fsdp_param_group is not None]


def held_gradient_bytes(module):
    """Gradient storage on this rank: the parameters' grads (FSDP2 shards), any unsharded grads FSDP2 keeps aside
    between micro-batches when gradient sync is off, and under HSDP the reduce-scattered shards it sums aside until
    the last micro-batch's all-reduce."""
    tensors = [p.grad for p in module.model.parameters()]
    for group in fsdp_groups(module):
        tensors.append(group._partial_reduce_output)
        for fp in group.fsdp_params:
            tensors += [fp.unsharded_accumulated_grad, getattr(getattr(fp, "_unsharded_param", None), "grad", None)]
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size()
               for t in tensors if t is not None)


@contextlib.contextmanager
def replica_all_reduces(info, replicas):
    """Count (in the list yielded, per step: append before each) the all-reduces over this rank's replica group,
    the ranks holding the same shard in each replica group: HSDP's cross-node gradient reduction."""
    counts, real = [], dist.all_reduce
    shard = info.world_size // replicas
    mine = [info.rank % shard + k * shard for k in range(replicas)]

    def counted(tensor, *args, group=None, **kwargs):
        if group is not None and dist.get_process_group_ranks(group) == mine:
            counts[-1] += 1
        return real(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counted if replicas > 1 else real
    try:
        yield counts
    finally:
        dist.all_reduce = real


def train_scenario(info, model=None, **train):
    """Init weights, three steps (recording gradient bytes between micro-batches, the shapes of the table the bag
    mean reads and, under HSDP, cross-replica all-reduces per step), final weights, one distributed eval."""
    module = TrainModule(module_config(model, world_size=info.world_size, **train), VOCAB, torch.device("cpu"), info)
    out = {"init": full_weights(module), "losses": [], "held": [], "tables": set(),
           "full_bytes": sum(p.numel() * p.element_size() for p in module.model.parameters())}
    local = BATCH // info.world_size
    rows = slice(info.rank * local, (info.rank + 1) * local)
    forwards = [0]

    def loss(*args):  # before every micro-batch after a step's first: what a rank holds between micro-batches
        if forwards[0] % (local // module.cfg.micro_batch_size(info.world_size)):
            out["held"].append(held_gradient_bytes(module))
        forwards[0] += 1
        return TrainModule.loss(module, *args)

    def bag_means(weight, *args):
        out["tables"].add(tuple(weight.shape))
        return real_bag_means(weight, *args)

    module.loss, real_bag_means, method.bag_means = loss, method.bag_means, bag_means
    try:
        with replica_all_reduces(info, train.get("replicas", 1)) as out["replica_all_reduces"]:
            for step, bag in enumerate(BAGS):
                out["replica_all_reduces"].append(0)
                result = module.train_step(global_window(step, bag)[rows], bag, 1e-3)
                out["losses"].append(result.to_host())
    finally:
        del module.loss
        method.bag_means = real_bag_means
    out["units"] = fsdp_units(module) if module.sharded else []
    out["final"] = full_weights(module)
    out["eval"] = module.eval_loss(validation())
    return out


def _resident_kib():
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1])


def build_memory_scenario(info, model, vocab=VOCAB, **train):
    """Peak host memory a rank adds while building and initialising the model (imports and code loaded before)."""
    build_model(model["preset"], vocab, device="meta", **model.get("overrides", {}))  # load the modeling code
    before = _resident_kib()
    module = TrainModule(module_config(model, **train), vocab, torch.device("cpu"), info)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in module.model.parameters()]
    return {"added_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
            "model_kib": sum(p.numel() * p.element_size() for p in module.model.parameters()) // 1024,
            "local_kib": sum(p.numel() * p.element_size() for p in local) // 1024}


SCENARIOS = {"train": train_scenario, "build_memory": build_memory_scenario}


def _rank_main(rank, world, port, out_dir, scenario, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info, _ = init_distributed("cpu")
    try:
        torch.save(SCENARIOS[scenario](info, **kwargs), Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown()


def spawn(world, out_dir, scenario="train", **kwargs):
    """Run a scenario on ``world`` gloo ranks (one plain process for 1); every rank's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_rank_main, args=(world, port, str(out_dir), scenario, kwargs),
                                          nprocs=world, start_method="spawn")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def one_process():
    torch.set_num_threads(1)
    return train_scenario(DistInfo(), micro_batch_size=1)


def assert_same_run(ranks, reference):
    for rank in ranks:
        assert rank["eval"] == pytest.approx(reference["eval"], abs=1e-6)
        for got, want in zip(rank["losses"], reference["losses"], strict=True):
            assert got.keys() == want.keys()
            assert all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)
    init, final = ranks[0]["init"], ranks[0]["final"]
    assert init.keys() == reference["init"].keys() == final.keys()
    assert all(torch.equal(init[k], reference["init"][k]) for k in init)
    # Adam divides each gradient by its own size, so a weight whose gradient is near zero (an embedding row of a
    # token one rank saw once) takes a step sensitive to summation order: up to 1.2e-5 here, where a wrong
    # reduction would be off by up to the learning rate (1e-3 a step)
    for name, value in reference["final"].items():
        torch.testing.assert_close(final[name], value, atol=5e-5, rtol=0)


def test_fsdp_shards_init_gradients_and_eval(one_process, tmp_path):
    """2 ranks, accumulation over 4 micro-batches: the same initial weights, losses and eval as one process, and
    between micro-batches a rank holds half the gradient bytes, never a full unsharded copy."""
    ranks = spawn(2, tmp_path, parallel="fsdp", micro_batch_size=1)
    assert_same_run(ranks, one_process)
    for rank in ranks:
        assert len(rank["held"]) == 3 * len(BAGS)  # asked between each step's 4 micro-batches
        assert all(0.45 * rank["full_bytes"] < held < 0.55 * rank["full_bytes"] for held in rank["held"])


@pytest.mark.parametrize(("world", "replicas"), [(2, 1), (4, 2)])
def test_fsdp_gives_untied_embeddings_and_head_units_of_their_own(tmp_path, world, replicas):
    """FSDP on 2 ranks and HSDP on 2 x 2 (2 replica groups of 2 shards), untied: a unit for the embeddings (gathered
    in full for the bag mean), one per block, one for the final norm with the head, and nothing left in the root; the
    same run as one process, final weights included; each rank holds half the gradients between micro-batches; and
    under HSDP, with 2 micro-batches a step, one cross-replica all-reduce per unit and step, not per micro-batch."""
    ranks = spawn(world, tmp_path, parallel="fsdp", replicas=replicas, micro_batch_size=1, model=UNTIED)
    assert_same_run(ranks, train_scenario(DistInfo(), model=UNTIED, micro_batch_size=1))
    table = tuple(ranks[0]["final"]["model.embed_tokens.weight"].shape)  # [V, d]: rank 0 holds the full state dict
    for rank in ranks:
        head = {"model.norm.weight", "lm_head.weight"}
        assert rank["units"] == [set(), {"model.embed_tokens.weight"}, *block_units(4), head]
        assert rank["tables"] == {table}  # the whole table, not this rank's shard
        assert 0.45 * rank["full_bytes"] < max(rank["held"]) < 0.55 * rank["full_bytes"]
        assert rank["replica_all_reduces"] == [6 if replicas > 1 else 0] * len(BAGS)


def test_ddp_matches_one_process(one_process, tmp_path):
    assert_same_run(spawn(2, tmp_path, parallel="ddp", micro_batch_size=1), one_process)


def test_sharded_build_allocates_only_each_ranks_shard(tmp_path):
    """Built on meta, sharded, then materialised: each of 2 ranks holds half the parameter bytes one process holds.

    (Peak host memory is a measurement, not a test: bench/README.md section (d) gives it for llama-270m.)
    """
    model = {"preset": "small", "overrides": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                              "intermediate_size": 2048}}  # 85M parameters: 0.3 GiB in fp32
    (tmp_path / "one").mkdir()
    (single,) = spawn(1, tmp_path / "one", "build_memory", model=model)
    sharded = spawn(2, tmp_path, "build_memory", model=model, parallel="fsdp")
    assert single["local_kib"] == single["model_kib"]
    assert sum(rank["local_kib"] for rank in sharded) == pytest.approx(single["model_kib"], abs=2)
    assert all(rank["local_kib"] <= 0.51 * single["model_kib"] for rank in sharded), (single, sharded)
