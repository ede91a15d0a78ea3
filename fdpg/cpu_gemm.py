"""Float32 GEMMs on the CPU at the vector unit's rate: fdpg's native kernel, else oneDNN, else ``torch.mm``.

``torch.mm`` and ``F.linear`` on the CPU call MKL's ``sgemm``, which runs its AVX2 kernels on AMD processors: on this
project's CI machines (AMD EPYC, Zen 5, AVX-512) 90-104 GFLOP/s a core against 257 that the FMA units do. Two
faster routes, both exact float32 (float32 products and accumulation):

- the native library's GEMM (:func:`fdpg.cpu_decode.gemm`: register tiles over the weights in place, on torch's
  OpenMP threads), where ``b`` is contiguous and ``a`` row-major or a transposed contiguous matrix: the forward of
  a ``[in, out]`` weight (GPT-2's Conv1D), the input gradient of a ``[out, in]`` one (``nn.Linear``), every weight
  gradient;
- oneDNN inside torch (``torch.ops.mkldnn._linear_pointwise``, the op Inductor emits for frozen linears, and
  ``torch.ops.aten.mkldnn_linear_backward_weights``), which dispatches on the instruction set, for the other forms,
  after a one-time check on random inputs against float64.

On Intel processors MKL and these run alike. benchmarks/bench_cpu_gemm.py measures the three; RESULTS.md has the
figures (about 2.3x torch.mm at 2048 rows, 2.2x on the weight gradients, here). They serve float32 CPU tensors
outside autocast, at least :data:`MIN_FLOPS` (below that a call's fixed cost, about 10 us for oneDNN, exceeds
MKL's). ``FDPG_CPU_GEMM=torch`` turns both off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import cpu_decode

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
    if not torch.backends.mkldnn.is_available():
        return "torch is built without oneDNN (mkldnn)"
    g = torch.Generator().manual_seed(0)
    x, w, y, b = (torch.randn(*s, generator=g) for s in ((67, 45), (33, 45), (67, 33), (33,)))
    x64, w64, y64 = x.double(), w.double(), y.double()
    try:   # every form called below: weights contiguous and transposed, with and without a bias
        got = (_lin(x, w), _lin(x, w.t().contiguous().t(), b), *_wgrad(x, y, True))
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return f"oneDNN's linear is not usable: {e}"
    for g_, want in zip(got, (x64 @ w64.t(), x64 @ w64.t() + b.double(), x64.t() @ y64, x64.sum(0))):
        if g_.shape != want.shape or not torch.allclose(g_.double(), want, rtol=1e-4, atol=1e-4):
            return "oneDNN's linear gave a wrong product on this machine"
    return None


def _turned_off() -> str | None:
    return "FDPG_CPU_GEMM=torch" if os.environ.get("FDPG_CPU_GEMM", "").lower() == "torch" else None


def onednn_reason() -> str | None:
    """Why oneDNN is never taken here (None: it is, above :data:`MIN_FLOPS`, where the native kernel is not)."""
    off = _turned_off()
    if off:
        return off
    if not _state:
        _state["reason"] = _probe()
    return _state["reason"]


def _native_reason() -> str | None:
    return _turned_off() or cpu_decode._library_reason(torch.float32)


def _fast(M: int, N: int, K: int, *ts) -> bool:
    """Whether a GEMM of this size and these tensors goes past torch.mm."""
    return (2 * M * N * K >= MIN_FLOPS and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)
            and not torch.is_autocast_enabled("cpu") and (_native_reason() is None or onednn_reason() is None))


def _product(a, b):
    """``a @ b`` (``a [M, K]``, ``b [K, N]``) past torch.mm: native where the layouts allow, else oneDNN."""
    if _native_reason() is None:
        out = cpu_decode.gemm(a, b)
        if out is not None:
            return out
    if onednn_reason() is not None:
        return a @ b
    if a.t().is_contiguous() and not a.is_contiguous():     # a = x^T: linear's weight gradient, no transposing copy
        return _wgrad(a.t(), b)[0]
    return _lin(a, b.t())


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` outside autograd: ``a [M, K]``, ``b [K, N]`` (any strides) -> ``[M, N]``."""
    M, K = a.shape
    if not _fast(M, b.shape[1], K, a, b) or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return a @ b
    return _product(a, b)


def linear_grads(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, w_out_in: bool, need=(True, True, True)):
    """The gradients ``(dx, dw, db)`` of ``y = x @ w^T + b`` (``w [out, in]`` when ``w_out_in``, else ``x @ w + b``
    with ``w [in, out]``) from ``dy [M, out]``, ``x [M, in]``; None where ``need`` (x, w, b) says so."""
    wt = w if w_out_in else w.t()                                           # [out, in]
    fast = _fast(*dy.shape, x.shape[1], dy, x, w) and not torch.is_grad_enabled()   # (create_graph: torch's ops)
    dx = dw = None
    if need[0]:
        dx = _product(dy, wt) if fast else dy @ wt
    if need[1]:
        if fast:
            dw = _product(dy.t(), x) if w_out_in else _product(x.t(), dy)
        else:
            dw = dy.t() @ x if w_out_in else x.t() @ dy
    return dx, dw, dy.sum(0) if need[2] else None


def _forward(x2, w, b, w_out_in: bool):
    """``x2 @ w^T + b`` (``w_out_in``) or ``x2 @ w + b`` past torch.mm: ``x2 [M, in]``."""
    if w_out_in or _native_reason() is not None:
        if onednn_reason() is None:
            return _lin(x2, w if w_out_in else w.t(), b)
        y = x2 @ (w.t() if w_out_in else w)
    else:
        y = _product(x2, w)
    return y if b is None else y.add_(b)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, w_out_in: bool):
        ctx.save_for_backward(x, w)
        ctx.w_out_in = w_out_in
        return _forward(x.reshape(-1, x.shape[-1]), w, b, w_out_in).view(*x.shape[:-1], -1)

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
    if not _fast(M, out, K, x, w, *(() if b is None else (b,))) or torch.compiler.is_compiling():
        if w_out_in:
            return F.linear(x, w, b)
        y = x.reshape(-1, K) @ w if b is None else torch.addmm(b, x.reshape(-1, K), w)
        return y.view(*x.shape[:-1], out)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
        return _Linear.apply(x, w, b, w_out_in)
    return _forward(x.reshape(-1, K), w, b, w_out_in).view(*x.shape[:-1], out)
