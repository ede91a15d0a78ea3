"""Fused output layer: per-token log-probs through ``z = (h @ W^T + b) / tau`` without the N x V logits in memory.

Kernels and their launch wrappers (no autograd here; :mod:`fdpg.ops.linear` wraps them):

- ``_fwd_kernel``: each program owns ``BLOCK_N`` rows of ``hidden [N, d]`` and a contiguous range of vocabulary
  tiles (a *split*). Logit tiles ``[BLOCK_N, BLOCK_V]`` are computed with ``tl.dot`` (bf16/fp16 operands, fp32
  accumulation; fp32 operands use IEEE fp32), the bias added in fp32, scaled by ``1/tau``; out-of-range columns are
  -inf in every tile. An online logsumexp in fp32 combines the tiles and the target's logit is picked from the tile
  it falls in. With one split the kernel writes ``lp`` and ``lse`` directly; with several it writes per-split
  partials ``(max, sum, target logit)`` that :func:`_combine` merges (``O(splits * N)`` floats).
- ``_grad_logits_kernel`` (backward): recomputes one logit tile of a vocabulary chunk (once: one recompute in
  all), turns it into ``G = (g_lp * onehot(y) + (g_lse - g_lp) * softmax(z)) / tau`` in fp32 and writes it, in the
  matmul dtype, to a ``[N, chunk]`` buffer whose size is bounded by :data:`CHUNK_BYTES` (never ``N x V``); it also
  writes per-row-block partial column sums for ``grad_bias`` (exact, deterministic).
- exact mode: ``grad_weight[chunk] = G^T @ h`` and ``grad_hidden += G @ W[chunk]`` are plain matmuls (cuBLAS on a
  GPU: the 4·N·d·V backward FLOPs run at the library's matmul rate), ``grad_hidden`` accumulated in fp32 across
  chunks. No atomics anywhere: results are deterministic.
- fast mode: the grad-logits kernel also flags each ``[BLOCK_N, BLOCK_V]`` tile that holds a target or a softmax
  entry ``>= eps`` in a row with a nonzero gradient (Cut Cross-Entropy's filter), writes only flagged tiles, and two
  block-sparse Triton matmuls (``_dh_kernel``, ``_dw_kernel``) skip the unflagged ones.
- ``impl="chunked"`` (:data:`IMPL`, or ``CONFIG_OVERRIDE["impl"]``): the logits of ``cols`` vocabulary columns at a
  time come from a cuBLAS GEMM with a float32 output (``torch.mm(..., out_dtype=torch.float32)``: the same fp32
  products and accumulation as ``tl.dot``), and small Triton kernels fold each ``[N, cols]`` chunk into the
  online logsumexp (``_chunk_fwd_kernel``) or turn it into the gradient of the logits (``_chunk_grad_kernel``,
  exact mode). The chunk (``N * cols`` floats, sized to stay in L2) is the only buffer beyond the fused path's:
  O(N), never ``N x V``. It trades the chunk's round trip through L2 for the library's GEMM rate.

Under ``TRITON_INTERPRET=1`` (CPU) ``tl.dot`` on bf16 operands is wrong (triton issue 11584), so the ``DOT``
constexpr upcasts dot operands to fp32 there; the bf16 dot path runs only on a GPU. No libdevice.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["linear_logprobs_fwd", "linear_logprobs_bwd", "config", "CHUNK_BYTES", "CONFIG_OVERRIDE", "POISON",
           "IMPL"]

#: Upper bound on the backward's grad-logits buffer ``[N, chunk]`` in bytes (the only buffer that grows with V).
CHUNK_BYTES = 512 * 2**20
#: Tests and benchmarks may force launch parameters: keys of :func:`config`'s result (BLOCK_N, BLOCK_V, BLOCK_D,
#: num_warps, num_stages, splits, chunk, impl, cols).
CONFIG_OVERRIDE: dict = {}
#: How the logits are computed: "fused" (``tl.dot`` tiles inside the kernels, never in memory) or "chunked"
#: (cuBLAS GEMMs of ``cols`` vocabulary columns at a time into an fp32 chunk; see the module docstring). The
#: environment variable FDPG_LINEAR_IMPL sets it at import.
IMPL = os.environ.get("FDPG_LINEAR_IMPL", "fused")
#: The "chunked" implementation keeps its ``[N, cols]`` float32 chunk at most this large (L2-sized).
CHUNK_L2_BYTES = 32 * 2**20
#: Tests set a float (e.g. NaN) to fill every buffer the kernels allocate, so an unwritten element shows.
POISON: float | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _alloc(shape, dtype, device, zero: bool = False) -> torch.Tensor:
    if POISON is not None:   # integers (tile flags) get -1: an unwritten flag reads as "tile kept"
        return torch.full(shape, POISON if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device) if zero else torch.empty(shape, dtype=dtype, device=device)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Operand dtype of the logits matmul: the inputs' common half dtype, else fp32 (always fp32 when interpreting)."""
    d0 = dtypes[0]
    if _interpreting() or any(d != d0 for d in dtypes) or d0 not in (torch.bfloat16, torch.float16):
        return torch.float32
    return d0


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def config(N: int, V: int, D: int, dot_dtype: torch.dtype, device: torch.device, mm_bytes: int = 2) -> dict:
    """Launch parameters from a small heuristic (overridden key by key by :data:`CONFIG_OVERRIDE`).

    GPU: 128 x 128 logit tiles, a K step of 64 (32 for fp32 operands), 8 warps; enough vocabulary splits that the
    forward grid fills the device twice over with square-ish groups of concurrent tiles (L2 reuse). Interpreter:
    the fewest, largest blocks (each program costs Python time there).
    """
    if _interpreting() or device.type != "cuda":
        cfg = dict(BLOCK_N=_pow2(N, 16, 64), BLOCK_V=_pow2(V, 16, 64), BLOCK_D=_pow2(D, 16, 64),
                   num_warps=4, num_stages=1)
    else:
        half = dot_dtype != torch.float32
        cfg = dict(BLOCK_N=_pow2(N, 16, 128), BLOCK_V=128, BLOCK_D=64 if half else 32,
                   num_warps=8 if N > 64 else 4, num_stages=3)
    cfg.update({k: v for k, v in CONFIG_OVERRIDE.items() if k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps",
                                                                  "num_stages")})
    n_rb, n_vt = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"])
    if "splits" in CONFIG_OVERRIDE:
        splits = int(CONFIG_OVERRIDE["splits"])
    elif _interpreting() or device.type != "cuda":
        splits = 1
    else:
        splits = max(16, triton.cdiv(2 * _sm_count(device), n_rb))
    splits = max(1, min(splits, n_vt))
    # every split gets >= 1 tile: ceil-divide the tiles, then drop splits left empty
    cfg["tiles_per_split"] = triton.cdiv(n_vt, splits)
    cfg["splits"] = triton.cdiv(n_vt, cfg["tiles_per_split"])
    if "chunk" in CONFIG_OVERRIDE:
        chunk = int(CONFIG_OVERRIDE["chunk"])
    else:
        chunk = CHUNK_BYTES // max(1, N * mm_bytes)
    bv = cfg["BLOCK_V"]
    cfg["chunk"] = min(max(bv, chunk // bv * bv), n_vt * bv)   # a multiple of BLOCK_V, at most V rounded up
    cfg["impl"] = CONFIG_OVERRIDE.get("impl", IMPL)
    if cfg["impl"] not in ("fused", "chunked"):
        raise ValueError(f"fdpg.kernels.linear impl: expected 'fused' or 'chunked', got {cfg['impl']!r}")
    # the chunked GEMMs' width: the widest power of two (256..4096) whose [N, cols] fp32 chunk fits CHUNK_L2_BYTES
    if "cols" in CONFIG_OVERRIDE:
        cols = int(CONFIG_OVERRIDE["cols"])
    else:
        fit = CHUNK_L2_BYTES // max(1, 4 * N)
        cols = max(256, min(4096, 1 << max(0, fit.bit_length() - 1)))
    cfg["cols"] = max(1, min(cols, V))
    # the chunked epilogues' tiles: few rows, wide columns ([16, 256]: 32 fp32 values a thread at 4 warps, 135-153
    # registers on sm_90, no spills; [32, 256] spilled)
    small = _interpreting() or device.type != "cuda"
    cfg["CBLOCK_N"], cfg["CBLOCK_V"] = (cfg["BLOCK_N"], cfg["BLOCK_V"]) if small else (16, 256)
    cfg.update({k: v for k, v in CONFIG_OVERRIDE.items() if k in ("CBLOCK_N", "CBLOCK_V")})
    return cfg


# ---- forward -------------------------------------------------------------------------------------------------

@triton.jit
def _logits_tile(H, W, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``h[rows] @ W[cols]^T`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile (masked rows/cols read as 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_D)
    h_ptrs = H + rows[:, None] * stride_hn + ks[None, :] * stride_hd
    w_ptrs = W + cols[:, None] * stride_wv + ks[None, :] * stride_wd
    for k in range(0, D, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k + ks) < D
            h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h.to(DOT), tl.trans(w.to(DOT)), acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    return acc


@triton.jit
def _lse_update(m, s, z):
    """A tile of logits ``z [BLOCK_N, BLOCK_V]`` into the rows' online max ``m`` and sum ``s`` (relative to ``m``)."""
    m_new = tl.maximum(m, tl.max(z, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # finite while the row is all -inf so far (a bias)
    return m_new, s * tl.exp(m - m_use) + tl.sum(tl.exp(z - m_use[:, None]), 1)


@triton.jit
def _fwd_kernel(H, W, B, Y, LP, LSE, MX, PM, PS, PZ,
                N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, inv_tau, tiles_per_split,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    # split index fastest: concurrent programs form a (rows x splits) group that shares h and W tiles in L2
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    y = tl.load(Y + rows, mask=row_ok, other=-1).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t0, t1):
        cols = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        acc = _logits_tile(H, W, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                           BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT, PRECISION)
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_tau, float("-inf"))
        m, s = _lse_update(m, s, z)
        zt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
    if SPLIT:
        out = pid_s * N + rows
        tl.store(PM + out, m, mask=row_ok)
        tl.store(PS + out, s, mask=row_ok)
        tl.store(PZ + out, zt, mask=row_ok)
    else:
        lse = m + tl.log(s)
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(LP + rows, zt - lse, mask=row_ok)
        tl.store(MX + rows, m, mask=row_ok)


@triton.jit
def _chunk_fwd_kernel(Z, B, Y, M, S, ZT, N, cv, v0, stride_zn, inv_tau,
                      HAS_BIAS: tl.constexpr, FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Fold the logits ``Z [N, cv]`` (float32, vocabulary columns ``v0 .. v0 + cv``) into each row's running max
    ``M``, sum of exponentials ``S`` (relative to ``M``) and target logit ``ZT`` ("chunked" implementation)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    y = (tl.load(Y + rows, mask=row_ok, other=-1) - v0).to(tl.int32)      # int32 compares: registers
    zrow = Z + rows * stride_zn
    if FIRST:
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        m = tl.load(M + rows, mask=row_ok, other=0.0)
        s = tl.load(S + rows, mask=row_ok, other=0.0)
        zt = tl.load(ZT + rows, mask=row_ok, other=0.0)
    for c in range(0, cv, BLOCK_V):
        lcols = c + tl.arange(0, BLOCK_V)
        ok = lcols < cv
        z = tl.load(zrow[:, None] + lcols[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0)
        if HAS_BIAS:
            z += tl.load(B + v0 + lcols, mask=ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(ok[None, :], z * inv_tau, float("-inf"))
        m, s = _lse_update(m, s, z)
        zt += tl.sum(tl.where((lcols[None, :] == y[:, None]) & ok[None, :], z, 0.0), 1)   # (a later chunk's y)
    tl.store(M + rows, m, mask=row_ok)
    tl.store(S + rows, s, mask=row_ok)
    tl.store(ZT + rows, zt, mask=row_ok)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32 with float32 accumulation (``a [N, d]``, ``b [d, C]``, one dtype): cuBLAS with an fp32
    output for half inputs where torch offers it, else the product of the upcast operands (exact, slower)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.device.type == "cuda" and not _MM_FALLBACK.get("mm_dtype"):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_FALLBACK["mm_dtype"] = True
    return torch.mm(a.float(), b.float())


def _mm_operands(hidden: torch.Tensor, weight: torch.Tensor):
    """hidden and weight in one matmul dtype (theirs when they agree, else float32)."""
    dt = hidden.dtype if hidden.dtype == weight.dtype else torch.float32
    return hidden.to(dt), weight.to(dt)


def _fwd_chunked(hidden, weight, bias, targets, temperature, cfg, lp, lse, m):
    """:func:`linear_logprobs_fwd` into ``lp, lse, m`` (``[N]`` float32 each; ``m`` is the running max) by cuBLAS
    GEMMs of ``cfg["cols"]`` columns and :func:`_chunk_fwd_kernel`."""
    N, V = hidden.shape[0], weight.shape[0]
    s, zt = (_alloc((N,), torch.float32, hidden.device) for _ in range(2))
    hm, wm = _mm_operands(hidden, weight)
    C, BN = cfg["cols"], cfg["CBLOCK_N"]
    for v0 in range(0, V, C):
        cv = min(C, V - v0)
        z = _mm_f32(hm, wm[v0:v0 + cv].t())
        _chunk_fwd_kernel[(triton.cdiv(N, BN),)](
            z, bias if bias is not None else z, targets, m, s, zt, N, cv, v0, z.stride(0), 1.0 / temperature,
            HAS_BIAS=bias is not None, FIRST=v0 == 0, BLOCK_N=BN, BLOCK_V=cfg["CBLOCK_V"], num_warps=4,
            num_stages=1)
    torch.add(m, torch.log(s), out=lse)
    torch.sub(zt, lse, out=lp)


def _combine(pm: torch.Tensor, ps: torch.Tensor, pz: torch.Tensor):
    """Merge per-split partials ``[S, N]`` into ``(lp, lse, max)``; every split holds >= 1 real column."""
    mx = pm.amax(0)
    mu = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)   # (a split may be all -inf: a bias)
    lse = mx + torch.log((ps * torch.exp(pm - mu)).sum(0))
    return pz.sum(0) - lse, lse, mx


def _dot_args(*dtypes: torch.dtype):
    dot = _dot_dtype(*dtypes)
    return dot, _TL[dot], ("ieee" if dot == torch.float32 else "tf32")


def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lp, lse, max)``, each ``[N]`` float32, of ``x = (hidden @ weight.T + bias) / temperature``.

    hidden ``[N, d]`` and weight ``[V, d]`` (fp32/bf16/fp16, any strides), bias ``[V]`` or None, targets ``[N]``
    integer ids in ``[0, V)`` (not checked here). ``lp = log_softmax(x)[targets]``, ``lse = logsumexp(x)``,
    ``max = max(x)`` over the vocabulary.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    lp, lse, mx = (_alloc((N,), torch.float32, dev) for _ in range(3))
    if N == 0:
        return lp, lse, mx
    dot, DOT, prec = _dot_args(hidden.dtype, weight.dtype)
    cfg = config(N, V, D, dot, dev)
    S = cfg["splits"]
    targets = targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if cfg["impl"] == "chunked":
        _fwd_chunked(hidden, weight, bias, targets, temperature, cfg, lp, lse, mx)
        return lp, lse, mx
    if S > 1:
        pm, ps, pz = (_alloc((S, N), torch.float32, dev) for _ in range(3))
    else:
        pm = ps = pz = lp
    grid = (S, triton.cdiv(N, cfg["BLOCK_N"]))
    _fwd_kernel[grid](
        hidden, weight, bias if bias is not None else lp, targets, lp, lse, mx, pm, ps, pz,
        N, V, D, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, cfg["tiles_per_split"],
        HAS_BIAS=bias is not None, SPLIT=S > 1, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
        BLOCK_D=cfg["BLOCK_D"], EVEN_D=D % cfg["BLOCK_D"] == 0, DOT=DOT, PRECISION=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if S > 1:
        for out, val in zip((lp, lse, mx), _combine(pm, ps, pz)):
            out.copy_(val)
    return lp, lse, mx


# ---- backward ------------------------------------------------------------------------------------------------

@triton.jit
def _logits_grad(z, ok, is_t, rows, row_ok, LSE, GLP, GLSE, inv_tau, HAS_GLSE: tl.constexpr):
    """``(g, p, live)`` of a tile of logits ``z`` (before ``1/tau``) of rows ``rows``: ``p = softmax`` from the rows'
    saved lse (0 where not ``ok``), ``g = (g_lp [is_t] + (g_lse - g_lp) p) / tau`` (the gradient of the logits),
    ``live`` the rows whose upstream gradient is not 0 (the fast mode's filter)."""
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    p = tl.where(ok, tl.exp(z * inv_tau - lse[:, None]), 0.0)
    glp = tl.load(GLP + rows, mask=row_ok, other=0.0)
    coef = -glp
    live = glp != 0
    if HAS_GLSE:
        glse = tl.load(GLSE + rows, mask=row_ok, other=0.0)
        coef += glse
        live = live | (glse != 0)
    return (tl.where(is_t, glp[:, None], 0.0) + coef[:, None] * p) * inv_tau, p, live


@triton.jit
def _grad_logits_kernel(H, W, B, Y, LSE, GLP, GLSE, G, FLAG, DBP,
                        N, V, D, v0, cv, stride_hn, stride_hd, stride_wv, stride_wd, stride_gn, stride_db,
                        inv_tau, eps,
                        HAS_BIAS: tl.constexpr, HAS_GLSE: tl.constexpr, FILTER: tl.constexpr,
                        WRITE_DBIAS: tl.constexpr, GROUP_N: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                        DOT: tl.constexpr, PRECISION: tl.constexpr):
    # grouped order (GROUP_N row blocks at a time) so that concurrent tiles share h and W in L2
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BLOCK_N)
    n_vt = tl.cdiv(cv, BLOCK_V)
    per_group = GROUP_N * n_vt
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_rb - first, GROUP_N)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size

    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    lcols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = v0 + lcols
    col_ok = (lcols < cv) & (cols < V)
    acc = _logits_tile(H, W, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                       BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT, PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    y = tl.load(Y + rows, mask=row_ok, other=-1).to(tl.int64)
    is_t = cols[None, :] == y[:, None]
    g, p, live = _logits_grad(acc, ok, is_t, rows, row_ok, LSE, GLP, GLSE, inv_tau, HAS_GLSE)
    if WRITE_DBIAS:
        tl.store(DBP + pid_n * stride_db + lcols, tl.sum(g, 0), mask=lcols < cv)
    g_ptrs = G + rows[:, None] * stride_gn + lcols[None, :]
    if FILTER:
        big = tl.where(live[:, None] & ok, tl.where(is_t, 1.0, p), 0.0)
        keep = tl.max(tl.max(big, 1), 0) >= eps
        tl.store(FLAG + pid_n * n_vt + pid_v, keep.to(tl.int32))
        cv_kept = keep.to(tl.int32) * cv       # 0 when the tile is skipped: nothing stored
        tl.store(g_ptrs, g.to(G.dtype.element_ty), mask=row_ok[:, None] & (lcols < cv_kept)[None, :])
    else:
        tl.store(g_ptrs, g.to(G.dtype.element_ty), mask=row_ok[:, None] & (lcols < cv)[None, :])


@triton.jit
def _chunk_grad_kernel(Z, B, Y, LSE, GLP, GLSE, G, DBP, N, cs, v0, g0, stride_zn, stride_gn, stride_db, inv_tau,
                       HAS_BIAS: tl.constexpr, HAS_GLSE: tl.constexpr, WRITE_DBIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """``G[:, g0 + j] = (g_lp [v0 + j == y] + (g_lse - g_lp) softmax_j) / tau`` for ``j < cs`` from the recomputed
    logits ``Z [N, cs]`` (float32, cuBLAS; "chunked" implementation, exact mode), and the tile's column sums
    (``grad_bias`` partials) at ``DBP[row block, g0 + j]``."""
    pid_n = tl.program_id(0)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    lcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)                # int32: registers
    col_ok = lcols < cs
    ok = row_ok[:, None] & col_ok[None, :]
    z = tl.load((Z + rows * stride_zn)[:, None] + lcols[None, :], mask=ok, other=0.0)
    if HAS_BIAS:
        z += tl.load(B + v0 + lcols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = (tl.load(Y + rows, mask=row_ok, other=-1) - v0).to(tl.int32)
    g, _, _ = _logits_grad(z, ok, lcols[None, :] == y[:, None], rows, row_ok, LSE, GLP, GLSE, inv_tau, HAS_GLSE)
    if WRITE_DBIAS:
        tl.store(DBP + pid_n * stride_db + g0 + lcols, tl.sum(g, 0), mask=col_ok)
    tl.store((G + rows * stride_gn + g0)[:, None] + lcols[None, :], g.to(G.dtype.element_ty), mask=ok)


@triton.jit
def _dh_kernel(G, W, FLAG, GH, N, D, v0, cv, stride_gn, stride_wv, stride_wd, stride_ghn,
               ACCUM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``GH[rows, ds] (+)= sum over flagged tiles j of G[rows, tile j] @ W[v0 + tile j, ds]`` (fp32 GH)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    n_vt = tl.cdiv(cv, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in range(0, n_vt):
        if tl.load(FLAG + pid_n * n_vt + j) != 0:
            lcols = (j * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            c_ok = lcols < cv
            g = tl.load(G + rows[:, None] * stride_gn + lcols[None, :], mask=row_ok[:, None] & c_ok[None, :],
                        other=0.0)
            w = tl.load(W + (v0 + lcols)[:, None] * stride_wv + ds[None, :] * stride_wd,
                        mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(g.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    ptrs = GH + rows[:, None] * stride_ghn + ds[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    if ACCUM:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def _dw_kernel(G, H, FLAG, GW, N, D, cv, stride_gn, stride_hn, stride_hd, stride_gwv,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``GW[tile, ds] = sum over flagged row blocks i of G[block i, tile]^T @ H[block i, ds]`` (GW: this chunk)."""
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    lcols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    c_ok = lcols < cv
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    n_vt = tl.cdiv(cv, BLOCK_V)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for i in range(0, tl.cdiv(N, BLOCK_N)):
        if tl.load(FLAG + i * n_vt + pid_v) != 0:
            rows = (i * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            r_ok = rows < N
            gt = tl.load(G + rows[None, :] * stride_gn + lcols[:, None], mask=c_ok[:, None] & r_ok[None, :],
                         other=0.0)
            h = tl.load(H + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                        mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(gt.to(DOT), h.to(DOT), acc, input_precision=PRECISION)
    tl.store(GW + lcols[:, None] * stride_gwv + ds[None, :], acc.to(GW.dtype.element_ty),
             mask=c_ok[:, None] & d_ok[None, :])


_MM_FALLBACK: dict = {}


def _acc_mm(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc32 += a @ b`` with fp32 accumulation: cuBLAS with an fp32 output where torch offers it."""
    if a.dtype == torch.float32:
        acc32.addmm_(a, b)
        return
    if a.device.type == "cuda" and not _MM_FALLBACK.get("addmm_dtype"):
        try:
            torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_FALLBACK["addmm_dtype"] = True
    if a.device.type == "cuda":
        acc32 += torch.mm(a, b)            # one rounding of this chunk's partial to the half dtype
    else:
        acc32.addmm_(a.float(), b.float())


def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, lse: torch.Tensor, grad_lp: torch.Tensor,
                        grad_lse: torch.Tensor | None, temperature: float, need_hidden: bool, need_weight: bool,
                        need_bias: bool, filter_eps: float = 0.0):
    """Gradients of ``sum(grad_lp * lp + grad_lse * lse)`` with respect to hidden, weight and bias.

    Returns ``(grad_hidden [N, d] in hidden.dtype, grad_weight [V, d] in weight.dtype, grad_bias [V] in
    bias.dtype)``; an entry not asked for is None. ``filter_eps > 0`` is the fast mode: backward matmul work of
    ``[BLOCK_N, BLOCK_V]`` tiles where every softmax entry is below ``filter_eps`` (and no target falls) is skipped.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_bias = need_bias and bias is not None
    gh = gw = gb = None
    if N == 0:
        return (torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    mm_dtype = hidden.dtype if hidden.dtype == weight.dtype else torch.float32
    dot, DOT, prec = _dot_args(hidden.dtype, weight.dtype)
    fast = filter_eps > 0
    cfg = config(N, V, D, dot, dev, torch.finfo(mm_dtype).bits // 8)
    BN, BV, BD = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"]
    chunk = cfg["chunk"]
    n_chunks = triton.cdiv(V, chunk)
    n_rb = triton.cdiv(N, BN)
    targets = targets.contiguous()
    lse = lse.contiguous()
    grad_lp = grad_lp.to(torch.float32).contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    bias_c = bias.contiguous() if bias is not None else None
    hm, wm = _mm_operands(hidden, weight)

    chunked = cfg["impl"] == "chunked" and not fast          # the fast mode's filter lives in the fused kernel
    CBN, CBV = cfg["CBLOCK_N"], cfg["CBLOCK_V"]
    G = _alloc((N, chunk), mm_dtype, dev)
    flags = _alloc((n_rb * triton.cdiv(chunk, BV),), torch.int32, dev) if fast else G
    dbp = _alloc((triton.cdiv(N, CBN) if chunked else n_rb, chunk), torch.float32, dev) if need_bias else G
    direct_h = need_hidden and n_chunks == 1 and not fast and hidden.dtype == mm_dtype
    gh32 = _alloc((N, D), torch.float32, dev) if need_hidden and not direct_h else None
    if need_weight:
        gw = _alloc((V, D), weight.dtype, dev)
    if need_bias:
        gb = _alloc((V,), torch.float32, dev)

    for c, v0 in enumerate(range(0, V, chunk)):
        cv = min(chunk, V - v0)
        n_vt = triton.cdiv(cv, BV)
        for s0 in range(0, cv, cfg["cols"]) if chunked else ():
            cs = min(cfg["cols"], cv - s0)
            z = _mm_f32(hm, wm[v0 + s0:v0 + s0 + cs].t())
            _chunk_grad_kernel[(triton.cdiv(N, CBN), triton.cdiv(cs, CBV))](
                z, bias_c if bias_c is not None else lse, targets, lse, grad_lp,
                grad_lse if grad_lse is not None else grad_lp, G, dbp, N, cs, v0 + s0, s0, z.stride(0), G.stride(0),
                chunk, 1.0 / temperature, HAS_BIAS=bias is not None, HAS_GLSE=grad_lse is not None,
                WRITE_DBIAS=need_bias, BLOCK_N=CBN, BLOCK_V=CBV, num_warps=4, num_stages=1)
        if not chunked:
            _grad_logits_kernel[(n_rb * n_vt,)](
                hidden, weight, bias_c if bias_c is not None else lse, targets, lse, grad_lp,
                grad_lse if grad_lse is not None else grad_lp, G, flags, dbp,
                N, V, D, v0, cv, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                G.stride(0), chunk, 1.0 / temperature, float(filter_eps),
                HAS_BIAS=bias is not None, HAS_GLSE=grad_lse is not None, FILTER=fast, WRITE_DBIAS=need_bias,
                GROUP_N=8, BLOCK_N=BN, BLOCK_V=BV, BLOCK_D=BD, EVEN_D=D % BD == 0, DOT=DOT, PRECISION=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if need_bias:
            gb[v0:v0 + cv] = dbp[:, :cv].sum(0)
        Gc = G[:, :cv]
        if fast:
            if need_hidden:
                _dh_kernel[(n_rb, triton.cdiv(D, BD))](
                    G, weight, flags, gh32, N, D, v0, cv, G.stride(0), weight.stride(0), weight.stride(1),
                    gh32.stride(0), ACCUM=c > 0, BLOCK_N=BN, BLOCK_V=BV, BLOCK_D=BD, DOT=DOT, PRECISION=prec,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            if need_weight:
                gwc = gw[v0:v0 + cv]
                _dw_kernel[(n_vt, triton.cdiv(D, BD))](
                    G, hidden, flags, gwc, N, D, cv, G.stride(0), hidden.stride(0), hidden.stride(1),
                    gwc.stride(0), BLOCK_N=BN, BLOCK_V=BV, BLOCK_D=BD, DOT=DOT, PRECISION=prec,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        else:
            if need_weight:
                if gw.dtype == mm_dtype:
                    torch.mm(Gc.t(), hm, out=gw[v0:v0 + cv])
                else:
                    gw[v0:v0 + cv] = torch.mm(Gc.t(), hm).to(gw.dtype)
            if need_hidden:
                wc = wm[v0:v0 + cv]
                if direct_h:
                    gh = torch.mm(Gc, wc)
                elif c == 0 and mm_dtype == torch.float32:
                    torch.mm(Gc, wc, out=gh32)
                else:
                    if c == 0:
                        gh32.zero_()
                    _acc_mm(gh32, Gc, wc)
    if gh32 is not None:
        gh = gh32.to(hidden.dtype)
    if gb is not None:
        gb = gb.to(bias.dtype)
    return gh, gw, gb
