"""Float32 GEMMs on the CPU through oneDNN where it outruns ``torch.mm``.

``torch.mm`` and ``F.linear`` on the CPU call MKL's ``sgemm``, which runs its AVX2 kernels on AMD processors.
oneDNN, also inside torch (``torch.ops.mkldnn._linear_pointwise``, the op Inductor emits for frozen linears, and
``torch.ops.aten.mkldnn_linear_backward_weights``), picks its kernels by the instruction set: on this project's
CI machines (AMD EPYC, Zen 5, AVX-512) it ran the training step's GEMMs 2.3x faster at 2048 rows
(benchmarks/RESULTS.md); on Intel processors the two are alike. Its results are exact float32 (float32 products
and accumulation, no reduced-precision mode), as ``torch.mm``'s.

oneDNN serves these functions only where it helps and is sound: float32 CPU tensors outside autocast, at least
:data:`MIN_FLOPS` (below that its fixed cost per call, about 10 us, exceeds MKL's), and after a one-time check on
random inputs against float64. Elsewhere they are ``torch.mm`` / ``F.linear``. ``FDPG_CPU_GEMM=torch`` turns
oneDNN off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["mm", "linear", "linear_grads", "onednn_reason"]

MIN_FLOPS = 1 << 22          # 2 M N K below which torch is taken (measured break-even: about 1 M)
_state: dict = {}            # "reason": why oneDNN is not taken, or None
_DUMMY = torch.empty(0)      # linear's weight gradient reads only the dtype and device of its weight argument


def _lin(x, w, b=None):
    """``x @ w^T + b`` by oneDNN: ``x [M, K]`` (copied when not contiguous), ``w [N, K]`` read at its strides."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _wgrad(g, x, bias: bool = False):
    """``(g^T @ x, g.sum(0) or None)`` by oneDNN (linear's weight gradient, the transpose inside its kernel):
    ``g [M, N]``, ``x [M, K]`` -> ``[N, K]``, ``[N]``."""
    w, b = torch.ops.aten.mkldnn_linear_backward_weights(g.contiguous().to_mkldnn(), x.contiguous().to_mkldnn(),
                                                         _DUMMY, bias)
    return w, (b if bias else None)


def _probe():
    if os.environ.get("FDPG_CPU_GEMM", "").lower() == "torch":
        return "FDPG_CPU_GEMM=torch"
    if not torch.backends.mkldnn.is_available():
        return "torch is built without oneDNN (mkldnn)"
    g = torch.Generator().manual_seed(0)
    x, w, y, b = (torch.randn(*s, generator=g) for s in ((67, 45), (33, 45), (67, 33), (33,)))
    x64, w64, y64 = x.double(), w.double(), y.double()
    try:   # every form the functions below call: weights contiguous and transposed, with and without a bias
        got = (_lin(x, w), _lin(x, w.t().contiguous().t(), b), *_wgrad(x, y, True))
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return f"oneDNN's linear is not usable: {e}"
    for g_, want in zip(got, (x64 @ w64.t(), x64 @ w64.t() + b.double(), x64.t() @ y64, x64.sum(0))):
        if g_.shape != want.shape or not torch.allclose(g_.double(), want, rtol=1e-4, atol=1e-4):
            return "oneDNN's linear gave a wrong product on this machine"
    return None


def onednn_reason() -> str | None:
    """Why oneDNN is never taken here (None: it is, above :data:`MIN_FLOPS`)."""
    if not _state:
        _state["reason"] = _probe()
    return _state["reason"]


def _use(M: int, N: int, K: int, *ts) -> bool:
    return (2 * M * N * K >= MIN_FLOPS and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)
            and not torch.is_autocast_enabled("cpu") and onednn_reason() is None)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` outside autograd: ``a [M, K]``, ``b [K, N]`` (any strides) -> ``[M, N]``."""
    M, K = a.shape
    if not _use(M, b.shape[1], K, a, b) or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return a @ b
    if a.t().is_contiguous() and not a.is_contiguous():     # a = x^T: linear's weight gradient, no transposing copy
        return _wgrad(a.t(), b)[0]
    return _lin(a, b.t())


def linear_grads(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, w_out_in: bool, need=(True, True, True)):
    """The gradients ``(dx, dw, db)`` of ``y = x @ w^T + b`` (``w [out, in]`` when ``w_out_in``, else ``x @ w + b``
    with ``w [in, out]``) from ``dy [M, out]``, ``x [M, in]``; None where ``need`` (x, w, b) says so."""
    wt = w if w_out_in else w.t()                                           # [out, in]
    dx = dw = db = None
    if need[0]:
        dx = _lin(dy, wt.t()) if _use(*dy.shape, x.shape[1], dy, w) else dy @ wt
    if need[1]:
        if _use(*dy.shape, x.shape[1], dy, x, w):
            if w_out_in:
                dw, db = _wgrad(dy, x, need[2])         # dy^T x [out, in], and dy's column sums
            else:
                dw = _wgrad(x, dy)[0]                   # x^T dy [in, out]
        else:
            dw = dy.t() @ x if w_out_in else x.t() @ dy
    if need[2] and db is None:
        db = dy.sum(0)
    return dx, dw, db


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, w_out_in: bool):
        ctx.save_for_backward(x, w)
        ctx.w_out_in = w_out_in
        x2 = x.reshape(-1, x.shape[-1])
        return _lin(x2, w if w_out_in else w.t(), b).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx, dw, db = linear_grads(dy2, x.reshape(-1, x.shape[-1]), w, ctx.w_out_in, ctx.needs_input_grad[:3])
        return None if dx is None else dx.view(x.shape), dw, db, None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, w_out_in: bool = True
           ) -> torch.Tensor:
    """``x @ w^T + b`` (``w [out, in]``, as ``F.linear``), or ``x @ w + b`` (``w [in, out]``, GPT-2's Conv1D) when
    not ``w_out_in``; ``x [..., in]`` -> ``[..., out]``, with autograd."""
    M = x.numel() // max(x.shape[-1], 1)
    out, K = (w.shape[0], w.shape[1]) if w_out_in else (w.shape[1], w.shape[0])
    if not _use(M, out, K, x, w, *(() if b is None else (b,))) or torch.compiler.is_compiling():
        if w_out_in:
            return F.linear(x, w, b)
        y = x.reshape(-1, K) @ w if b is None else torch.addmm(b, x.reshape(-1, K), w)
        return y.view(*x.shape[:-1], out)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
        return _Linear.apply(x, w, b, w_out_in)
    return _lin(x.reshape(-1, K), w if w_out_in else w.t(), b).view(*x.shape[:-1], out)
