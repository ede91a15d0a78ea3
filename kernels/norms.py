"""The decoding step's residual add, LayerNorm or RMSNorm and the cast to the GEMM dtype, in one kernel.

A decoding step on a GPU runs a few kernels per op on ``[B, d]`` tensors (tens of rows): its time is the number of
kernels, not their bytes. Between two GEMMs a transformer layer computes ``x = x + delta`` (the residual add of
the previous GEMM's output), the norm of ``x`` in float32, and (under autocast) the norm's cast to the GEMM's
dtype: two to seven ATen kernels (GPT-2: add, layer_norm, cast; Llama's RMSNorm as Hugging Face writes it: add,
pow, mean, add, rsqrt, mul, mul, cast). :func:`add_norm` is one launch, one program per row:

- ``x_new = x + delta`` rounded to ``x``'s dtype (written in place into ``x`` or to ``x_out``), as torch's add;
- LayerNorm: ``(x_new - mean) / sqrt(var + eps) * weight + bias`` (biased variance), torch's ``layer_norm``;
- RMSNorm: ``weight * round(x_new / sqrt(mean(x_new^2) + eps))``, the rounding to ``x``'s dtype as in Hugging
  Face's ``LlamaRMSNorm`` (``weight * hidden_states.to(input_dtype)``);
- the result rounded once to ``out_dtype``.

float32 arithmetic throughout (the reductions in a different order from ATen's: equal to float32 rounding). No
libdevice (the interpreter runs it on CPU tensors in the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["add_norm"]


@triton.jit
def _add_norm_kernel(X, D, W, Bias, XO, Y, n, stride_x, stride_d, stride_xo, stride_y, eps,
                     HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_D:
        d = tl.load(D + row * stride_d + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(XO.dtype.element_ty)     # the add, in x's dtype
        tl.store(XO + row * stride_xo + cols, x, mask=ok)
    xf = x.to(tl.float32)
    if RMS:
        xn = xf / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        xn = xn.to(X.dtype.element_ty).to(tl.float32)                           # Hugging Face's .to(input_dtype)
    else:
        xc = tl.where(ok, xf - tl.sum(xf, axis=0) / n, 0.0)
        xn = xc / tl.sqrt(tl.sum(xc * xc, axis=0) / n + eps)
    y = xn * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(Bias + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, *, rms: bool, out_dtype: torch.dtype, inplace: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, norm(x + delta))`` of rows ``x [M, d]`` and ``delta [M, d]`` (or None: the norm of ``x``),
    ``weight [d]``, ``bias [d]`` or None (LayerNorm) / None (``rms``). The sum has ``x``'s dtype (written into ``x``
    when ``inplace``); the norm is ``[M, d]`` in ``out_dtype``. Rows may be strided; columns must be contiguous.
    No autograd (a decoding step)."""
    M, n = x.shape
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta: expected {list(x.shape)} (x's shape), got {list(delta.shape)}")
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"weight, bias: expected [{n}] each")
    if rms and bias is not None:
        raise ValueError("bias: RMSNorm has none")
    if inplace and delta is not None and x.stride(-1) != 1:
        raise ValueError(f"x: the sum is written into x in place (inplace=True), which needs contiguous columns "
                         f"(stride 1 in the last dim), got strides {tuple(x.stride())}")
    x, delta, weight = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, delta, weight))
    bias = None if bias is None else bias.contiguous()
    xo = x if (inplace or delta is None) else torch.empty_like(x)
    y = torch.empty(M, n, dtype=out_dtype, device=x.device)
    if M:
        block = triton.next_power_of_2(n)
        warps = 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8
        _add_norm_kernel[(M,)](x, x if delta is None else delta, weight, weight if bias is None else bias, xo, y, n,
                               x.stride(0), 0 if delta is None else delta.stride(0), xo.stride(0), y.stride(0),
                               float(eps), HAS_D=delta is not None, HAS_BIAS=bias is not None, RMS=rms,
                               BLOCK=block, num_warps=warps)
    return xo, y
