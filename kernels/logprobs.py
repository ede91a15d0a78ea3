"""Triton kernels for per-token statistics of policy (and prior) logits, with their launch wrappers.

Forward (:func:`token_stats_forward`): one program per block of ``ROWS`` rows of ``[N, V]`` logits reads each
row of policy and prior logits once, a vocabulary tile of ``BLOCK_V`` columns at a time, keeping online
max/sum accumulators in float32 (MATH.md, "Per-token quantities from one pass"). Per row it writes the target's
log-prob, the logsumexp and the max of ``z / tau``, and optionally the policy entropy ``H(pi)`` and the exact
``KL(pi || a)``. Accumulators (``x = z / tau``, ``m`` the running max, ``e = exp(x - m)``):

    S = sum e,   B = sum e (x - m),   C = sum e (x' - m')        (C with the prior's own running max m')
    L = m + log S,   H = log S - B / S,   KL = (B - C) / S - log S + log S'

Every accumulator is rescaled by ``exp(m_old - m_new)`` (and shifted by ``S (m_old - m_new)``) when a max grows,
so all terms stay relative to each model's max. The kernel keeps them in raw-logit units (``m`` the max of ``z``,
``e = exp2((z - m) log2(e) / tau)``, B and C scaled by ``1 / tau`` once at the end): per element one subtraction,
one multiplication and one ``ex2``, and ``z - m`` rounded once, not ``z / tau`` first. Out-of-range vocabulary
columns load as ``-inf`` in every tile.

Backward (:func:`token_stats_backward`) writes, per element of the policy logits,

    dz = [ g_lp (onehot(y) - p) + g_lse p - g_H p (log p + H) + g_KL p (log p - log a - KL) ] / tau

(``p = softmax(x)``, ``a = softmax(x')``) in the logits' dtype, optionally in place into the logits' buffer.

Rows are addressed as ``(r // T1) * s0 + (r % T1) * s1`` and columns with stride ``sv``, so ``[B, T, V]``
slices such as ``logits[:, :-1]`` are read (and written in place) without a copy. With one row per program and
contiguous columns (``ALIGN > 1``) a row runs as a masked head up to its first 16-byte-aligned column, full tiles
without a mask from there, and a masked tail: the GPU loads (and stores) 16 bytes at a time whatever ``V`` is
(with an odd row stride and masks at every tile they would be 2-byte accesses). No libdevice: everything
runs under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["token_stats_forward", "token_stats_backward", "masked_row_sums", "row_layout", "POISON",
           "CONFIG_OVERRIDE"]

# Tests set this to True: outputs are then allocated filled with NaN, so an element a kernel forgets to write
# fails the comparison against the reference.
POISON = False
# (rows, block_v) forced for every launch (tests use it to cover several tiles and ROWS = 1); None: heuristic.
FORCE_CONFIG: tuple[int, int] | None = None
# GPU launch parameters overriding the heuristic key by key ("ROWS", "BLOCK_V", "num_warps"), for both the forward
# and the backward: benchmarks/bench_logprobs.py --sweep times a grid of them.
CONFIG_OVERRIDE: dict = {}


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _config(n: int, v: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_V, num_warps) for ``n`` rows of ``v`` columns."""
    if FORCE_CONFIG is not None:
        rows, block = FORCE_CONFIG
        return rows, block, 4
    if _interpreting():  # numpy runs a whole tile per op: big tiles of many rows are fast
        block = min(triton.next_power_of_2(v), 512)
        rows = max(1, min(64, 8192 // block, triton.next_power_of_2(max(n, 1))))
        return rows, block, 4
    block = min(triton.next_power_of_2(v), 4096)
    rows = max(1, min(16, 2048 // block))
    elems = rows * block
    warps = 4 if elems <= 1024 else (8 if elems <= 2048 else 16)
    if CONFIG_OVERRIDE:
        block = min(int(CONFIG_OVERRIDE.get("BLOCK_V", block)), triton.next_power_of_2(v))
        rows = int(CONFIG_OVERRIDE.get("ROWS", rows))
        warps = int(CONFIG_OVERRIDE.get("num_warps", warps))
    return rows, block, warps


def _alignment(rows: int, main, *others):
    """``(ALIGN, aligned...)`` of a launch: ``ALIGN`` elements make 16 bytes of the narrowest tensor when one row
    per program reads contiguous columns of ``main`` (``(tensor, (s0, s1, t1, sv))`` from :func:`row_layout`) and
    of every other tensor, else 1 (the tiled loop); for each of ``others`` (or None), whether its rows start at
    the same offset modulo ``ALIGN`` as ``main``'s from a 16-byte-aligned base (so that the main loop's column
    range is 16-byte aligned there too)."""
    t, (s0, s1, t1, sv) = main
    sizes = [t.element_size()] + [o[0].element_size() for o in others if o is not None]
    unit = sv == 1 and all(o is None or o[1][3] == 1 for o in others)   # the row path reads columns at stride 1
    if rows != 1 or not unit or min(sizes) not in (2, 4) or t.data_ptr() % 16:
        return (1,) + tuple(False for _ in others)
    align = 16 // min(sizes)

    def same(o):
        """Row r starts at (r // t1) * s0 + (r % t1) * s1 in each: congruent modulo align for every r."""
        if o is None:
            return False
        u, (u0, u1, ut1, usv) = o
        if usv != 1 or u.data_ptr() % 16:
            return False
        if ut1 == t1:
            return (u0 - s0) % align == 0 and (u1 - s1) % align == 0
        return all(x % align == 0 for x in (s0, s1, u0, u1))      # every row of both starts aligned
    return (align,) + tuple(same(o) for o in others)


def row_layout(x: torch.Tensor):
    """``(x, s0, s1, t1, sv)`` such that row ``r`` of ``x [..., V]`` starts at ``(r // t1) * s0 + (r % t1) * s1``
    and column ``j`` is ``j * sv`` further. Leading dims are merged where the strides allow; a layout that needs
    more than two leading dims is made contiguous (the returned ``x`` is then a copy)."""
    v = x.shape[-1]
    sv = x.stride(-1) if v > 1 else 1
    dims = [(n, s) for n, s in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    merged: list[list[int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            merged[-1] = [merged[-1][0] * n, s]
        else:
            merged.append([n, s])
    if len(merged) == 0:
        return x, 0, 0, 1, sv
    if len(merged) == 1:
        return x, merged[0][1], 0, 1, sv
    if len(merged) == 2:
        return x, merged[0][1], merged[1][1], merged[1][0], sv
    x = x.contiguous()
    return x, v, 0, 1, 1


def overlapping(x: torch.Tensor) -> bool:
    """True when two elements of ``x`` may share memory (e.g. an ``expand``-ed tensor): unfit for in-place."""
    dims = sorted((s, n) for n, s in zip(x.shape, x.stride()) if n != 1)
    extent = 1
    for s, n in dims:
        if s < extent:
            return True
        extent = s * n
    return False


@triton.jit
def _load_pair(z_ptr, zoff, zp_ptr, zpoff, msk, PAIR: tl.constexpr):
    """A tile of logits as float32 at offsets ``zoff`` (-inf where ``msk`` is False; ``msk`` None: no mask, the row
    path's full tiles), and the prior's at ``zpoff`` when ``PAIR`` (else the same tile again)."""
    NEG_INF: tl.constexpr = float("-inf")
    if msk is None:
        x = tl.load(z_ptr + zoff).to(tl.float32)
    else:
        x = tl.load(z_ptr + zoff, mask=msk, other=NEG_INF).to(tl.float32)
    xp = x
    if PAIR:
        if msk is None:
            xp = tl.load(zp_ptr + zpoff).to(tl.float32)
        else:
            xp = tl.load(zp_ptr + zpoff, mask=msk, other=NEG_INF).to(tl.float32)
    return x, xp


@triton.jit
def _row_base(row, lead, ALIGN: tl.constexpr, ALIGNED: tl.constexpr):
    """The offset of a row's first main-loop column (``row + lead``: ``row`` the row's start, one value in a
    ``[1]`` block), hinted a multiple of ``ALIGN`` where the launch found it one (the row path's tensors)."""
    b = tl.max(row, 0) + lead
    if ALIGNED:
        b = tl.multiple_of(b, ALIGN)
    return b


@triton.jit
def _fwd_update(z, zp, m, S, Bs, pm, PS, Cs, c, HAS_PRIOR: tl.constexpr, ENTROPY: tl.constexpr, KL: tl.constexpr):
    """One tile of raw logits ``z [ROWS, BLOCK_V]`` (and the prior's ``zp``) into the rows' online accumulators
    (module doc), kept in raw-logit units: ``m`` the max of ``z``, ``e = exp2((z - m) c)`` with ``c = log2(e) /
    tau`` (the difference exact near the max, then one scaling: no separate division by tau), ``B`` and ``C``
    without their factor ``1 / tau`` (the caller scales)."""
    NEG_INF: tl.constexpr = float("-inf")
    m_new = tl.maximum(m, tl.max(z, 1))
    m_use = tl.where(m_new == NEG_INF, 0.0, m_new)   # a finite reference while the row is all -inf so far
    alpha = tl.exp2((m - m_use) * c)
    e = tl.exp2((z - m_use[:, None]) * c)
    S_old = S
    S = alpha * S + tl.sum(e, 1)
    if ENTROPY or KL:
        shift = tl.where(m == NEG_INF, 0.0, m - m_use)
        xs = tl.where(e > 0, e * (z - m_use[:, None]), 0.0)
        Bs = alpha * (Bs + S_old * shift) + tl.sum(xs, 1)
    if HAS_PRIOR:
        pm_new = tl.maximum(pm, tl.max(zp, 1))
        pm_use = tl.where(pm_new == NEG_INF, 0.0, pm_new)
        ep = tl.exp2((zp - pm_use[:, None]) * c)
        PS = tl.exp2((pm - pm_use) * c) * PS + tl.sum(ep, 1)
        if KL:
            pshift = tl.where(pm == NEG_INF, 0.0, pm - pm_use)
            cs = tl.where(e > 0, e * (zp - pm_use[:, None]), 0.0)
            Cs = alpha * (Cs + S_old * pshift) + tl.sum(cs, 1)
        pm = pm_new
    return m_new, S, Bs, pm, PS, Cs


@triton.jit
def _token_stats_fwd_kernel(
    z_ptr, z_s0, z_s1, z_t1, z_sv,
    zp_ptr, zp_s0, zp_s1, zp_t1, zp_sv,
    y_ptr,
    lp_ptr, lse_ptr, mx_ptr, ent_ptr, kl_ptr,
    plp_ptr, plse_ptr, pmx_ptr,
    N, V, inv_tau,
    HAS_PRIOR: tl.constexpr, ENTROPY: tl.constexpr, KL: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, PRIOR_ALIGNED: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    zrow = (r64 // z_t1) * z_s0 + (r64 % z_t1) * z_s1
    zprow = zrow
    if HAS_PRIOR:
        zprow = (r64 // zp_t1) * zp_s0 + (r64 % zp_t1) * zp_s1
    cols0 = tl.arange(0, BLOCK_V)

    c = inv_tau * 1.4426950408889634           # log2(e) / tau: exp((z - m) / tau) = exp2((z - m) c)
    m = tl.full([ROWS], NEG_INF, tl.float32)   # running max of z (x = z / tau: its max is m / tau)
    S = tl.zeros([ROWS], tl.float32)           # sum exp(x - m / tau)
    Bs = tl.zeros([ROWS], tl.float32)          # sum exp(x - m / tau) (z - m), i.e. tau B
    pm = tl.full([ROWS], NEG_INF, tl.float32)  # prior: running max of z'
    PS = tl.zeros([ROWS], tl.float32)          # prior: sum exp(x' - m' / tau)
    Cs = tl.zeros([ROWS], tl.float32)          # sum exp(x - m / tau) (z' - m'), i.e. tau C

    if ALIGN > 1:
        # One row (ROWS == 1), columns contiguous: the columns before the row's first 16-byte-aligned one, then
        # full tiles from there with no mask (so that the loads are 16-byte vectors whatever V is), then the rest.
        zr = tl.max(zrow, 0)
        lead = (ALIGN - zr % ALIGN) % ALIGN
        nfull = tl.maximum(V - lead, 0) // BLOCK_V
        if lead > 0:                                   # fewer than ALIGN <= 16 columns: a 16-wide tile
            hcols = tl.arange(0, 16)
            msk = row_ok[:, None] & ((hcols < lead) & (hcols < V))[None, :]
            x, xp = _load_pair(z_ptr, zrow[:, None] + hcols[None, :], zp_ptr, zprow[:, None] + hcols[None, :], msk,
                               HAS_PRIOR)
            m, S, Bs, pm, PS, Cs = _fwd_update(x, xp, m, S, Bs, pm, PS, Cs, c, HAS_PRIOR, ENTROPY, KL)
        tl.device_assert((zr + lead) % ALIGN == 0, "row start not aligned")
        base = _row_base(zrow, lead, ALIGN, True)
        pbase = _row_base(zprow, lead, ALIGN, PRIOR_ALIGNED)
        for t in range(0, nfull):
            off = t * BLOCK_V + cols0
            x, xp = _load_pair(z_ptr, base + off, zp_ptr, pbase + off, None, HAS_PRIOR)
            m, S, Bs, pm, PS, Cs = _fwd_update(x[None, :], xp[None, :], m, S, Bs, pm, PS, Cs, c, HAS_PRIOR,
                                               ENTROPY, KL)
        c1 = lead + nfull * BLOCK_V
        if c1 < V:
            cols = c1 + cols0
            msk = row_ok[:, None] & (cols < V)[None, :]
            x, xp = _load_pair(z_ptr, zrow[:, None] + cols[None, :], zp_ptr, zprow[:, None] + cols[None, :], msk,
                               HAS_PRIOR)
            m, S, Bs, pm, PS, Cs = _fwd_update(x, xp, m, S, Bs, pm, PS, Cs, c, HAS_PRIOR, ENTROPY, KL)
    else:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            msk = row_ok[:, None] & (cols < V)[None, :]
            coff = cols.to(tl.int64)[None, :]
            x, xp = _load_pair(z_ptr, zrow[:, None] + coff * z_sv, zp_ptr, zprow[:, None] + coff * zp_sv, msk,
                               HAS_PRIOR)
            m, S, Bs, pm, PS, Cs = _fwd_update(x, xp, m, S, Bs, pm, PS, Cs, c, HAS_PRIOR, ENTROPY, KL)

    logS = tl.log(S)
    m = m * inv_tau                            # from here in x = z / tau units, B and C too
    lse = m + logS
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    y_ok = row_ok & (y >= 0) & (y < V)
    zy = tl.load(z_ptr + zrow + y * z_sv, mask=y_ok, other=float("nan")).to(tl.float32) * inv_tau
    tl.store(lp_ptr + rows, zy - lse, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(mx_ptr + rows, m, mask=row_ok)
    if ENTROPY:
        tl.store(ent_ptr + rows, logS - Bs * inv_tau / S, mask=row_ok)
    if HAS_PRIOR:
        logPS = tl.log(PS)
        pm = pm * inv_tau
        plse = pm + logPS
        zpy = tl.load(zp_ptr + zprow + y * zp_sv, mask=y_ok, other=float("nan")).to(tl.float32) * inv_tau
        tl.store(plp_ptr + rows, zpy - plse, mask=row_ok)
        tl.store(plse_ptr + rows, plse, mask=row_ok)
        tl.store(pmx_ptr + rows, pm, mask=row_ok)
        if KL:
            tl.store(kl_ptr + rows, (Bs - Cs) * inv_tau / S - logS + logPS, mask=row_ok)


@triton.jit
def _token_stats_bwd_kernel(
    z_ptr, z_s0, z_s1, z_t1, z_sv,
    zp_ptr, zp_s0, zp_s1, zp_t1, zp_sv,
    g_ptr, g_s0, g_s1, g_t1, g_sv,
    y_ptr, lse_ptr, ent_ptr, kl_ptr, plse_ptr,
    glp_ptr, glse_ptr, gent_ptr, gkl_ptr, gseq_ptr, mask_ptr,
    N, V, SEQ_T, inv_tau,
    HAS_GLP: tl.constexpr, HAS_GLSE: tl.constexpr, HAS_GENT: tl.constexpr, HAS_GKL: tl.constexpr,
    HAS_GSEQ: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
    PRIOR_ALIGNED: tl.constexpr, OUT_ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    zrow = (r64 // z_t1) * z_s0 + (r64 % z_t1) * z_s1
    grow = (r64 // g_t1) * g_s0 + (r64 % g_t1) * g_s1
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    # dx = a onehot(y) + p (k + u log p - g_KL log a), with a = g_lp (+ g_seq), k = g_lse - a - g_H H - g_KL KL,
    # u = g_KL - g_H.
    a = tl.zeros([ROWS], tl.float32)
    if HAS_GLP:
        a += tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    if HAS_GSEQ:
        keep = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
        gs = tl.load(gseq_ptr + r64 // SEQ_T, mask=row_ok & keep, other=0.0)
        a += tl.where(keep, gs, 0.0)
    k = -a
    u = tl.zeros([ROWS], tl.float32)
    if HAS_GLSE:
        k += tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
    if HAS_GENT:
        gH = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        k -= gH * tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        u -= gH
    gK = u
    plse = lse
    zprow = zrow
    if HAS_GKL:
        gK = tl.load(gkl_ptr + rows, mask=row_ok, other=0.0)
        k -= gK * tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
        u += gK
        zprow = (r64 // zp_t1) * zp_s0 + (r64 % zp_t1) * zp_s1
        plse = tl.load(plse_ptr + rows, mask=row_ok, other=0.0)
    cols0 = tl.arange(0, BLOCK_V)
    if ALIGN > 1:
        # one row, contiguous columns: a masked head up to the first 16-byte-aligned column, unmasked full tiles
        # from there (16-byte loads and stores whatever V is), a masked tail (as in the forward)
        zr = tl.max(zrow, 0)
        lead = (ALIGN - zr % ALIGN) % ALIGN
        nfull = tl.maximum(V - lead, 0) // BLOCK_V
        if lead > 0:
            hcols = tl.arange(0, 16)
            msk = row_ok[:, None] & ((hcols < lead) & (hcols < V))[None, :]
            x, xp = _load_pair(z_ptr, zrow[:, None] + hcols[None, :], zp_ptr, zprow[:, None] + hcols[None, :], msk,
                               HAS_GKL)
            dx = _bwd_tile(x, xp, hcols, lse, plse, k, u, gK, a, y, inv_tau, HAS_GENT, HAS_GKL)
            tl.store(g_ptr + grow[:, None] + hcols[None, :], dx.to(g_ptr.dtype.element_ty), mask=msk)
        tl.device_assert((zr + lead) % ALIGN == 0, "row start not aligned")
        base = _row_base(zrow, lead, ALIGN, True)
        pbase = _row_base(zprow, lead, ALIGN, PRIOR_ALIGNED)
        gbase = _row_base(grow, lead, ALIGN, OUT_ALIGNED)
        for t in range(0, nfull):
            off = t * BLOCK_V + cols0
            x, xp = _load_pair(z_ptr, base + off, zp_ptr, pbase + off, None, HAS_GKL)
            dx = _bwd_tile(x[None, :], xp[None, :], lead + off, lse, plse, k, u, gK, a, y, inv_tau, HAS_GENT, HAS_GKL)
            tl.store(g_ptr + gbase + off, tl.reshape(dx, [BLOCK_V]).to(g_ptr.dtype.element_ty))
        c1 = lead + nfull * BLOCK_V
        if c1 < V:
            cols = c1 + cols0
            msk = row_ok[:, None] & (cols < V)[None, :]
            x, xp = _load_pair(z_ptr, zrow[:, None] + cols[None, :], zp_ptr, zprow[:, None] + cols[None, :], msk,
                               HAS_GKL)
            dx = _bwd_tile(x, xp, cols, lse, plse, k, u, gK, a, y, inv_tau, HAS_GENT, HAS_GKL)
            tl.store(g_ptr + grow[:, None] + cols[None, :], dx.to(g_ptr.dtype.element_ty), mask=msk)
    else:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            msk = row_ok[:, None] & (cols < V)[None, :]
            coff = cols.to(tl.int64)[None, :]
            x, xp = _load_pair(z_ptr, zrow[:, None] + coff * z_sv, zp_ptr, zprow[:, None] + coff * zp_sv, msk, HAS_GKL)
            dx = _bwd_tile(x, xp, cols, lse, plse, k, u, gK, a, y, inv_tau, HAS_GENT, HAS_GKL)
            tl.store(g_ptr + grow[:, None] + coff * g_sv, dx.to(g_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _bwd_tile(z, zp, cols, lse, plse, k, u, gK, a, y, inv_tau, HAS_GENT: tl.constexpr, HAS_GKL: tl.constexpr):
    """The gradient ``[ROWS, W]`` of one tile of raw logits ``z`` (``zp`` the prior's) at columns ``cols [W]``."""
    if HAS_GENT or HAS_GKL:
        logp = z * inv_tau - lse[:, None]
        p = tl.exp(logp)
        inner = k[:, None] + u[:, None] * logp
        if HAS_GKL:
            inner -= gK[:, None] * (zp * inv_tau - plse[:, None])
        dx = tl.where(p > 0, p * inner, 0.0) * inv_tau
    else:
        # p / tau times the row's k: p = exp2(z c - lse log2(e)) with c = log2(e) / tau, one FMA and one ex2 an
        # element (z c and z / tau - lse are rounded alike); a row whose lse is not finite gets 0 (p = 0)
        c = inv_tau * 1.4426950408889634
        l2 = tl.where(tl.abs(lse) < float("inf"), lse * 1.4426950408889634, float("inf"))
        dx = tl.exp2(z * c - l2[:, None]) * (k * inv_tau)[:, None]
    return dx + tl.where(cols[None, :] == y[:, None], (a * inv_tau)[:, None], 0.0)


@triton.jit
def _masked_row_sums_kernel(x_ptr, xp_ptr, mask_ptr, out_ptr, pout_ptr, T,
                            HAS_PRIOR: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    acc = tl.zeros([BLOCK_T], tl.float32)
    pacc = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        ok = offs < T
        keep = ok & (tl.load(mask_ptr + base + offs, mask=ok, other=0) != 0)
        acc += tl.where(keep, tl.load(x_ptr + base + offs, mask=keep, other=0.0), 0.0)
        if HAS_PRIOR:
            pacc += tl.where(keep, tl.load(xp_ptr + base + offs, mask=keep, other=0.0), 0.0)
    tl.store(out_ptr + b, tl.sum(acc, 0))
    if HAS_PRIOR:
        tl.store(pout_ptr + b, tl.sum(pacc, 0))


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.reshape(-1).contiguous().view(torch.uint8)


def token_stats_forward(policy: torch.Tensor, prior: torch.Tensor | None, targets: torch.Tensor,
                        temperature: float = 1.0, entropy: bool = False, kl: bool = False):
    """Launch the forward kernel.

    policy ``[..., V]`` and prior ``[..., V]`` (or None) float16/bfloat16/float32 with any strides; targets
    ``[...]`` integer. Returns a dict of ``[...]`` float32 tensors: ``lp, lse, max`` and, as asked, ``entropy``,
    ``kl``, ``prior_lp, prior_lse, prior_max`` (absent keys are not computed).
    """
    if kl and prior is None:
        raise ValueError("kl: needs prior logits")
    lead, V = tuple(policy.shape[:-1]), policy.shape[-1]
    N = math.prod(lead)
    dev = policy.device
    out = {k: _alloc(lead, torch.float32, dev) for k in ("lp", "lse", "max")}
    if entropy:
        out["entropy"] = _alloc(lead, torch.float32, dev)
    if prior is not None:
        for k in ("prior_lp", "prior_lse", "prior_max"):
            out[k] = _alloc(lead, torch.float32, dev)
        if kl:
            out["kl"] = _alloc(lead, torch.float32, dev)
    if N == 0:
        return out
    z, *zl = row_layout(policy)
    if prior is not None:
        zp, *zpl = row_layout(prior)
    else:
        zp, zpl = z, zl
    y = _flat(targets)
    rows, block, warps = _config(N, V)
    align, prior_aligned = _alignment(rows, (z, zl), (zp, zpl) if prior is not None else None)
    dummy = out["lp"]
    _token_stats_fwd_kernel[(triton.cdiv(N, rows),)](
        z, *zl, zp, *zpl, y,
        out["lp"], out["lse"], out["max"], out.get("entropy", dummy), out.get("kl", dummy),
        out.get("prior_lp", dummy), out.get("prior_lse", dummy), out.get("prior_max", dummy),
        N, V, 1.0 / temperature,
        HAS_PRIOR=prior is not None, ENTROPY=bool(entropy), KL=bool(kl), ROWS=rows, BLOCK_V=block,
        ALIGN=align, PRIOR_ALIGNED=prior_aligned, num_warps=warps,
    )
    return out


def token_stats_backward(policy: torch.Tensor, prior: torch.Tensor | None, targets: torch.Tensor,
                         lse: torch.Tensor, *, entropy: torch.Tensor | None = None, kl: torch.Tensor | None = None,
                         prior_lse: torch.Tensor | None = None, grad_lp: torch.Tensor | None = None,
                         grad_lse: torch.Tensor | None = None, grad_entropy: torch.Tensor | None = None,
                         grad_kl: torch.Tensor | None = None, grad_seq: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, temperature: float = 1.0,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient with respect to ``policy [..., V]`` in its dtype, written into ``out`` (e.g. ``policy`` itself
    for an in-place backward; any non-overlapping strides) or a new contiguous tensor.

    ``grad_*`` are ``[...]`` upstream gradients or None (zero); ``grad_seq`` is ``[...[:-1]]``, the gradient of
    the masked sums over the last dim of ``targets``, used with ``mask [...]``. ``entropy``/``kl`` are the
    forward's values, needed with their gradients (``kl`` also needs ``prior`` and ``prior_lse``).
    """
    lead, V = tuple(policy.shape[:-1]), policy.shape[-1]
    N = math.prod(lead)
    if out is None:
        out = _alloc(policy.shape, policy.dtype, policy.device)
    if N == 0:
        return out
    if grad_kl is not None and (prior is None or prior_lse is None or kl is None):
        raise ValueError("grad_kl: needs prior, prior_lse and the forward's kl")
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy: needs the forward's entropy")
    if grad_seq is not None and mask is None:
        raise ValueError("grad_seq: needs the mask")
    z, *zl = row_layout(policy)
    g, *gl = row_layout(out)
    if g is not out:  # more than two leading dims that cannot be merged: write a copy, then copy back
        g, gl = torch.empty_like(out, memory_format=torch.contiguous_format), [V, 0, 1, 1]
    if grad_kl is not None:
        zp, *zpl = row_layout(prior)
    else:
        zp, zpl = z, zl
    f32 = lambda t: None if t is None else _flat(t.to(torch.float32))  # noqa: E731
    lse_f, ent_f, kl_f, plse_f = f32(lse), f32(entropy), f32(kl), f32(prior_lse)
    glp, glse, gent, gkl, gseq = f32(grad_lp), f32(grad_lse), f32(grad_entropy), f32(grad_kl), f32(grad_seq)
    m = _mask_u8(mask) if grad_seq is not None else None
    seq_t = targets.shape[-1] if targets.dim() > 0 else 1
    rows, block, warps = _config(N, V)
    align, prior_aligned, out_aligned = _alignment(rows, (z, zl), (zp, zpl) if grad_kl is not None else None,
                                                   (g, gl))
    d = lse_f
    _token_stats_bwd_kernel[(triton.cdiv(N, rows),)](
        z, *zl, zp, *zpl, g, *gl,
        _flat(targets), lse_f, d if ent_f is None else ent_f, d if kl_f is None else kl_f,
        d if plse_f is None else plse_f,
        d if glp is None else glp, d if glse is None else glse, d if gent is None else gent,
        d if gkl is None else gkl, d if gseq is None else gseq, lse_f if m is None else m,
        N, V, max(seq_t, 1), 1.0 / temperature,
        HAS_GLP=glp is not None, HAS_GLSE=glse is not None, HAS_GENT=gent is not None, HAS_GKL=gkl is not None,
        HAS_GSEQ=gseq is not None, ROWS=rows, BLOCK_V=block, ALIGN=align, PRIOR_ALIGNED=prior_aligned,
        OUT_ALIGNED=out_aligned, num_warps=warps,
    )
    if g is not out:
        out.copy_(g)
    return out


def masked_row_sums(x: torch.Tensor, mask: torch.Tensor, prior_x: torch.Tensor | None = None):
    """Masked sums over the last dim of float32 ``x [..., T]`` (and ``prior_x``): masked positions add exactly 0.

    Returns ``(sums, prior_sums)``, ``[...]`` float32 each (``prior_sums`` None without ``prior_x``).
    """
    lead, T = tuple(x.shape[:-1]), x.shape[-1]
    nb = math.prod(lead)
    out = _alloc(lead, torch.float32, x.device)
    pout = _alloc(lead, torch.float32, x.device) if prior_x is not None else None
    if nb == 0:
        return out, pout
    if T == 0:
        out.zero_()
        if pout is not None:
            pout.zero_()
        return out, pout
    xf = _flat(x)
    block = min(triton.next_power_of_2(T), 1024)
    _masked_row_sums_kernel[(nb,)](
        xf, xf if prior_x is None else _flat(prior_x), _mask_u8(mask), out, out if pout is None else pout, T,
        HAS_PRIOR=prior_x is not None, BLOCK_T=block, num_warps=4,
    )
    return out, pout
