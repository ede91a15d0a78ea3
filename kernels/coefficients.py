"""Triton kernel for the sequence-level f-DPG step: log Z, normalised weights, ESS, f' of a built-in divergence,
baseline and coefficients (:func:`fdpg_coefficients`), and the importance-sampling estimates
(:func:`divergence_estimates`), each in one launch of one program that loops over the ``N`` sequences in blocks.

Pass 1 reduces (per lane, combined at the end): ``logsumexp(log P - log q)`` (log Z, unless given) and
``logsumexp(log w)``, ``sum w^2`` of ``log w = log pi - log q``. Pass 2 (batch baseline or estimates) sums
``sum_i wn_i f'(s_i)`` and the estimate terms. Pass 3 writes the weights and coefficients. ``f'`` is given by the
decomposition of :mod:`fdpg.divergences`, ``f'(s) = ce exp(ae s) + k0 + k1 s + k2 sign(s) + k3 softplus(-s)``, with
the importance weight folded into the exponent: ``w f'(s) = ce exp(ae s + log w) + w (k0 + ...)``.
All arithmetic is float32; no libdevice.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["coefficients", "estimates", "POISON"]

POISON = False          # tests: allocate outputs filled with NaN
FORCE_BLOCK: int | None = None   # tests: force the block size (several blocks and a ragged last one)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _alloc(shape, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, math.nan, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _block(n: int) -> tuple[int, int]:
    if FORCE_BLOCK is not None:
        return FORCE_BLOCK, 4
    cap = 2048 if _interpreting() else 4096
    block = max(16, min(triton.next_power_of_2(n), cap))
    return block, (4 if block <= 512 else (8 if block <= 2048 else 16))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _rest(s, K0, K1, K2, K3, HAS_REST: tl.constexpr, HAS_LIN: tl.constexpr, HAS_SIGN: tl.constexpr,
          HAS_SP: tl.constexpr):
    """The part of ``f'(s)`` that is not an exponential of ``s``: ``K0 + K1 s + K2 sign(s) + K3 softplus(-s)``."""
    rest = tl.zeros_like(s)
    if HAS_REST:
        rest += K0
        if HAS_LIN:
            rest += K1 * s
        if HAS_SIGN:
            rest += K2 * tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
        if HAS_SP:
            rest += K3 * _softplus(-s)
    return rest


@triton.jit
def _weighted_fprime(s, lw, shift, CE, AE, K0, K1, K2, K3,
                     HAS_EXP: tl.constexpr, HAS_REST: tl.constexpr, HAS_LIN: tl.constexpr,
                     HAS_SIGN: tl.constexpr, HAS_SP: tl.constexpr):
    """``exp(lw) (f'(s) - shift)``; 0 where ``lw = -inf`` (a sample of zero weight), even where ``f'(s)`` is
    infinite. The shift (the baseline) is taken from ``f'``'s non-exponential part before the weight multiplies
    it, as ``sign(r) exp(lw + log|r|)`` where ``exp(lw) r`` would overflow or underflow on the way."""
    NEG_INF: tl.constexpr = float("-inf")
    out = tl.zeros_like(s)
    if HAS_EXP:
        out += CE * tl.exp(tl.where(lw == NEG_INF, NEG_INF, AE * s + lw))
    rest = _rest(s, K0, K1, K2, K3, HAS_REST, HAS_LIN, HAS_SIGN, HAS_SP) - shift
    return out + _fold(lw, rest)


@triton.jit
def _fold(lw, x):
    """``exp(lw) x``, as ``sign(x) exp(lw + log|x|)`` where the product would overflow or underflow on the way; 0
    where ``x = 0`` or ``lw = -inf``."""
    NEG_INF: tl.constexpr = float("-inf")
    INF: tl.constexpr = float("inf")
    w = tl.exp(lw)
    direct = w * x
    far = tl.where(x > 0, 1.0, -1.0) * tl.exp(lw + tl.log(tl.abs(x)))
    r = tl.where((tl.abs(direct) < INF) & (w > 0) & (w < INF), direct, far)
    return tl.where((x == 0) | (lw == NEG_INF), 0.0, r)


@triton.jit
def _weighted_gap(s_star, s, lw, CE, AE, K1, K2, K3, HAS_EXP: tl.constexpr, HAS_LIN: tl.constexpr,
                  HAS_SIGN: tl.constexpr, HAS_SP: tl.constexpr):
    """``exp(lw) (f'(s_star) - f'(s))``, each part differenced before the weight multiplies it (the constant K0
    cancels exactly); 0 where ``lw = -inf``."""
    NEG_INF: tl.constexpr = float("-inf")
    out = tl.zeros_like(s)
    dead = lw == NEG_INF
    if HAS_EXP:
        out += CE * (tl.exp(tl.where(dead, NEG_INF, AE * s_star + lw)) - tl.exp(tl.where(dead, NEG_INF, AE * s + lw)))
    r = tl.zeros_like(s)
    if HAS_LIN:
        r += K1 * (s_star - s)
    if HAS_SIGN:
        r += K2 * (tl.where(s_star > 0, 1.0, tl.where(s_star < 0, -1.0, 0.0))
                   - tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0)))
    if HAS_SP:
        r += K3 * (_softplus(-s_star) - _softplus(-s))
    return out + _fold(lw, r)


@triton.jit
def _lse_combine(m, s):
    """Per-lane (max, sum exp(x - max)) -> (M, S) of the whole block; M = -inf when every lane is empty."""
    M = tl.max(m, 0)
    Mu = tl.where(M == float("-inf"), 0.0, M)
    S = tl.sum(tl.where(s > 0, s * tl.exp(m - Mu), 0.0), 0)
    return M, S


@triton.jit
def _seq_kernel(
    lpi_ptr, lq_ptr, lP_ptr, la_ptr, lz_ptr,
    coef_ptr, w_ptr, scal_ptr,
    N, log_n, b_value, CE, AE, K0, K1, K2, K3,
    HAS_LZ: tl.constexpr, BASELINE: tl.constexpr, DO_COEF: tl.constexpr, DO_EST: tl.constexpr,
    HAS_PRIOR: tl.constexpr, HAS_EXP: tl.constexpr, HAS_REST: tl.constexpr, HAS_LIN: tl.constexpr,
    HAS_SIGN: tl.constexpr, HAS_SP: tl.constexpr, BLOCK: tl.constexpr,
):
    # BASELINE: 0 none, 1 batch, 2 the number b_value.  scal: [log_z, ess, baseline, kl_p_pi, kl_pi_p, tv, js,
    # kl_pi_a].
    NEG_INF: tl.constexpr = float("-inf")
    LOG2: tl.constexpr = 0.6931471805599453
    offs0 = tl.arange(0, BLOCK)

    # ---- pass 1: log Z and the weight normaliser, per lane --------------------------------------------------
    mz = tl.full([BLOCK], NEG_INF, tl.float32)
    sz = tl.zeros([BLOCK], tl.float32)
    mw = tl.full([BLOCK], NEG_INF, tl.float32)
    sw = tl.zeros([BLOCK], tl.float32)
    sw2 = tl.zeros([BLOCK], tl.float32)
    iw = tl.zeros([BLOCK], tl.int32)   # per lane: the first index of its largest log-weight
    for i0 in range(0, N, BLOCK):
        offs = i0 + offs0
        ok = offs < N
        lpi = tl.load(lpi_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        lq = tl.load(lq_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if not HAS_LZ:
            lP = tl.load(lP_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            t = tl.where(ok, lP - lq, NEG_INF)
            mn = tl.maximum(mz, t)
            mu = tl.where(mn == NEG_INF, 0.0, mn)
            sz = sz * tl.exp(mz - mu) + tl.exp(t - mu)
            mz = mn
        lw = tl.where(ok, lpi - lq, NEG_INF)
        mn = tl.maximum(mw, lw)
        mu = tl.where(mn == NEG_INF, 0.0, mn)
        a = tl.exp(mw - mu)
        e = tl.exp(lw - mu)
        sw = sw * a + e
        sw2 = sw2 * a * a + e * e
        iw = tl.where(lw > mw, offs, iw)
        mw = mn
    if HAS_LZ:
        lz = tl.load(lz_ptr).to(tl.float32)
    else:
        Mz, Sz = _lse_combine(mz, sz)
        lz = Mz + tl.log(Sz) - log_n
    Mw, Sw = _lse_combine(mw, sw)
    Muw = tl.where(Mw == NEG_INF, 0.0, Mw)
    Sw2 = tl.sum(tl.where(sw2 > 0, sw2 * tl.exp(2.0 * (mw - Muw)), 0.0), 0)
    lse_w = Mw + tl.log(Sw)
    ess = Sw * Sw / Sw2

    # ---- pass 2: batch baseline and the estimates ------------------------------------------------------------
    b = b_value  # the host passes 0 unless BASELINE == 2
    if DO_COEF and BASELINE == 1:
        # the sample of the largest weight (the first), *: the coefficients are differenced against its f'
        # (fdpg.reference.fdpg_coefficients): f'_j - B cancels to rounding noise where * holds nearly all the
        # weight, for * and for any sample with its f'; the gaps w_k (f'_* - f'_k) do not
        istar = tl.min(tl.where(mw == Mw, iw, N), 0)
        s_star = (tl.load(lpi_ptr + istar).to(tl.float32) - tl.load(lP_ptr + istar).to(tl.float32) + lz
                  + tl.zeros([BLOCK], tl.float32))
        pacc = tl.zeros([BLOCK], tl.float32)
    if (DO_COEF and BASELINE == 1) or DO_EST:
        bacc = tl.zeros([BLOCK], tl.float32)
        k1 = tl.zeros([BLOCK], tl.float32)
        k2 = tl.zeros([BLOCK], tl.float32)
        k3 = tl.zeros([BLOCK], tl.float32)
        k4 = tl.zeros([BLOCK], tl.float32)
        k5 = tl.zeros([BLOCK], tl.float32)
        for i0 in range(0, N, BLOCK):
            offs = i0 + offs0
            ok = offs < N
            lpi = tl.load(lpi_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            lq = tl.load(lq_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            lP = tl.load(lP_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if DO_COEF and BASELINE == 1:
                s = lpi - lP + lz
                lwn = tl.where(ok, lpi - lq - lse_w, NEG_INF)
                bacc += tl.where(ok, _weighted_fprime(s, lwn, 0.0, CE, AE, K0, K1, K2, K3, HAS_EXP, HAS_REST, HAS_LIN,
                                                      HAS_SIGN, HAS_SP), 0.0)
                lw = tl.where(ok, lpi - lq, NEG_INF)
                gap = _weighted_gap(s_star, s, lw, CE, AE, K1, K2, K3, HAS_EXP, HAS_LIN, HAS_SIGN, HAS_SP)
                pacc += tl.where(ok & (offs != istar), gap, 0.0)
            if DO_EST:
                lp = lP - lz
                wpi = tl.exp(lpi - lq)
                wp = tl.exp(lp - lq)
                k1 += tl.where(ok & (wp > 0), wp * (lp - lpi), 0.0)
                k2 += tl.where(ok & (wpi > 0), wpi * (lpi - lp), 0.0)
                k3 += tl.where(ok, 0.5 * tl.abs(wpi - wp), 0.0)
                hi = tl.maximum(lpi, lp)
                lo = tl.minimum(lpi, lp)
                m = tl.where(lo == NEG_INF, hi, hi + tl.log(1.0 + tl.exp(lo - hi)))   # logaddexp(lpi, lp)
                js = tl.where(wpi > 0, wpi * (LOG2 + lpi - m), 0.0) + tl.where(wp > 0, wp * (LOG2 + lp - m), 0.0)
                k4 += tl.where(ok, 0.5 * js, 0.0)
                if HAS_PRIOR:
                    la = tl.load(la_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                    k5 += tl.where(ok & (wpi > 0), wpi * (lpi - la), 0.0)
        if DO_COEF and BASELINE == 1:
            b = tl.sum(bacc, 0)
            pair = tl.sum(pacc, 0)
        if DO_EST:
            tl.store(scal_ptr + 3, tl.sum(k1, 0) / N)
            tl.store(scal_ptr + 4, tl.sum(k2, 0) / N)
            tl.store(scal_ptr + 5, tl.sum(k3, 0) / N)
            tl.store(scal_ptr + 6, tl.sum(k4, 0) / N)
            if HAS_PRIOR:
                tl.store(scal_ptr + 7, tl.sum(k5, 0) / N)
    tl.store(scal_ptr + 0, lz)
    tl.store(scal_ptr + 1, ess)
    tl.store(scal_ptr + 2, b)

    # ---- pass 3: weights and coefficients --------------------------------------------------------------------
    if DO_COEF:
        for i0 in range(0, N, BLOCK):
            offs = i0 + offs0
            ok = offs < N
            lpi = tl.load(lpi_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            lq = tl.load(lq_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            lP = tl.load(lP_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            s = lpi - lP + lz
            lw = lpi - lq
            if BASELINE == 1:   # -gap_j + wn_j sum_k gap_k (fdpg.reference.fdpg_coefficients)
                gap = _weighted_gap(s_star, s, lw, CE, AE, K1, K2, K3, HAS_EXP, HAS_LIN, HAS_SIGN, HAS_SP)
                coef = tl.exp(lw - lse_w) * pair - tl.where(offs == istar, 0.0, gap)
            else:
                coef = _weighted_fprime(s, lw, b, CE, AE, K0, K1, K2, K3, HAS_EXP, HAS_REST, HAS_LIN, HAS_SIGN,
                                        HAS_SP)
            tl.store(coef_ptr + offs, coef, mask=ok)
            tl.store(w_ptr + offs, tl.exp(lw - lse_w), mask=ok)


def _spec_args(spec):
    ce, ae, k0, k1, k2, k3 = (float(v) for v in spec)
    flags = dict(HAS_EXP=ce != 0.0, HAS_REST=any(v != 0.0 for v in (k0, k1, k2, k3)), HAS_LIN=k1 != 0.0,
                 HAS_SIGN=k2 != 0.0, HAS_SP=k3 != 0.0)
    return (ce, ae, k0, k1, k2, k3), flags


def _launch(lpi, lq, lP, la, log_z, spec, baseline_mode, baseline_value, do_coef, do_est):
    n = lpi.shape[0]
    dev = lpi.device
    coef = _alloc((n,), dev) if do_coef else None
    w = _alloc((n,), dev) if do_coef else None
    scal = _alloc((8,), dev)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    lpi, lq, lP, la = c(lpi), c(lq), c(lP), c(la)
    lz = None if log_z is None else log_z.reshape(1).to(torch.float32)
    params, flags = _spec_args(spec)
    block, warps = _block(n)
    _seq_kernel[(1,)](
        lpi, lq, lP, lpi if la is None else la, lpi if lz is None else lz,
        scal if coef is None else coef, scal if w is None else w, scal,
        n, math.log(n), float(baseline_value) if baseline_mode == 2 else 0.0, *params,
        HAS_LZ=lz is not None, BASELINE=int(baseline_mode), DO_COEF=do_coef, DO_EST=do_est,
        HAS_PRIOR=la is not None, BLOCK=block, num_warps=warps, **flags,
    )
    return coef, w, scal


def coefficients(policy_logprob, proposal_logprob, target_logscore, log_z, spec, baseline_mode: int,
                 baseline_value: float = 0.0):
    """f-DPG coefficients of ``[N]`` float16/bfloat16/float32 sequence log-probs in one launch.

    spec: ``(ce, ae, k0, k1, k2, k3)`` of f' (module docstring). log_z: a one-element tensor or None (estimate).
    baseline_mode: 0 none, 1 batch, 2 ``baseline_value``. Returns ``(coef [N], weights [N], scal [3])`` float32,
    ``scal = (log_z, ess, baseline)``.
    """
    coef, w, scal = _launch(policy_logprob, proposal_logprob, target_logscore, None, log_z, spec, baseline_mode,
                            baseline_value, True, False)
    return coef, w, scal[:3]


def estimates(policy_logprob, proposal_logprob, target_logscore, prior_logprob=None, log_z=None):
    """Importance-sampling estimates in one launch: a float32 ``[7]`` tensor ``(kl_p_pi, kl_pi_p, tv, js, kl_pi_a,
    ess, log_z)`` (``kl_pi_a`` unwritten without the prior)."""
    _, _, scal = _launch(policy_logprob, proposal_logprob, target_logscore, prior_logprob, log_z,
                         (0.0, 0.0, 0.0, 0.0, 0.0, 0.0), 0, 0.0, False, True)
    return scal[[3, 4, 5, 6, 7, 1, 0]]
