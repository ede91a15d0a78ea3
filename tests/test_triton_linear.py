"""Triton backend of the fused output layer (fdpg.kernels.linear) against float64 references.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), with fp32 dot operands; the bf16 dot path is
checked by the GPU-only test at the end.
"""
import math

import pytest
import torch

from fdpg.ops import linear as L

K = pytest.importorskip("fdpg.kernels.linear")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (int flags as -1): an unwritten element fails a test."""
    monkeypatch.setattr(K, "POISON", float("nan"))
    monkeypatch.setattr(K, "CONFIG_OVERRIDE", {})


def ref64(h, w, b, y, tau):
    """float64 ``(lp, lse, max, p)`` of ``x = (h @ w.T + b) / tau``; differentiable in its float64 inputs."""
    z = h.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    x = z / tau
    lse = torch.logsumexp(x, -1)
    return x.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse, lse, x.amax(-1), torch.softmax(x, -1)


def make(gen, N, V, d, dtype, bias, scale=3.0, device=DEV):
    h = torch.randn(N, d, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(V, d, generator=gen) * scale / math.sqrt(d)).to(device=device, dtype=dtype)
    b = torch.randn(V, generator=gen).to(device=device, dtype=dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    return h, w, b, y


def grads64(h, w, b, y, tau, g_lp, g_lse):
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    lp, lse, _, _ = ref64(leaves[0], leaves[1], leaves[2] if b is not None else None, y, tau)
    out = (lp * g_lp.double()).sum() + (lse * g_lse.double()).sum()
    return torch.autograd.grad(out, leaves)


def close(got, want, tol, what):
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


# (N, V, d, dtype, bias, tau, launch overrides): V and d not multiples of the blocks, several vocabulary tiles per
# split, several splits, several backward chunks, one-row and one-column cases.
CASES = [
    (7, 37, 24, torch.float32, True, 0.7, dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, splits=2, chunk=16)),
    (12, 300, 40, torch.bfloat16, False, 1.0, dict(BLOCK_V=64, splits=3, chunk=128)),
    (5, 37, 8, torch.float16, True, 1.3, {}),
    (1, 1, 8, torch.float32, True, 1.0, {}),
    (1, 300, 24, torch.bfloat16, True, 0.5, dict(BLOCK_V=32, splits=4)),
    (33, 300, 40, torch.float32, False, 2.0, dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, splits=2, chunk=192)),
    (20, 37, 40, torch.float16, False, 0.9, dict(BLOCK_N=16, BLOCK_V=16, chunk=32)),
]


# the "chunked" implementation (cuBLAS GEMMs into fp32 chunks of `cols` columns; here torch's CPU matmul): several
# chunks, a backward chunk of several GEMM chunks, a last chunk narrower than the rest, one column
CHUNKED = [dict(impl="chunked", cols=16, BLOCK_N=16, BLOCK_V=16, chunk=48), dict(impl="chunked", cols=64),
           dict(impl="chunked", cols=7, BLOCK_V=16, chunk=32), dict(impl="chunked"), dict(impl="chunked", cols=1)]


@pytest.mark.parametrize("N,V,d,dtype,bias,tau,cfg", CASES + [c[:6] + (k,) for c, k in zip(CASES, CHUNKED)])
def test_forward_and_gradients(N, V, d, dtype, bias, tau, cfg, gen, monkeypatch):
    monkeypatch.setattr(K, "CONFIG_OVERRIDE", cfg)
    h, w, b, y = make(gen, N, V, d, dtype, bias)
    params = [t.requires_grad_(True) for t in (h, w) + ((b,) if bias else ())]
    out = L.linear_token_logprobs(h, w, y, bias=b, temperature=tau, backend="triton", return_lse=True)
    lp64, lse64, max64, _ = ref64(h, w, b, y, tau)
    assert all(t.dtype == torch.float32 and t.shape == (N,) for t in out)
    close(out.lp, lp64, 2e-6, "lp")
    close(out.lse, lse64, 2e-6, "lse")
    close(out.max, max64, 2e-6, "max")
    assert not out.max.requires_grad
    g_lp = torch.randn(N, generator=gen).to(DEV)
    g_lse = torch.randn(N, generator=gen).to(DEV)
    got = torch.autograd.grad((out.lp * g_lp).sum() + (out.lse * g_lse).sum(), params)
    want = grads64(h, w, b, y, tau, g_lp, g_lse)
    # half inputs: the grad of the logits is rounded to the half dtype for the backward matmuls (as any half matmul)
    tol = 2e-6 if dtype == torch.float32 else (2e-2 if dtype == torch.bfloat16 else 4e-3)
    for name, g1, g2, p in zip(("grad_hidden", "grad_weight", "grad_bias"), got, want, params):
        assert g1.dtype == dtype and g1.shape == p.shape
        close(g1, g2, tol, name)


def test_lp_only_and_lse_only_gradients(gen):
    h, w, b, y = make(gen, 6, 37, 24, torch.float32, True)
    h.requires_grad_(True)
    lp = L.linear_token_logprobs(h, w, y, bias=b, backend="triton")
    (gh,) = torch.autograd.grad(lp.sum(), [h])
    close(gh, grads64(h, w, b, y, 1.0, torch.ones(6), torch.zeros(6))[0], 2e-6, "grad_hidden from lp")
    lse = L.linear_token_logprobs(h, w, y, bias=b, backend="triton", return_lse=True).lse
    (gh,) = torch.autograd.grad(lse.sum(), [h])
    close(gh, grads64(h, w, b, y, 1.0, torch.zeros(6), torch.ones(6))[0], 2e-6, "grad_hidden from lse")


def test_strided_inputs_and_leading_dims(gen):
    """Non-contiguous hidden [B, T, d] (a strided view) and a transposed weight are read through their strides."""
    big = torch.randn(2, 5, 2 * 24, generator=gen)
    h = big[..., ::2].requires_grad_(False)
    assert not h.is_contiguous()
    h = h.detach().requires_grad_(True)
    wt = (torch.randn(24, 37, generator=gen) / 3).requires_grad_(True)
    w = wt.t()
    y = torch.randint(0, 37, (2, 5), generator=gen)
    lp = L.linear_token_logprobs(h, w, y, temperature=0.8, backend="triton")
    assert lp.shape == (2, 5)
    lp64 = ref64(h.reshape(-1, 24), w, None, y.reshape(-1), 0.8)[0].reshape(2, 5)
    close(lp, lp64, 2e-6, "lp")
    g = torch.randn(2, 5, generator=gen)
    gh, gw = torch.autograd.grad((lp * g).sum(), [h, wt])
    want = grads64(h.reshape(-1, 24), w, None, y.reshape(-1), 0.8, g.reshape(-1), torch.zeros(10))
    close(gh.reshape(-1, 24), want[0], 2e-6, "grad_hidden")
    close(gw.t(), want[1], 2e-6, "grad_weight")


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_paired(gen, monkeypatch, impl):
    monkeypatch.setattr(K, "CONFIG_OVERRIDE", dict(BLOCK_V=32, splits=2, chunk=64, impl=impl, cols=48))
    h, w, b, y = make(gen, 9, 100, 24, torch.float32, True)
    h2, w2, b2, _ = make(gen, 9, 100, 40, torch.bfloat16, True)
    h.requires_grad_(True)
    w.requires_grad_(True)
    w2.requires_grad_(True)
    out = L.paired_linear_token_logprobs(h, w, h2, w2, y, policy_bias=b, prior_bias=b2, temperature=0.9,
                                         backend="triton", return_lse=True)
    assert out.policy_lp.requires_grad and out.policy_lse.requires_grad
    assert not any(t.requires_grad for t in (out.prior_lp, out.prior_lse, out.prior_max, out.policy_max))
    for got, want in zip((out.policy_lp, out.policy_lse, out.policy_max), ref64(h, w, b, y, 0.9)):
        close(got, want, 2e-6, "policy")
    for got, want in zip((out.prior_lp, out.prior_lse, out.prior_max), ref64(h2, w2, b2, y, 0.9)):
        close(got, want, 2e-6, "prior")
    lp, plp = L.paired_linear_token_logprobs(h, w, h2, w2, y, policy_bias=b, prior_bias=b2, temperature=0.9,
                                             backend="triton")
    close(plp, out.prior_lp.double(), 0, "prior_lp without return_lse")
    lp.sum().backward()
    assert w2.grad is None and h.grad is not None
    close(h.grad, grads64(h, w, b, y, 0.9, torch.ones(9), torch.zeros(9))[0], 2e-6, "policy grad_hidden")


def test_fast_mode_within_stated_bound(gen, monkeypatch):
    """Fast mode skips exactly the tiles whose softmax entries are all below eps (no target, or no live row), and
    its error stays within the bound stated in fdpg.ops.linear."""
    B = 16
    monkeypatch.setattr(K, "CONFIG_OVERRIDE", dict(BLOCK_N=B, BLOCK_V=B, BLOCK_D=B, chunk=4 * B))
    N, V, d, tau, eps = 32, 320, 24, 0.8, 1e-3
    h, w, b, y = make(gen, N, V, d, torch.float32, True, scale=10.0)
    top = ref64(h, w, b, y, tau)[3].argmax(-1)
    y = torch.where(torch.arange(N) % 4 == 0, y, top)   # mostly the likely tokens, as when sampling the model
    params = [t.requires_grad_(True) for t in (h, w, b)]
    g_lp = torch.randn(N, generator=gen)
    g_lp[::3] = 0.0                                     # masked positions: their tiles may be skipped exactly
    g_lse = 0.3 * torch.randn(N, generator=gen)
    g_lse[::3] = 0.0

    def grads(fast):
        o = L.linear_token_logprobs(h, w, y, bias=b, temperature=tau, backend="triton", return_lse=True,
                                    fast=fast, filter_eps=eps)
        return o, torch.autograd.grad((o.lp * g_lp).sum() + (o.lse * g_lse).sum(), params)

    (o_fast, fast), (o_exact, exact) = grads(True), grads(False)
    want = grads64(h, w, b, y, tau, g_lp, g_lse)
    close(o_fast.lp, o_exact.lp.double(), 0, "fast lp")          # the forward is the same
    close(exact[0], want[0], 1e-5, "exact grad_hidden")   # fp32 with logits up to ~50
    close(fast[2], want[2], 1e-5, "fast grad_bias (never filtered)")

    # the tiles fast mode must keep, from the float64 softmax; the float64 gradient with the others dropped
    _, _, _, p = ref64(h, w, b, y, tau)
    is_t = torch.arange(V)[None, :] == y[:, None]
    live = ((g_lp != 0) | (g_lse != 0))[:, None]
    big = (live & ((p >= eps) | is_t)).double()
    keep = torch.nn.functional.max_pool2d(big[None, None], B, ceil_mode=True)[0, 0] > 0
    assert 0.1 < keep.double().mean() < 0.9, keep.double().mean()           # both kinds of tiles occur
    gz = (g_lp.double()[:, None] * is_t + (g_lse - g_lp).double()[:, None] * p) / tau
    gz = gz * keep.repeat_interleave(B, 0).repeat_interleave(B, 1)[:N, :V]
    close(fast[0], gz @ w.detach().double(), 1e-5, "fast grad_hidden against the tile-filtered float64 gradient")
    close(fast[1], gz.t() @ h.detach().double(), 1e-5, "fast grad_weight against the tile-filtered gradient")

    # the documented bound, from the float64 softmax
    small = (p < eps) & ~is_t                                   # every entry a skipped tile can hold
    c = (g_lp - g_lse).abs().double()[:, None] / tau
    bound_h = (c[:, 0] * (p * small).sum(1))[:, None] * w.detach().abs().max().double()
    bound_w = (c * p * small).t() @ h.detach().abs().amax(1, keepdim=True).double()
    for got, exp, bound in ((fast[0], want[0], bound_h), (fast[1], want[1], bound_w)):
        assert ((got.double() - exp).abs() <= bound + 1e-5 * exp.abs().max()).all()   # + fp32 rounding
    assert (fast[0] - exact[0]).abs().max() > 0


def test_float64_takes_the_torch_path(gen):
    h, w, b, y = make(gen, 4, 37, 8, torch.float64, True)
    lp = L.linear_token_logprobs(h, w, y, bias=b, backend="triton")
    assert lp.dtype == torch.float64
    close(lp, ref64(h, w, b, y, 1.0)[0], 1e-12, "lp")


def test_torch_backend_lse_and_max(gen):
    h, w, b, y = make(gen, 6, 37, 8, torch.float32, True)
    out = L.linear_token_logprobs(h, w, y, bias=b, temperature=0.6, backend="torch", return_lse=True, chunk_size=4)
    for got, want, name in zip(out, ref64(h, w, b, y, 0.6), ("lp", "lse", "max")):
        close(got, want, 2e-6, name)


@pytest.mark.parametrize("backend,cfg", [("triton", dict(BLOCK_V=16, splits=3)), ("triton", dict(impl="chunked", cols=16)),
                                         ("torch", {})])
def test_banned_tokens_fill_whole_tiles_and_the_target(backend, cfg, gen, monkeypatch):
    """A bias of -inf (banned tokens) over whole vocabulary tiles, a whole split, and at some targets: finite lse,
    lp = -inf exactly at the banned targets, finite gradients, against float64."""
    monkeypatch.setattr(K, "CONFIG_OVERRIDE", cfg)
    h, w, b, y = make(gen, 6, 100, 8, torch.float32, True)
    b[:40] = -math.inf                      # the first split (tiles of 16, 3 splits of 2-3 tiles)
    b[70:90] = -math.inf
    allowed = torch.cat([torch.arange(40, 70), torch.arange(90, 100)])
    y = torch.cat([torch.tensor([5, 75]), allowed[torch.randint(0, 40, (4,), generator=gen)]])   # 2 banned
    h.requires_grad_(True)
    out = L.linear_token_logprobs(h, w, y, bias=b, temperature=0.8, backend=backend, return_lse=True)
    lp, lse, mx, _ = ref64(h.detach(), w, b, y, 0.8)
    assert torch.equal(out.lp[:2], torch.full((2,), -math.inf)) and torch.isfinite(out.lp[2:]).all()
    for got, want, name in ((out.lp[2:], lp[2:], "lp"), (out.lse, lse, "lse"), (out.max, mx, "max")):
        close(got, want, 2e-6, name)
    (gh,) = torch.autograd.grad(out.lp[2:].sum() + out.lse.sum(), h)
    leaf = h.detach().double().requires_grad_(True)
    lp64, lse64, _, _ = ref64(leaf, w, b, y, 0.8)
    (want,) = torch.autograd.grad(lp64[2:].sum() + lse64.sum(), leaf)
    close(gh, want, 1e-5, "grad_hidden")


def test_torch_backend_mixed_float64_and_once_differentiable(gen):
    h, w, b, y = make(gen, 5, 37, 8, torch.float64, True)
    lp = L.linear_token_logprobs(h, w.float(), y, bias=b, backend="torch")     # float64 with float32: in float64
    assert lp.dtype == torch.float64
    close(lp, ref64(h, w.float(), b, y, 1.0)[0], 1e-12, "lp")
    x = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(L.linear_token_logprobs(x, w, y, backend="torch").sum(), x, create_graph=True)
    assert not g.requires_grad   # no silently wrong second derivative: backward is once differentiable


def test_unknown_implementation(gen, monkeypatch):
    h, w, b, y = make(gen, 4, 37, 8, torch.float32, False)
    monkeypatch.setattr(K, "CONFIG_OVERRIDE", dict(impl="cublas"))
    with pytest.raises(ValueError, match="impl"):
        L.linear_token_logprobs(h, w, y, backend="triton")


@pytest.mark.filterwarnings("ignore:invalid value encountered")   # numpy, on the NaN input
def test_bad_inputs(gen, monkeypatch):
    h, w, b, y = make(gen, 4, 37, 8, torch.float32, True)
    with pytest.raises(ValueError, match=r"filter_eps: expected a float in \(0, 1\)"):
        L.linear_token_logprobs(h, w, y, backend="triton", fast=True, filter_eps=1.5)
    with pytest.raises(ValueError, match=r"hidden/weight/bias .*holds NaN or \+inf"):
        L.linear_token_logprobs(h.clone().fill_(math.nan), w, y, backend="triton", validate=True)
    with pytest.raises(ValueError, match=r"targets: token ids must lie in \[0, 37\)"):
        L.linear_token_logprobs(h, w, torch.full_like(y, 37), backend="triton", validate=True)
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
            L.linear_token_logprobs(h, w, y, backend="triton")


def test_opcheck_and_compile(gen):
    h, w, b, y = make(gen, 5, 37, 24, torch.float32, True)
    torch.library.opcheck(torch.ops.fdpg.linear_logprobs_fwd.default, (h, w, b, y, 0.7))
    lp, lse, _ = torch.ops.fdpg.linear_logprobs_fwd(h, w, b, y, 0.7)
    g = torch.randn(5, generator=gen)
    torch.library.opcheck(torch.ops.fdpg.linear_logprobs_bwd.default,
                          (h, w, b, y, lse, g, None, 0.7, True, True, True, 0.0))
    torch.library.opcheck(torch.ops.fdpg.linear_logprobs_bwd.default,
                          (h, w, None, y, lse, g, g, 0.7, True, False, False, 1e-3),
                          test_utils=("test_schema", "test_faketensor"))

    def f(h, w, b, y):
        o = L.linear_token_logprobs(h, w, y, bias=b, temperature=0.7, backend="triton", return_lse=True)
        return (o.lp * 2 + o.lse).sum()

    h.requires_grad_(True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (gh_c,) = torch.autograd.grad(compiled(h, w, b, y), [h])
    (gh_e,) = torch.autograd.grad(f(h, w, b, y), [h])
    close(gh_c, gh_e.double(), 1e-6, "compiled grad_hidden")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dot_path_on_gpu(dtype, monkeypatch):
    """The real bf16/fp16 tl.dot path (not upcast), and the chunked one's cuBLAS GEMMs with an fp32 output:
    forward, both modes' gradients, several backward chunks."""
    gen = torch.Generator().manual_seed(7)
    N, V, d = 300, 1000, 200
    h, w, b, y = make(gen, N, V, d, dtype, True, device="cuda")
    params = [t.requires_grad_(True) for t in (h, w, b)]
    lp64, lse64, _, _ = ref64(h, w, b, y, 0.9)
    g_lp = torch.randn(N, generator=gen).cuda()
    want = grads64(h, w, b, y, 0.9, g_lp, torch.zeros(N, device="cuda"))
    for cfg in ({}, dict(chunk=256, splits=3), dict(impl="chunked"), dict(impl="chunked", chunk=256, cols=96)):
        monkeypatch.setattr(K, "CONFIG_OVERRIDE", cfg)
        for fast in (False, True):
            o = L.linear_token_logprobs(h, w, y, bias=b, temperature=0.9, return_lse=True, fast=fast)
            close(o.lp, lp64, 1e-4, "lp")
            close(o.lse, lse64, 1e-4, "lse")
            got = torch.autograd.grad((o.lp * g_lp).sum(), params)
            for name, g1, g2 in zip(("grad_hidden", "grad_weight", "grad_bias"), got, want):
                close(g1, g2, 2e-2, f"{name} fast={fast} cfg={cfg}")
