"""Multi-hot cross-entropy fused with the LM head, chunked over positions, gradients computed in the forward.

:func:`superpose.method.multi_hot_cross_entropy` takes full logits, so a caller holds ``[B*L, V]`` logits, their fp32
log-softmax and, in backward, their gradient: at a 128k vocabulary that dwarfs the rest of the activations. Here the
head matmul and the loss run over chunks of positions, and each chunk's logits are turned into the loss *and* their
gradient at once (as Liger-Kernel's fused linear cross-entropy does), which two matmuls consume straight away into
``grad_hidden`` rows and a ``grad_weight`` accumulation. Backward only scales the stored gradients, so the head
matmul runs once (no recompute), and at most one or two ``[chunk, V]`` tensors are alive at any time, at any bag size.

Per chunk the softmax and its gradient are one small function, :func:`_chunk_loss_and_grad`. With ``compiled=True``
it runs through ``torch.compile`` (one graph for every chunk length and bag size > 1: the shapes are dynamic), which
fuses its max/exp/sum/scale/cast passes over the logits into a couple of kernels; where compiling is impossible
(no C++ compiler or Triton, an unsupported Python) the same function runs eagerly, with a warning; only compile
failures fall back, and :func:`loss_path` says which path ran. Any other error (a CUDA error, out of memory, bad
inputs) propagates.

Some families change the logits after the head (Gemma 2's soft cap, Cohere's and Granite's scales): a
:class:`LogitMap` applies that elementwise map inside each chunk, and its derivative to the chunk's gradient.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import torch

ChunkResult = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class LogitMap(NamedTuple):
    """The elementwise map a model family applies to its head's logits ``z``: ``scale * z``, then, with ``softcap``,
    ``softcap * tanh(. / softcap)``. The default is the identity (and costs nothing)."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The map on full logits (the full-logits loss path)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap


def chunked_multi_hot_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    compiled: bool = False,
    logit_map: LogitMap = LogitMap(),
) -> torch.Tensor:
    """``multi_hot_cross_entropy(logit_map(hidden @ weight.T + bias), targets)`` without materialising the logits.

    hidden ``[B, L, d]``, weight ``[V, d]``, targets ``[B, L, bag]`` (``ignore_index`` marks padding), weights
    ``[bag]`` over positions in the bag; returns the (weighted) mean over valid targets. Under autocast the matmuls
    run in the autocast dtype and the softmax in fp32 (fp64 inputs stay fp64), as for the full-logits path.
    ``compiled`` runs each chunk's softmax and gradient through ``torch.compile`` (falling back to eager).
    ``logit_map`` is applied in fp32 after the head matmul (the full-logits path applies it to fp32 logits too).

    When grad mode is on and an input requires grad, the gradients are computed during this call and held until
    backward (one ``[V, d]`` fp32 buffer: the head's gradient, handed over without a copy to an fp32 head).
    """
    if hidden.dim() != 3 or targets.dim() != 3 or hidden.shape[:2] != targets.shape[:2]:
        raise ValueError(f"expected hidden [B, L, d] and targets [B, L, bag], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"expected weight [V, {hidden.shape[2]}], got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    acc_dtype = torch.promote_types(compute_dtype, torch.float32)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets2d = targets.reshape(-1, targets.shape[-1])
    valid = targets2d != ignore_index
    mass = valid.to(acc_dtype) if weights is None else weights.to(device=valid.device, dtype=acc_dtype) * valid
    mass = mass / mass.sum()  # folded in here, so each chunk's terms and gradients come out already normalised
    index = torch.where(valid, targets2d, 0)
    need = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden2d, weight, bias))
    if any(need):
        return _FusedMultiHotCE.apply(hidden2d, weight, bias, index, mass, chunk_size, compute_dtype, compiled, need,
                                      logit_map)
    with torch.autocast(device_type, enabled=False):
        return _chunked(hidden2d, weight, bias, index, mass, chunk_size, compute_dtype, compiled, need, logit_map)[0]


def _chunk_loss_and_grad(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    mass: torch.Tensor,
    grad_dtype: torch.dtype | None,
    bias_grad: bool,
    scale: float = 1.0,
    softcap: float | None = None,
) -> ChunkResult:
    """One chunk: ``sum(mass * (logsumexp(y) - y[index]))`` for ``y = LogitMap(scale, softcap)(h @ weight.T + bias)``
    and, if ``grad_dtype``, its gradient w.r.t. the head's logits ``z``.

    The gradient w.r.t. ``y`` is ``mass.sum(-1) * softmax(y) - scatter(mass at index)``; the chain rule multiplies it
    by ``dy/dz``: ``scale``, times ``1 - (y / softcap)**2`` under a soft cap. It is returned in ``grad_dtype`` for the
    two matmuls, plus its fp32 column sum when the bias needs a gradient. In-place ops on its own intermediates keep
    the eager version at about one ``[chunk, V]`` buffer (two under a soft cap, which keeps its derivative); under
    ``torch.compile`` they become fused passes.
    """
    z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if scale != 1.0:
        z.mul_(scale)
    slope = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        slope = 1.0 - z * z if grad_dtype is not None else None  # d tanh(u)/du, read before z becomes exp(y)
        z.mul_(softcap)
    picked = z.gather(-1, index)
    shift = z.amax(-1, keepdim=True)
    z.sub_(shift).exp_()
    norm = z.sum(-1, keepdim=True)
    loss = (mass * (norm.log() + shift - picked)).sum()
    if grad_dtype is None:
        return loss, None, None
    z.mul_(mass.sum(-1, keepdim=True) / norm)
    z.scatter_add_(-1, index, -mass)
    if slope is not None:
        z.mul_(slope)
    if scale != 1.0:
        z.mul_(scale)
    return loss, z.to(grad_dtype), z.sum(0) if bias_grad else None


def _is_compile_failure(err: Exception) -> bool:
    """Whether ``err`` says that compiling failed (then eager is the same function), not that running it did.

    Dynamo raises ``Unsupported`` for code it cannot capture in one graph and ``InternalTorchDynamoError`` for its
    own bugs; a backend's failure (no C++ compiler, Triton missing or too old for the GPU, an Inductor lowering
    error) arrives as a ``ShortenTraceback`` (``BackendCompilerFailed``, ``InductorError``, ``TritonMissing``,
    ``GPUTooOldForTriton``), and too many recompiles under ``fullgraph`` as ``FailOnRecompileLimitHit``. A
    ``TorchRuntimeError`` (an op refused the inputs while tracing), a CUDA error, out of memory or a ``ValueError``
    is no compile failure: eager would fail the same way, so it propagates.
    """
    from torch._dynamo import exc

    return isinstance(err, (exc.ShortenTraceback, exc.Unsupported, exc.InternalTorchDynamoError,
                            exc.FailOnRecompileLimitHit))


class _CompiledOrEager:
    """``fn`` through ``torch.compile`` with dynamic shapes, or eagerly once compiling has failed here.

    Dynamic shapes give one graph for every chunk length (the last chunk is shorter) and every bag size; only size
    0/1 dimensions (bag 1, a one-row last chunk) are specialised, as ``torch.compile`` always does. Only compile
    failures (:func:`_is_compile_failure`, or ``torch.compile`` refusing this Python) fall back; ``failed`` records it.
    """

    def __init__(self, fn: Callable[..., ChunkResult]):
        self.fn = fn
        self.compiled: Callable[..., ChunkResult] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> ChunkResult:
        if self.compiled is None and not self.failed:
            try:
                self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            except RuntimeError as err:  # this Python: torch.compile refuses before anything runs
                self._fall_back(err)
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as err:
                if not _is_compile_failure(err):
                    raise
                self._fall_back(err)
        return self.fn(*args)

    def _fall_back(self, err: Exception) -> None:
        self.failed = True
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(err).__name__}: {reason}); "
                      "running it eagerly", RuntimeWarning, stacklevel=3)


_compiled_chunk = _CompiledOrEager(_chunk_loss_and_grad)


def loss_path(chunk_size: int, compiled: bool) -> str:
    """Which loss path runs for ``train.loss_chunk = chunk_size`` and ``train.compile = compiled``, for metrics and
    bench results: ``full_logits`` (chunk 0), ``fused_eager``, ``fused_compiled``, or ``fused_eager_fallback`` when
    compiling was asked for and failed in this process. Ask after the first loss: before it, a compile that will
    fail still reads ``fused_compiled``."""
    if not chunk_size:
        return "full_logits"
    if not compiled:
        return "fused_eager"
    return "fused_eager_fallback" if _compiled_chunk.failed else "fused_compiled"


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    mass: torch.Tensor,
    chunk_size: int,
    dtype: torch.dtype,
    compiled: bool,
    need: tuple[bool, ...],
    logit_map: LogitMap = LogitMap(),
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """The loss over all chunks and, for each of hidden/weight/bias that ``need`` names, its gradient.

    Matmuls run in ``dtype``; the loss and the weight and bias gradients accumulate in fp32 (fp64 for fp64).
    Autocast must be off (the caller's ``dtype`` already says how to cast).
    """
    acc_dtype = torch.promote_types(dtype, torch.float32)
    need_h, need_w, need_b = need
    step = _compiled_chunk if compiled else _chunk_loss_and_grad
    weight_c = weight.to(dtype)
    bias_c = bias.to(dtype) if bias is not None else None
    grad_dtype = dtype if any(need) else None
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    grad_w = grad_b = None  # the first chunk's terms, then accumulated into: no zero-filled [V, d] pass
    loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows].to(dtype)
        part, dz, dbias = step(h, weight_c, bias_c, index[rows], mass[rows], grad_dtype, need_b, *logit_map)
        loss += part
        if need_b:
            grad_b = dbias if grad_b is None else grad_b.add_(dbias)
        if need_h:
            grad_h[rows] = dz @ weight_c
        if need_w:
            grad_w = _add_head_grad(grad_w, dz, h, acc_dtype)
        del dz
    return loss, (grad_h, grad_w, grad_b)


def _add_head_grad(grad_w: torch.Tensor | None, dz: torch.Tensor, h: torch.Tensor,
                   acc_dtype: torch.dtype) -> torch.Tensor:
    """``grad_w + dz.T @ h`` (``dz.T @ h`` for the first chunk) in ``acc_dtype``, without a ``[V, d]`` temporary.

    For bf16/fp16 chunks on CUDA one GEMM reads them and accumulates into the fp32 buffer (``torch.addmm`` with
    ``out_dtype=float32``, fp32 ``self`` and ``out``: cuBLAS's bf16-in/fp32-out path), so no chunk's product is
    rounded to bf16 and no bf16 ``[V, d]`` product is made per chunk. That op exists only on CUDA; elsewhere the
    chunk's operands are upcast (``[chunk, V]`` and ``[chunk, d]`` temporaries) and accumulated with ``addmm_``, the
    same sum of products of the same bf16 values. A CPU test can show the values; only a GPU shows the memory.
    """
    if dz.dtype != acc_dtype and dz.is_cuda:
        if grad_w is None:
            return torch.mm(dz.T, h, out_dtype=acc_dtype)
        return torch.addmm(grad_w, dz.T, h, out_dtype=acc_dtype, out=grad_w)
    dz, h = dz.to(acc_dtype), h.to(acc_dtype)
    return torch.mm(dz.T, h) if grad_w is None else grad_w.addmm_(dz.T, h)


class _FusedMultiHotCE(torch.autograd.Function):
    """The chunked loss, with hidden/weight/bias gradients computed in the forward and scaled in the backward.

    The stored gradients are handed over (scaled in place) on the first backward, so ``weight.grad`` takes the
    ``[V, d]`` buffer without a copy; a second backward through the same graph is refused.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        index: torch.Tensor,
        mass: torch.Tensor,
        chunk_size: int,
        compute_dtype: torch.dtype,
        compiled: bool,
        need: tuple[bool, ...],
        logit_map: LogitMap,
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            loss, ctx.grads = _chunked(hidden, weight, bias, index, mass, chunk_size, compute_dtype, compiled, need,
                                       logit_map)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("chunked_multi_hot_cross_entropy computes its gradients in the forward and hands them "
                               "over once; run the forward again for a second backward")
        grads, ctx.grads = ctx.grads, None
        out = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)).to(dtype)
                    for g, dtype in zip(grads, ctx.dtypes))
        return (*out, None, None, None, None, None, None, None)
