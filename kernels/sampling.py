"""One ancestral-sampling draw per row of a decoding step's logits, in one kernel.

The draw of :func:`fdpg.sampling._draw` (softmax in float32, inverse CDF in float64 against one uniform per row),
with the end-of-sequence bookkeeping of the sampling loop folded in, is about a dozen ATen kernels a token on a GPU
(softmax, a float64 cumsum, the scaled uniform, searchsorted, the clamp, gather, log, two masked fills, the EOS
test and the ``done`` update). :func:`draw` is one launch, one program per row:

- pass 1 over the vocabulary: the online max ``m`` and ``s = sum(exp(z - m))`` in float32;
- pass 2: ``e = exp(z - m)`` summed in float64 along the row; the token is the first index where the running sum
  exceeds ``u * s`` (the last index with ``e > 0`` where rounding leaves the target unreached), so a token of
  probability 0 is never drawn (every tile is visited: a loop without an early exit has its loads pipelined);
- ``log p = z[token] - m - log(s)``; rows already done get ``pad`` and log-prob 0, and ``done |= token == eos``.

The same distribution as ``_draw`` to rounding (its softmax divides before summing, this sums before dividing).
A row holding a NaN or +inf logit draws token 0 with log-prob NaN (as the CPU loop), for the caller to raise on.
Both passes load their tiles ``STAGES`` ahead (``tl.range(..., num_stages)``: ``cp.async`` on sm_80+): one program
a row walks a whole vocabulary, so its loads must not wait on each other. No libdevice (the interpreter runs it
on CPU tensors in the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["draw"]


@triton.jit
def _draw_kernel(Z, stride_z, U, TOK, LP, DONE, V, pad, eos, HAS_EOS: tl.constexpr, BLOCK: tl.constexpr,
                 STAGES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    bad = tl.zeros((), tl.int32)
    for start in tl.range(0, V, BLOCK, num_stages=STAGES):
        ok = start + cols < V
        x = tl.load(z_row + start + cols, mask=ok, other=float("-inf")).to(tl.float32)
        bad |= tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)        # all -inf so far: nothing to rescale
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
    target = tl.load(U + row).to(tl.float64) * s.to(tl.float64)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    cum = tl.zeros((), tl.float64)
    tok = tl.full((), -1, tl.int64)
    last = tl.zeros((), tl.int64)                                    # the last index with e > 0 so far
    for start in tl.range(0, V, BLOCK, num_stages=STAGES):     # every tile: no early exit, the loads pipelined
        idx = start + cols
        ok = idx < V
        x = tl.load(z_row + idx, mask=ok, other=float("-inf")).to(tl.float32)
        e = tl.where(ok, tl.exp(x - m_ref), 0.0).to(tl.float64)
        c = cum + tl.cumsum(e, axis=0)
        hit = ok & (c > target)
        first = tl.min(tl.where(hit, idx, V), axis=0).to(tl.int64)
        tok = tl.where((tok < 0) & (first < V), first, tok)
        last = tl.maximum(last, tl.max(tl.where(e > 0, idx, 0), axis=0).to(tl.int64))
        cum += tl.sum(e, axis=0)
    tok = tl.where(tok < 0, last, tok)
    lp = tl.load(z_row + tok).to(tl.float32) - m - tl.log(s)
    tok = tl.where(bad != 0, 0, tok)
    lp = tl.where(bad != 0, float("nan"), lp)
    if HAS_EOS:
        done = tl.load(DONE + row) != 0
        tok = tl.where(done, pad, tok)
        lp = tl.where(done, 0.0, lp)
        tl.store(DONE + row, (done | (tok == eos)).to(tl.int8))
    tl.store(TOK + row, tok)
    tl.store(LP + row, lp)


def draw(logits: torch.Tensor, u: torch.Tensor, done: torch.Tensor | None = None, *, pad: int = 0,
         eos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token [B, 1] long, log-prob [B, 1] float32)`` drawn from each row of ``logits [B, V]`` (float32, bf16 or
    fp16; rows may be strided) with the uniform ``u [B]`` or ``[B, 1]`` float64 in [0, 1). With ``eos``: rows
    where ``done [B]`` or ``[B, 1]`` (bool, contiguous) is set get ``pad`` and 0, and ``done`` is updated in place
    (``done |= token == eos``). No autograd."""
    B, V = logits.shape
    if V < 1:
        raise ValueError("logits: expected a vocabulary of at least one token")
    if u.numel() != B or u.dtype != torch.float64:
        raise ValueError(f"u: expected {B} float64 uniforms, got {list(u.shape)} {u.dtype}")
    if eos is not None and (done is None or done.numel() != B or done.dtype != torch.bool
                            or not done.is_contiguous()):
        raise ValueError(f"done: expected a contiguous bool tensor of {B} rows with eos")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tok = torch.empty(B, 1, dtype=torch.long, device=logits.device)
    lp = torch.empty(B, 1, dtype=torch.float32, device=logits.device)
    if B:
        block = min(triton.next_power_of_2(V), 2048)
        flags = done.view(torch.int8) if eos is not None else tok
        _draw_kernel[(B,)](logits, logits.stride(0), u.contiguous(), tok, lp, flags, V, int(pad),
                           -1 if eos is None else int(eos), HAS_EOS=eos is not None, BLOCK=block, STAGES=3,
                           num_warps=4 if block <= 1024 else 8)
    return tok, lp
