"""The chunked, head-fused multi-hot CE equals the full-logits method loss (value and gradients) in every case."""

import pytest
import torch
import torch.nn.functional as F

from superpose.losses import chunked_multi_hot_cross_entropy, multi_hot_normaliser
from superpose.method import multi_hot_cross_entropy, target_weights


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops on a shared machine: extra OpenMP threads only spin-wait (hundreds of times slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _case(seed: int, batch: int, length: int, dim: int, vocab: int, bag: int, ignore: float = 0.0,
          dtype: torch.dtype = torch.float32):
    """Random hidden/weight/bias with grads, and targets drawn from a small id range (so duplicates occur)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, dim, generator=g, dtype=dtype) / dim**0.5).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, min(vocab, 2 * bag + 1), (batch, length, bag), generator=g)
    targets[torch.rand(targets.shape, generator=g) < ignore] = -100
    return hidden, weight, bias, targets


def _loss_and_grads(loss_fn, hidden, weight, bias):
    for t in (hidden, weight, bias):
        t.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()


def _assert_all_close(got, want, atol=1e-5, rtol=1e-5):
    for name, g, w in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("bag", [1, 4, 16])
@pytest.mark.parametrize("chunk_size", [7, 16, 1024])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_full_logits_loss_and_grads(bag, chunk_size, weighted):
    hidden, weight, bias, targets = _case(bag * 10 + chunk_size, 2, 24, 16, 97, bag, ignore=0.2)
    weights = target_weights(bag, "power", 1.0) if weighted else None
    if weighted and bag == 1:
        weights = torch.tensor([0.7])
    want = _loss_and_grads(
        lambda: multi_hot_cross_entropy(hidden @ weight.T + bias, targets, weights=weights), hidden, weight, bias)
    got = _loss_and_grads(
        lambda: chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, weights=weights,
                                                bias=bias), hidden, weight, bias)
    _assert_all_close(got, want)


def test_bag_one_equals_standard_cross_entropy():
    hidden, weight, _, targets = _case(1, 3, 11, 8, 50, 1, ignore=0.3)
    loss = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=5)
    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 50), targets.reshape(-1))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)


def test_duplicates_count_per_occurrence():
    hidden, weight, _, _ = _case(2, 1, 4, 8, 30, 4)
    targets = torch.tensor([[[3, 3, 3, 5], [1, 1, 2, 2], [7, 7, 7, 7], [0, -100, 0, -100]]])
    loss = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=3)
    torch.testing.assert_close(loss, multi_hot_cross_entropy(hidden @ weight.T, targets), atol=1e-6, rtol=1e-6)


def test_custom_ignore_index_and_no_bias():
    hidden, weight, _, targets = _case(3, 2, 9, 8, 40, 4)
    targets[0, :3] = -1
    want = multi_hot_cross_entropy(hidden @ weight.T, targets, ignore_index=-1)
    torch.testing.assert_close(chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=4, ignore_index=-1),
                               want, atol=1e-6, rtol=1e-6)


def test_sum_reduction_over_normaliser_is_the_mean_across_shards():
    """Two "ranks" each return sums; dividing by the all-reduced count gives the mean of the whole batch."""
    hidden, weight, bias, targets = _case(4, 4, 10, 8, 60, 4, ignore=0.4)
    weights = target_weights(4, "power", 0.5)
    want = _loss_and_grads(
        lambda: chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=6, weights=weights, bias=bias),
        hidden, weight, bias)

    def sharded():
        count = sum(multi_hot_normaliser(targets[i:i + 2], weights=weights) for i in (0, 2))
        sums = [chunked_multi_hot_cross_entropy(hidden[i:i + 2], weight, targets[i:i + 2], chunk_size=6,
                                                weights=weights, bias=bias, reduction="sum") for i in (0, 2)]
        return sum(sums) / count

    _assert_all_close(_loss_and_grads(sharded, hidden, weight, bias), want)


def test_gradcheck_float64():
    hidden, weight, bias, targets = _case(5, 2, 3, 4, 11, 3, ignore=0.2, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_multi_hot_cross_entropy(h, w, targets, chunk_size=4, weights=weights, bias=b),
        (hidden, weight, bias))


def test_partial_requires_grad():
    """Only the inputs that need a gradient get one (e.g. a frozen head, or frozen hidden states)."""
    hidden, weight, _, targets = _case(6, 2, 5, 8, 20, 2)
    weight.requires_grad_(False)
    chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=3).backward()
    assert hidden.grad is not None and weight.grad is None


def test_autocast_bf16_matmul_fp32_softmax():
    """Under autocast the head runs in bf16 (like the full path), loss and weight grad stay fp32."""
    hidden, weight, _, targets = _case(7, 2, 16, 32, 64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=10)
        ref = multi_hot_cross_entropy(hidden @ weight.T, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    full_h, full_w = torch.autograd.grad(multi_hot_cross_entropy(hidden @ weight.T, targets), (hidden, weight))
    torch.testing.assert_close(hidden.grad, full_h, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(weight.grad, full_w, atol=2e-2, rtol=5e-2)


def test_rejects_bad_arguments():
    hidden, weight, _, targets = _case(8, 1, 4, 8, 20, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        chunked_multi_hot_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="targets"):
        chunked_multi_hot_cross_entropy(hidden, weight, targets[:, :2])
    with pytest.raises(ValueError, match="weight"):
        chunked_multi_hot_cross_entropy(hidden, weight[:, :4], targets)
