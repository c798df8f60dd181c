"""The fused, chunked multi-hot CE equals the full-logits method loss (value and gradients) in every case.

Most cases run the chunk function eagerly (seconds); the ``compiled`` cases check that ``torch.compile`` gives the
same numbers, compiles once for every chunk length and bag size > 1, and falls back to eager where it cannot compile
(and only then). Families' logit maps are applied in the loss and, by the chain rule, in its gradients.
"""

import pytest
import torch
import torch.nn.functional as F

from superpose import losses
from superpose.losses import (
    LogitMap,
    _chunk_loss_and_grad,
    _compiled_chunk,
    _CompiledOrEager,
    chunked_multi_hot_cross_entropy,
    loss_path,
)
from superpose.method import multi_hot_cross_entropy, target_weights

UPSTREAM = 0.37  # a non-unit gradient from above, so the backward's scaling of the stored gradients is checked


@pytest.fixture(scope="module")
def compiles():
    """Skip where ``torch.compile`` cannot run at all (no C++ compiler); the fallback test covers that case."""
    try:
        torch.compile(lambda x: x + 1, fullgraph=True)(torch.ones(2))
    except Exception as err:
        pytest.skip(f"torch.compile unavailable here: {type(err).__name__}")


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
    loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
    return loss.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()


def _assert_all_close(got, want, atol=1e-5, rtol=1e-5):
    for name, g, w in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def _reference(hidden, weight, bias, targets, weights=None):
    return _loss_and_grads(lambda: multi_hot_cross_entropy(hidden @ weight.T + bias, targets, weights=weights),
                           hidden, weight, bias)


def _fused(hidden, weight, bias, targets, chunk_size, weights=None, compiled=False):
    return _loss_and_grads(
        lambda: chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, weights=weights,
                                                bias=bias, compiled=compiled), hidden, weight, bias)


@pytest.mark.parametrize("bag", [1, 4, 16])
@pytest.mark.parametrize("chunk_size", [7, 16, 1024])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_full_logits_loss_and_grads(bag, chunk_size, weighted):
    hidden, weight, bias, targets = _case(bag * 10 + chunk_size, 2, 24, 16, 97, bag, ignore=0.2)
    weights = target_weights(bag, "power", 1.0) if weighted else None
    if weighted and bag == 1:
        weights = torch.tensor([0.7])
    want = _reference(hidden, weight, bias, targets, weights)
    _assert_all_close(_fused(hidden, weight, bias, targets, chunk_size, weights), want)


def test_compiled_matches_reference_and_compiles_once_for_every_chunk_length_and_bag(compiles):
    """One dynamic graph serves chunks of 7 rows and the last one of 6 at bag 4, then bag 16 and other lengths."""
    torch._dynamo.reset()
    weights = target_weights(4, "power", 1.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for bag, chunk_size in ((4, 7), (16, 7), (16, 10), (4, 13)):
            case = _case(bag + chunk_size, 2, 24, 16, 97, bag, ignore=0.2)
            w = weights if bag == 4 else None
            _assert_all_close(_fused(*case, chunk_size=chunk_size, weights=w, compiled=True),
                              _reference(*case, weights=w))
    assert not _compiled_chunk.failed  # it compiled (a recompile would have raised and fallen back to eager)


def test_compiled_bag_one_is_standard_cross_entropy(compiles):
    hidden, weight, bias, targets = _case(12, 2, 24, 16, 97, 1, ignore=0.2)
    want = _loss_and_grads(lambda: F.cross_entropy((hidden @ weight.T + bias).reshape(-1, 97), targets.reshape(-1)),
                           hidden, weight, bias)
    _assert_all_close(_fused(hidden, weight, bias, targets, chunk_size=10, compiled=True), want)
    assert not _compiled_chunk.failed


def test_falls_back_to_eager_when_compiling_fails():
    """A function ``torch.compile(fullgraph=True)`` cannot take stands in for a machine where compiling fails."""
    calls = []

    def breaks_the_graph(x: torch.Tensor):
        calls.append(1)
        torch._dynamo.graph_break()
        return x * 2, None, None

    run = _CompiledOrEager(breaks_the_graph)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        assert torch.equal(run(torch.ones(3))[0], torch.full((3,), 2.0))
    assert run.failed
    calls.clear()
    assert torch.equal(run(torch.ones(2))[0], torch.full((2,), 2.0)) and calls == [1]  # eager: no second try


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


def test_no_grad_gives_the_same_loss_without_a_graph():
    hidden, weight, bias, targets = _case(4, 2, 10, 8, 60, 4, ignore=0.4)
    with torch.no_grad():
        loss = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=6, bias=bias)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, multi_hot_cross_entropy(hidden @ weight.T + bias, targets).detach(),
                               atol=1e-6, rtol=1e-6)


def test_second_backward_is_refused():
    """The gradients are handed over on the first backward, so a retained graph cannot silently give wrong ones."""
    hidden, weight, _, targets = _case(9, 1, 6, 8, 20, 2)
    loss = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_float64_gradients_match_finite_differences():
    """In fp64 each gradient's directional derivative equals a central difference of the loss (gradcheck's idea;
    gradcheck itself runs backward twice on one graph, which this function refuses)."""
    hidden, weight, bias, targets = _case(5, 2, 3, 4, 11, 3, ignore=0.2, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    def loss(h, w, b):
        return chunked_multi_hot_cross_entropy(h, w, targets, chunk_size=4, weights=weights, bias=b)

    inputs = (hidden, weight, bias)
    grads = torch.autograd.grad(loss(*inputs), inputs)
    g = torch.Generator().manual_seed(0)
    for i, grad in enumerate(grads):
        step = 1e-6 * torch.randn(inputs[i].shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            plus, minus = ([t + s * step if j == i else t for j, t in enumerate(inputs)] for s in (1, -1))
            numeric = (loss(*plus) - loss(*minus)) / 2
        torch.testing.assert_close((grad * step).sum(), numeric, atol=1e-12, rtol=1e-6)


def test_partial_requires_grad():
    """Only the inputs that need a gradient get one (e.g. a frozen head, or frozen hidden states)."""
    hidden, weight, _, targets = _case(6, 2, 5, 8, 20, 2)
    weight.requires_grad_(False)
    chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=3).backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_bf16_matmul_fp32_softmax(compiled, request):
    """Under autocast the head runs in bf16 (like the full path), loss and weight grad stay fp32."""
    if compiled:
        request.getfixturevalue("compiles")
    hidden, weight, _, targets = _case(7, 2, 16, 32, 64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=10, compiled=compiled)
        ref = multi_hot_cross_entropy(hidden @ weight.T, targets)
    assert loss.dtype == torch.float32 and not (compiled and _compiled_chunk.failed)
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    full_h, full_w = torch.autograd.grad(multi_hot_cross_entropy(hidden @ weight.T, targets), (hidden, weight))
    torch.testing.assert_close(hidden.grad, full_h, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(weight.grad, full_w, atol=2e-2, rtol=5e-2)


def test_bf16_parameters_without_autocast():
    """bf16 hidden and head (FSDP's bf16 parameters): bf16 matmuls, fp32 loss, gradients in the inputs' dtype."""
    hidden, weight, _, targets = _case(10, 2, 16, 32, 64, 4)
    loss = chunked_multi_hot_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=10)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, multi_hot_cross_entropy(hidden @ weight.T, targets), atol=2e-2, rtol=1e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32  # through .bfloat16()
    full_h, full_w = torch.autograd.grad(multi_hot_cross_entropy(hidden @ weight.T, targets), (hidden, weight))
    torch.testing.assert_close(hidden.grad, full_h, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(weight.grad, full_w, atol=2e-2, rtol=5e-2)


def test_rejects_bad_arguments():
    hidden, weight, _, targets = _case(8, 1, 4, 8, 20, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        chunked_multi_hot_cross_entropy(hidden, weight, targets[:, :2])
    with pytest.raises(ValueError, match="weight"):
        chunked_multi_hot_cross_entropy(hidden, weight[:, :4], targets)


# --- logit maps (Gemma 2's soft cap, Cohere's and Granite's scales) ------------------------------------------------


@pytest.mark.parametrize("logit_map", [LogitMap(softcap=2.0), LogitMap(scale=0.0625), LogitMap(scale=1 / 8)])
@pytest.mark.parametrize("bag", [1, 4])
def test_logit_map_applies_in_the_loss_and_by_chain_rule_in_its_gradients(logit_map, bag):
    hidden, weight, bias, targets = _case(bag + 40, 2, 12, 16, 97, bag, ignore=0.2)
    hidden.data *= 4  # logits of a few units, where tanh bends
    weights = target_weights(bag, "power", 1.0)
    want = _loss_and_grads(lambda: multi_hot_cross_entropy(logit_map(hidden @ weight.T + bias), targets,
                                                            weights=weights), hidden, weight, bias)
    got = _loss_and_grads(lambda: chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=7,
                                                                  weights=weights, bias=bias, logit_map=logit_map),
                          hidden, weight, bias)
    _assert_all_close(got, want)
    plain = multi_hot_cross_entropy(hidden @ weight.T + bias, targets, weights=weights)
    assert abs(plain.item() - want[0].item()) > 1e-2  # the map matters here
    with torch.no_grad():
        torch.testing.assert_close(chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=5, bias=bias,
                                                                   weights=weights, logit_map=logit_map), want[0])


def test_compiled_soft_cap_matches_reference(compiles):
    case = _case(77, 2, 12, 16, 97, 4, ignore=0.2)
    cap = LogitMap(softcap=2.0)
    want = _loss_and_grads(lambda: multi_hot_cross_entropy(cap(case[0] @ case[1].T + case[2]), case[3]), *case[:3])
    got = _loss_and_grads(lambda: chunked_multi_hot_cross_entropy(case[0], case[1], case[3], chunk_size=7,
                                                                  bias=case[2], compiled=True, logit_map=cap),
                          *case[:3])
    _assert_all_close(got, want)
    assert loss_path(7, True) == "fused_compiled"


# --- which path ran; only compile failures fall back -------------------------------------------------------------


def _compile_returning(run):
    """A stand-in for ``torch.compile`` whose compiled function is ``run``."""
    return lambda fn, **kwargs: run


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   torch.OutOfMemoryError("CUDA out of memory"), ValueError("bad inputs")])
def test_an_error_that_is_no_compile_failure_propagates(error, monkeypatch):
    def fails(*args):
        raise error

    monkeypatch.setattr(torch, "compile", _compile_returning(fails))
    run = _CompiledOrEager(lambda x: (x, None, None))
    with pytest.raises(type(error), match=str(error)):
        run(torch.ones(2))
    assert not run.failed


def test_bad_inputs_while_tracing_propagate(compiles):
    """An op that refuses its inputs while dynamo traces (a ``TorchRuntimeError``) fails eagerly too: no fallback."""
    run = _CompiledOrEager(lambda a, b: (a @ b, None, None))
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError):
        run(torch.ones(3, 4), torch.ones(5, 6))
    assert not run.failed


def test_a_compile_failure_falls_back_and_loss_path_says_so(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    def no_compiler(*args):
        raise InductorError(InvalidCxxCompiler(), None)

    monkeypatch.setattr(losses, "_compiled_chunk", losses._CompiledOrEager(losses._chunk_loss_and_grad))
    monkeypatch.setattr(torch, "compile", _compile_returning(no_compiler))
    assert (loss_path(0, True), loss_path(16, False), loss_path(16, True)) == \
        ("full_logits", "fused_eager", "fused_compiled")
    case = _case(31, 2, 10, 8, 50, 4)
    with pytest.warns(RuntimeWarning, match="InductorError.*running it eagerly"):
        got = _fused(*case, chunk_size=6, compiled=True)
    _assert_all_close(got, _fused(*case, chunk_size=6))
    assert isinstance(InductorError(InvalidCxxCompiler(), None), BackendCompilerFailed)
    assert loss_path(16, True) == "fused_eager_fallback" and loss_path(16, False) == "fused_eager"


# --- the head gradient accumulates in fp32 ---------------------------------------------------------------------------


def test_bf16_head_gradient_accumulates_in_fp32():
    """Under bf16 autocast each chunk's ``dz.T @ h`` (bf16 operands) is summed in fp32, never rounded to bf16 first:
    the weight gradient equals the fp32 sum of the chunks' exact products. On CUDA this is one ``addmm`` with
    ``out_dtype=float32`` into the fp32 buffer (no bf16 ``[V, d]`` temporary per chunk): that it runs, and the memory
    it saves, only a GPU shows (tests/test_gpu.py); the CPU upcasts the chunk's operands to the same sum."""
    hidden, weight, _, targets = _case(13, 2, 20, 32, 64, 4)
    chunk = 6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_multi_hot_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
    assert weight.grad.dtype == torch.float32
    h, w = hidden.detach().reshape(-1, 32).bfloat16(), weight.detach().bfloat16()
    t = targets.reshape(-1, 4)
    mass = (t != -100).float() / (t != -100).sum()
    exact = torch.zeros(64, 32)
    rounded = torch.zeros(64, 32)
    for start in range(0, h.shape[0], chunk):
        rows = slice(start, start + chunk)
        dz = _chunk_loss_and_grad(h[rows], w, None, t[rows], mass[rows], torch.bfloat16, False)[1]
        exact += dz.float().T @ h[rows].float()
        rounded += (dz.T @ h[rows]).float()  # what a bf16 product per chunk gives
    torch.testing.assert_close(weight.grad, exact, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(rounded, exact, atol=1e-7, rtol=1e-5)  # the check tells the two apart
