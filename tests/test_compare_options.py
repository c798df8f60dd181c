"""The switch-softening options (off by default): LR re-warmup after a bag switch, bag means rescaled in norm.
(A width override of a preset trains and exports: tests/test_export.py.)"""

import pytest
import torch

from superpose.method import embed_inputs, superpose_embeddings
from superpose.schedule import rewarmup_factor
from superpose.train.loop import train
from superpose.train.metrics import read_metrics


def test_rewarmup_factor_ramps_after_each_switch():
    assert [rewarmup_factor(s, [10], 0) for s in (9, 10, 11)] == [1.0, 1.0, 1.0]  # off
    assert [rewarmup_factor(s, [10, 20], 4) for s in (9, 10, 11, 13, 14, 20, 23)] == [1.0, 0.25, 0.5, 1.0, 1.0, 0.25,
                                                                                    1.0]


def test_rescaled_bag_mean_has_the_mean_token_norm():
    torch.manual_seed(0)
    table = torch.randn(50, 16)
    ids = torch.randint(0, 50, (2, 12))
    plain = superpose_embeddings(table, ids, 4)
    scaled = superpose_embeddings(table, ids, 4, rescale=True)
    target = table[ids].norm(dim=-1).view(2, 3, 4).mean(-1)
    assert torch.allclose(scaled.norm(dim=-1), target, atol=1e-5)
    assert (plain.norm(dim=-1) < target).all()  # the plain mean shrinks, which is what the option undoes
    assert torch.allclose(torch.nn.functional.cosine_similarity(plain, scaled, dim=-1), torch.ones(2, 3), atol=1e-5)
    # bag 1 and output mode are untouched: the option only acts on bag means
    assert torch.equal(superpose_embeddings(table, ids, 1, rescale=True), table[ids])
    assert torch.equal(embed_inputs(table, ids, 4, "output", rescale=True), table[ids])


@pytest.mark.slow
def test_options_reach_the_trainer(tiny_config, trained_run):
    plain = read_metrics(trained_run("tst") / "metrics.jsonl")  # the same tiny config without the options
    soft = read_metrics(train(tiny_config("soft", tst={"rewarmup_steps": 3, "rescale_mean": True}),
                              progress=False).run_dir / "metrics.jsonl")
    lr, base_lr = ({r["step"]: r["lr"] for r in rows} for rows in (soft, plain))
    assert [lr[s] / base_lr[s] for s in (6, 7, 8, 9)] == pytest.approx([1, 1 / 3, 2 / 3, 1])  # switch at step 7
    assert soft[0]["train_loss"] != plain[0]["train_loss"]  # rescaled bag means from the first step
