"""The method core against explicit references: multi-hot CE, bag means, windows, objectives."""

import pytest
import torch
import torch.nn.functional as F

from superpose import method


def reference_multi_hot(logits, targets, ignore_index=-100, weights=None):
    """Explicit multi-hot distribution: 1/s mass per target occurrence (weights per position), dense over V."""
    B, L, V = logits.shape
    s = targets.shape[-1]
    w = torch.full((s,), 1.0 / s, dtype=torch.float64) if weights is None else weights.double()
    dist = torch.zeros(B, L, V, dtype=torch.float64)
    mass = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            for k in range(s):
                t = int(targets[b, i, k])
                if t != ignore_index:
                    dist[b, i, t] += w[k]
                    mass[b, i] += w[k]
    logp = torch.log_softmax(logits.double(), -1)
    return -(dist * logp).sum() / mass.sum()


@pytest.mark.parametrize("seed", range(6))
def test_multi_hot_matches_explicit_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, L, V, s = [int(x) for x in torch.randint(1, 6, (3,), generator=g)] + [int(torch.randint(1, 9, (1,), generator=g))]
    V = V + 6
    logits = torch.randn(B, L, V, generator=g) * 3
    targets = torch.randint(0, 4, (B, L, s), generator=g)  # a small id range forces duplicates inside bags
    targets[torch.rand(B, L, s, generator=g) < 0.2] = -100
    targets[0, 0, 0] = 1  # at least one valid target
    got = method.multi_hot_cross_entropy(logits, targets)
    assert torch.allclose(got.double(), reference_multi_hot(logits, targets), atol=1e-5)


def test_duplicates_count_per_occurrence():
    logits = torch.randn(1, 1, 5)
    both = method.multi_hot_cross_entropy(logits, torch.tensor([[[2, 2, 3]]]))
    ce = F.cross_entropy(logits[0], torch.tensor([2])), F.cross_entropy(logits[0], torch.tensor([3]))
    assert torch.allclose(both, (2 * ce[0] + ce[1]) / 3)


def test_power_weights_match_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g)
    targets = torch.randint(0, 7, (2, 3, 4), generator=g)
    targets[1, 2, 3] = -100
    w = method.target_weights(4, "power", alpha=1.5)
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and bool((w[:-1] > w[1:]).all())
    got = method.multi_hot_cross_entropy(logits, targets, weights=w)
    assert torch.allclose(got.double(), reference_multi_hot(logits, targets, weights=w), atol=1e-6)
    assert method.target_weights(4, "uniform") is None
    with pytest.raises(ValueError):
        method.target_weights(4, "cubic")


@pytest.mark.parametrize("shape", [(2, 7, 11), (4, 128, 4096), (1, 1, 3)])
def test_bag_one_is_bitwise_cross_entropy(shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(*shape, generator=g)
    targets = torch.randint(0, shape[-1], shape[:2], generator=g)
    if targets.numel() > 1:
        targets[0, 0] = -100
    ours = method.multi_hot_cross_entropy(logits, targets[..., None])
    ref = F.cross_entropy(logits.reshape(-1, shape[-1]), targets.reshape(-1))
    assert torch.equal(ours, ref)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    method.multi_hot_cross_entropy(a, targets[..., None]).backward()
    F.cross_entropy(b.reshape(-1, shape[-1]), targets.reshape(-1)).backward()
    assert torch.equal(a.grad, b.grad)


def test_gradcheck_multi_hot():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([[[0, 0, 5], [1, 2, -100], [3, 4, 4]], [[5, 5, 5], [0, 1, 2], [-100, 2, 1]]])
    # the function scores in fp32; check its analytic gradient against finite differences of the fp64 reference
    ours = method.multi_hot_cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(ours, logits)
    assert torch.autograd.gradcheck(lambda z: reference_multi_hot(z, targets), (logits,))
    (ref_grad,) = torch.autograd.grad(reference_multi_hot(logits, targets), logits)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_all_ignored_gives_nan_like_cross_entropy():
    logits = torch.randn(1, 2, 4)
    targets = torch.full((1, 2, 3), -100)
    assert torch.isnan(method.multi_hot_cross_entropy(logits, targets))


@pytest.mark.parametrize("bag", [1, 2, 3, 8])
def test_bag_mean_matches_manual_mean(bag):
    emb = torch.nn.Embedding(50, 16)
    ids = torch.randint(0, 50, (3, 5 * bag))
    got = method.superpose_embeddings(emb, ids, bag)
    manual = torch.stack([torch.stack([emb.weight[ids[b, i * bag:(i + 1) * bag]].mean(0) for i in range(5)]) for b in range(3)])
    assert got.shape == (3, 5, 16)
    assert torch.allclose(got, manual, atol=1e-6)
    # gradient of the mean reaches every token of the bag with weight 1/bag per occurrence
    got.sum().backward()
    counts = torch.bincount(ids.reshape(-1), minlength=50).float()
    assert torch.allclose(emb.weight.grad, (counts / bag)[:, None].expand(50, 16))


def test_bag_one_embedding_is_plain_lookup():
    emb = torch.nn.Embedding(20, 8)
    ids = torch.randint(0, 20, (2, 9))
    assert torch.equal(method.superpose_embeddings(emb.weight, ids, 1), emb(ids))


def test_bad_bag_sizes():
    emb = torch.nn.Embedding(10, 4)
    with pytest.raises(ValueError, match="bag"):
        method.superpose_embeddings(emb, torch.zeros(1, 6, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="whole number"):
        method.superpose_embeddings(emb, torch.zeros(1, 7, dtype=torch.long), 2)


@pytest.mark.parametrize("mode", method.MODES)
@pytest.mark.parametrize("bag", [1, 3])
def test_split_window_targets_follow_inputs(mode, bag):
    L = 5
    n = method.window_length(L, bag, mode)
    window = torch.arange(n)[None].repeat(2, 1)
    inputs, targets = method.split_window(window, bag, mode)
    if mode == "output":
        assert inputs.shape == (2, L)
        # position i holds token i and predicts tokens i+1 .. i+bag
        assert torch.equal(targets[0], torch.arange(L)[:, None] + torch.arange(1, bag + 1))
    else:
        assert inputs.shape == (2, L * bag)
        nxt = (torch.arange(L)[:, None] + 1) * bag + torch.arange(bag)  # bag i+1 follows bag i
        assert torch.equal(targets[0], nxt if mode == "both" else nxt[:, :1])
    if bag == 1:
        assert torch.equal(targets[..., 0], window[:, 1:])


def test_modes_cost_the_same_positions():
    emb = torch.nn.Embedding(30, 4)
    for mode in method.MODES:
        window = torch.randint(0, 30, (2, method.window_length(7, 4, mode)))
        ids, _ = method.split_window(window, 4, mode)
        assert method.embed_inputs(emb, ids, 4, mode).shape == (2, 7, 4)


def test_tst_loss_at_bag_one_equals_plain_next_token_loss():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(40, 8)
    head = torch.nn.Linear(8, 40)
    window = torch.randint(0, 40, (3, 10))
    ours = method.tst_loss(head, emb, window, 1)
    ref = F.cross_entropy(head(emb(window[:, :-1])).reshape(-1, 40), window[:, 1:].reshape(-1))
    assert torch.equal(ours, ref)
