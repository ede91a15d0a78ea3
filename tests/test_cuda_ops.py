"""The CUDA C++ backend (csrc/, fdpg._cuda) against the float64 reference, on a GPU (skipped without one).

Covers bf16/fp16/fp32 logits (and mixed policy/prior dtypes), odd vocabulary sizes (1, 37, 1000, 50257, 128256),
rows that are not 16-byte aligned, -inf logits, temperature != 1, entropy and exact KL with their gradients, the
in-place backward, masked sequence sums (T = 1, fully masked rows), and the coefficient and estimate ops for every
built-in divergence and baseline. Outputs are allocated from a NaN-poisoned caching allocator, so an element the
kernel never writes fails the comparison.
"""
import math
import os

import pytest
import torch

import fdpg
from fdpg import _cuda, divergences, reference

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
VOCABS = [1, 37, 1000, 50257, 128256]
DIVS = ["forward_kl", "reverse_kl", "tv", "js", "hellinger", "chi2", "alpha:0.5", "alpha:-0.7", "alpha:2"]


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _cuda.available():
        import shutil

        if not _cuda._prebuilt() and shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
            pytest.skip(f"no prebuilt CUDA extension and no nvcc to build one: {_cuda.load_error()}")
        pytest.fail(f"fdpg's CUDA extension did not load on a machine with a GPU: {_cuda.load_error()}")


def poison(*likes):
    """Free NaN-filled blocks of the outputs' sizes, so that the op's outputs reuse them."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for shape, dtype in likes]
    del blocks


def rows_for(V: int) -> int:
    return 3 if V >= 50000 else (8 if V >= 1000 else 17)


def logits(n, V, dtype, gen, scale=3.0, offset=0.0):
    x = torch.randn(n, V, generator=gen, dtype=torch.float64) * scale + offset
    x += torch.randn(n, 1, generator=gen, dtype=torch.float64) * 10  # per-row shifts: large logits
    return x.to(dtype).to(DEVICE)


def targets_for(n, V, gen, policy=None):
    t = torch.randint(0, V, (n,), generator=gen)
    t[0] = V - 1
    if n > 1:
        t[1] = 0
    if policy is not None and n > 2:
        t[2] = int(policy[2].float().argmax())
    return t.to(DEVICE)


def ref_paired(policy, prior, targets, tau):
    """float64 ground truth: lp, lse, entropy of the policy; prior lp, lse; exact KL(pi || prior)."""
    z = policy.double() / tau
    lse = torch.logsumexp(z, -1)
    logp = z - lse[..., None]
    p = logp.exp()
    out = {"lp": logp.gather(-1, targets[..., None].long())[..., 0], "lse": lse,
           "H": -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1),
           "max": (policy.float() / tau).amax(-1)}
    if prior is not None:
        zq = prior.double() / tau
        lseq = torch.logsumexp(zq, -1)
        logq = zq - lseq[..., None]
        out["qlp"] = logq.gather(-1, targets[..., None].long())[..., 0]
        out["qlse"] = lseq
        out["qmax"] = (prior.float() / tau).amax(-1)
        out["kl"] = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    return out


def close(got, want, atol=1e-4, rtol=1e-5):
    assert got is not None
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


# ---- paired per-token log-probs: forward ---------------------------------------------------------------------

@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_forward_matches_float64_reference(V, dtype, tau, gen):
    n = rows_for(V)
    pol, pri = logits(n, V, dtype, gen), logits(n, V, dtype, gen, scale=2.0)
    t = targets_for(n, V, gen, pol)
    poison(*[((n,), torch.float32)] * 6)
    lp, lse, qlp, qlse, ent, kl = _cuda.paired_logprobs_fwd(pol, pri, t, tau, True, True)
    want = ref_paired(pol, pri, t, tau)
    close(lp, want["lp"])
    close(lse, want["lse"])
    close(qlp, want["qlp"])
    close(qlse, want["qlse"])
    close(ent, want["H"])
    close(kl, want["kl"])
    assert bool((lp <= 1e-5).all()), "a log-probability above 0"


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_without_prior_and_optional_outputs(with_entropy, dtype, gen):
    n, V = 9, 1003
    pol = logits(n, V, dtype, gen)
    t = targets_for(n, V, gen, pol)
    out = _cuda.paired_logprobs_fwd(pol, None, t, 1.3, with_entropy, False)
    assert out[2] is None and out[3] is None and out[5] is None
    assert (out[4] is not None) == with_entropy
    want = ref_paired(pol, None, t, 1.3)
    close(out[0], want["lp"])
    close(out[1], want["lse"])
    if with_entropy:
        close(out[4], want["H"])
    # the same numbers as the paired call
    paired = _cuda.paired_logprobs_fwd(pol, logits(n, V, dtype, gen), t, 1.3, with_entropy, False)
    assert torch.equal(paired[0], out[0]) and torch.equal(paired[1], out[1])


@pytest.mark.parametrize("pdt,qdt", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
def test_mixed_policy_and_prior_dtypes(pdt, qdt, gen):
    n, V = 6, 50257
    pol, pri = logits(n, V, pdt, gen), logits(n, V, qdt, gen)
    t = targets_for(n, V, gen, pol)
    out = _cuda.paired_logprobs_fwd(pol, pri, t, 0.9, True, True)
    want = ref_paired(pol, pri, t, 0.9)
    for got, key in zip(out, ("lp", "lse", "qlp", "qlse", "H", "kl")):
        close(got, want[key])


def offset_view(n, V, dtype, gen, offset):
    """[n, V] contiguous view whose first element sits `offset` elements into its buffer (not 16-byte aligned)."""
    src = logits(n, V, dtype, gen)
    buf = torch.empty(n * V + offset, dtype=dtype, device=DEVICE)
    view = buf[offset:].view(n, V)
    view.copy_(src)
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p_off,q_off", [(1, 1), (1, 0), (0, 3), (5, 2)])
@pytest.mark.parametrize("V", [37, 1000, 4099])
def test_rows_not_16_byte_aligned(dtype, p_off, q_off, V, gen):
    """Odd V puts every row at a different 16-byte phase; offset buffers shift the base pointers, and different
    offsets of policy and prior (no common alignment) take the element-at-a-time path."""
    n = 7
    pol, pri = offset_view(n, V, dtype, gen, p_off), offset_view(n, V, dtype, gen, q_off)
    assert pol.data_ptr() % 16 != 0 or pri.data_ptr() % 16 != 0
    t = targets_for(n, V, gen, pol)
    out = _cuda.paired_logprobs_fwd(pol, pri, t, 1.0, True, True)
    want = ref_paired(pol, pri, t, 1.0)
    for got, key in zip(out, ("lp", "lse", "qlp", "qlse", "H", "kl")):
        close(got, want[key])
    # backward, in place into the misaligned buffer, equals the reference gradient
    g = torch.randn(n, generator=gen, dtype=torch.float64).float().to(DEVICE)
    want_grad = ref_grad(pol, pri, t, 1.0, g, None, None)
    got = _cuda.paired_logprobs_bwd(pol, None, t, out[1], None, g, temperature=1.0, inplace=True)
    assert got is pol
    close_grad(pol, want_grad, dtype)


def test_neg_inf_logits_masked_vocabulary(gen):
    n, V = 5, 1001
    pol, pri = logits(n, V, torch.float32, gen), logits(n, V, torch.float32, gen)
    pol[:, 900:] = -math.inf  # a padded vocabulary, masked in both models
    pri[:, 900:] = -math.inf
    pol[0, :450] = -math.inf  # more masking in the policy only
    t = targets_for(n, 900, gen)
    out = _cuda.paired_logprobs_fwd(pol, pri, t, 1.0, True, True)
    want = ref_paired(pol, pri, t, 1.0)
    for got, key in zip(out, ("lp", "lse", "qlp", "qlse", "H", "kl")):
        close(got, want[key])
    assert bool(torch.isfinite(torch.stack(out)).all())
    # the prior gives 0 probability where the policy does not: KL = +inf, the rest stays finite
    pri[1, 5] = -math.inf
    out = _cuda.paired_logprobs_fwd(pol, pri, t, 1.0, True, True)
    assert out[5][1] == math.inf and bool(torch.isfinite(out[5][2:]).all()) and bool(torch.isfinite(out[0]).all())


def test_out_of_range_target_gives_nan_not_a_crash(gen):
    n, V = 4, 37
    pol = logits(n, V, torch.bfloat16, gen)
    t = torch.tensor([0, V, -1, 5], device=DEVICE)
    lp, lse, *_ = _cuda.paired_logprobs_fwd(pol, pol, t, 1.0, False, False)
    assert bool(lp[1].isnan()) and bool(lp[2].isnan()) and bool(torch.isfinite(lp[[0, 3]]).all())
    assert bool(torch.isfinite(lse).all())


def test_zero_rows_and_leading_dims(gen):
    pol = logits(0, 11, torch.bfloat16, gen)
    out = _cuda.paired_logprobs_fwd(pol, pol, torch.zeros(0, dtype=torch.long, device=DEVICE), 1.0, True, True)
    assert all(o.shape == (0,) for o in out)
    x = logits(6, 11, torch.bfloat16, gen).view(2, 3, 11)
    t = torch.randint(0, 11, (2, 3), generator=gen).to(DEVICE)
    lp = _cuda.paired_logprobs_fwd(x, None, t, 1.0, False, False)[0]
    assert lp.shape == (2, 3)
    close(lp, ref_paired(x, None, t, 1.0)["lp"])


# ---- backward ----------------------------------------------------------------------------------------------

def ref_grad(policy, prior, targets, tau, g_lp, g_h, g_kl, g_lse=None):
    x = policy.detach().double().requires_grad_(True)
    z = x / tau
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    loss = (g_lp.double() * logp.gather(-1, targets[..., None].long())[..., 0]).sum() if g_lp is not None else 0.0
    if g_lse is not None:
        loss = loss + (g_lse.double() * torch.logsumexp(z, -1)).sum()
    if g_h is not None:
        loss = loss + (g_h.double() * -(p * logp).sum(-1)).sum()
    if g_kl is not None:
        logq = torch.log_softmax(prior.double() / tau, -1)
        loss = loss + (g_kl.double() * (p * (logp - logq)).sum(-1)).sum()
    (gx,) = torch.autograd.grad(loss, x)
    return gx


def close_grad(got, want, dtype):
    assert got.dtype == dtype
    rtol = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 1e-4}[dtype]
    # The upstream gradients are O(1): float32 rounding of p = 2^(x log2e / T - L2) is ~1e-6 of them, also where
    # the exact gradient is 0 (V = 1: p = 1 exactly).
    atol = 1e-5 * max(float(want.abs().max()), 1.0)
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [1.0, 2.3])
@pytest.mark.parametrize("terms", ["lp", "lp+H", "lp+KL", "lp+H+KL", "H+KL"])
def test_backward_matches_autograd_and_in_place(V, dtype, tau, terms, gen):
    n = rows_for(V)
    pol, pri = logits(n, V, dtype, gen), logits(n, V, dtype, gen, scale=2.0)
    t = targets_for(n, V, gen, pol)
    lp, lse, qlp, qlse, ent, kl = _cuda.paired_logprobs_fwd(pol, pri, t, tau, True, True)
    r = lambda: torch.randn(n, generator=gen, dtype=torch.float64).float().to(DEVICE)  # noqa: E731
    g_lp = r() if "lp" in terms else None
    g_h = r() if "H" in terms else None
    g_kl = r() if "KL" in terms else None
    want = ref_grad(pol, pri, t, tau, g_lp, g_h, g_kl)
    poison((tuple(pol.shape), dtype))
    got = _cuda.paired_logprobs_bwd(pol, pri, t, lse, qlse, g_lp, g_h, g_kl, ent, kl, tau, inplace=False)
    assert got.shape == pol.shape and got.data_ptr() != pol.data_ptr()
    close_grad(got, want, dtype)
    buf = pol.clone()
    same = _cuda.paired_logprobs_bwd(buf, pri, t, lse, qlse, g_lp, g_h, g_kl, ent, kl, tau, inplace=True)
    assert same is buf
    assert torch.equal(buf, got), "in-place and out-of-place backward differ"


def test_backward_of_noncontiguous_logits_in_place(gen):
    n, V = 6, 257
    full = logits(n, 2 * V, torch.bfloat16, gen)
    pol = full[:, ::2]
    assert not pol.is_contiguous()
    t = targets_for(n, V, gen)
    lp, lse, *_ = _cuda.paired_logprobs_fwd(pol, None, t, 1.0, False, False)
    close(lp, ref_paired(pol, None, t, 1.0)["lp"])
    g = torch.randn(n, generator=gen).to(DEVICE)
    want = ref_grad(pol, None, t, 1.0, g, None, None)
    assert _cuda.paired_logprobs_bwd(pol, None, t, lse, None, g, inplace=True) is pol
    close_grad(pol, want, torch.bfloat16)


def test_backward_with_neg_inf_logits_is_finite(gen):
    n, V = 4, 999
    pol, pri = logits(n, V, torch.float32, gen), logits(n, V, torch.float32, gen)
    pol[:, 900:] = -math.inf
    pri[:, 900:] = -math.inf
    t = targets_for(n, 900, gen)
    lp, lse, qlp, qlse, ent, kl = _cuda.paired_logprobs_fwd(pol, pri, t, 1.0, True, True)
    ones = torch.ones(n, device=DEVICE)
    got = _cuda.paired_logprobs_bwd(pol, pri, t, lse, qlse, ones, ones, ones, ent, kl, 1.0)
    assert bool(torch.isfinite(got).all())
    assert bool((got[:, 900:] == 0).all())
    want = ref_grad(pol[:, :900], pri[:, :900], t, 1.0, ones, ones, ones)
    close_grad(got[:, :900].contiguous(), want, torch.float32)


def test_max_outputs_and_kernel_module_interface(gen):
    n, V = 10, 50257
    pol, pri = logits(n, V, torch.bfloat16, gen), logits(n, V, torch.float16, gen)
    t = targets_for(n, V, gen, pol)
    st = _cuda.token_stats_forward(pol, pri, t, 0.7, entropy=True, kl=True)
    assert set(st) == {"lp", "lse", "max", "entropy", "kl", "prior_lp", "prior_lse", "prior_max"}
    want = ref_paired(pol, pri, t, 0.7)
    # max(x) / T in float32: torch on CUDA multiplies by 1/T where the kernel divides; equal to within an ulp
    close(st["max"], want["max"], atol=0, rtol=4e-7)
    close(st["prior_max"], want["qmax"], atol=0, rtol=4e-7)
    for k, w in (("lp", "lp"), ("lse", "lse"), ("entropy", "H"), ("kl", "kl"), ("prior_lp", "qlp"),
                 ("prior_lse", "qlse")):
        close(st[k], want[w])


def test_strided_rows_are_read_and_written_in_place(gen):
    """logits[:, :-1] of a [B, T, V] tensor: rows read where they are (no copy), the gradient written into them."""
    B, T, V = 3, 6, 1001
    base = logits(B * T, V, torch.bfloat16, gen).view(B, T, V)
    prior = logits(B * T, V, torch.bfloat16, gen).view(B, T, V)[:, 1:]
    pol = base[:, :-1]
    t = torch.randint(0, V, (B, T - 1), generator=gen).to(DEVICE)
    st = _cuda.token_stats_forward(pol, prior, t, 1.0, entropy=True, kl=True)
    want = ref_paired(pol, prior, t, 1.0)
    close(st["lp"], want["lp"])
    close(st["kl"], want["kl"])
    close(st["prior_lp"], want["qlp"])
    g = torch.randn(B, T - 1, generator=gen).to(DEVICE)
    want_grad = ref_grad(pol, prior, t, 1.0, g, g, g)
    last = base[:, -1].clone()
    out = _cuda.token_stats_backward(pol, prior, t, st["lse"], entropy=st["entropy"], kl=st["kl"],
                                     prior_lse=st["prior_lse"], grad_lp=g, grad_entropy=g, grad_kl=g, out=pol)
    assert out is pol
    close_grad(pol, want_grad, torch.bfloat16)
    assert torch.equal(base[:, -1], last), "the in-place backward wrote outside its rows"


def test_three_level_layout_goes_through_a_copy(gen):
    base = logits(3 * 4 * 5, 37, torch.float32, gen).view(3, 4, 5, 37)
    pol = base[:, :-1, :-1]  # leading dims that do not merge into two levels
    t = torch.randint(0, 37, pol.shape[:-1], generator=gen).to(DEVICE)
    lp, lse, *_ = _cuda.paired_logprobs_fwd(pol, None, t, 1.0, False, False)
    close(lp, ref_paired(pol, None, t, 1.0)["lp"])
    g = torch.randn(pol.shape[:-1], generator=gen).to(DEVICE)
    want = ref_grad(pol, None, t, 1.0, g, None, None)
    untouched = base[:, -1].clone()
    assert _cuda.paired_logprobs_bwd(pol, None, t, lse, None, g, inplace=True) is pol
    close_grad(pol, want, torch.float32)
    assert torch.equal(base[:, -1], untouched)


def test_grad_lse_and_grad_seq(gen):
    B, T, V = 4, 5, 777
    pol = logits(B * T, V, torch.float32, gen).view(B, T, V)
    t = torch.randint(0, V, (B, T), generator=gen).to(DEVICE)
    mask = torch.rand(B, T, generator=gen).to(DEVICE) > 0.4
    st = _cuda.token_stats_forward(pol, None, t, 1.5)
    g_lp, g_lse = torch.randn(B, T, generator=gen).to(DEVICE), torch.randn(B, T, generator=gen).to(DEVICE)
    g_seq = torch.randn(B, generator=gen).to(DEVICE)
    got = _cuda.token_stats_backward(pol, None, t, st["lse"], grad_lp=g_lp, grad_lse=g_lse, grad_seq=g_seq,
                                     mask=mask, temperature=1.5)
    want = ref_grad(pol, None, t, 1.5, g_lp + g_seq[:, None] * mask, None, None, g_lse)
    close_grad(got, want, torch.float32)


def test_in_place_into_overlapping_logits_is_refused(gen):
    pol = logits(1, 37, torch.float32, gen).expand(4, 37)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    lp, lse, *_ = _cuda.paired_logprobs_fwd(pol, None, t, 1.0, False, False)
    with pytest.raises(RuntimeError, match="overlap"):
        _cuda.paired_logprobs_bwd(pol, None, t, lse, None, lp, inplace=True)


# ---- per-sequence sums -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 1), (7, 33), (3, 1000), (64, 4096)])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_sequence_sums(dtype, B, T, mask_kind, gen):
    lp = (-torch.rand(B, T, generator=gen, dtype=torch.float64) * 5).to(dtype).to(DEVICE)
    keep = torch.rand(B, T, generator=gen) > 0.3
    keep[0] = False  # a fully masked row sums to 0
    if B > 1:
        keep[1] = True
    keep = keep.to(DEVICE)
    lp = lp.masked_fill(~keep & (torch.arange(T, device=DEVICE) % 2 == 0), -math.inf)  # -inf/NaN where masked
    lp = lp.masked_fill(~keep & (torch.arange(T, device=DEVICE) % 2 == 1), math.nan)
    mask = keep if mask_kind == "bool" else keep.to(torch.float32)
    poison(((B,), dtype))
    got = _cuda.sequence_sums(lp, mask)
    want = reference.sequence_logprobs(lp.double(), keep)
    assert got.dtype == dtype and got.shape == (B,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-5)
    assert float(got[0]) == 0.0
    other = lp * 2
    s1, s2 = _cuda.masked_row_sums(lp, mask, other)
    assert torch.equal(s1, got)
    torch.testing.assert_close(s2.double(), reference.sequence_logprobs(other.double(), keep),
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-5)


# ---- sequence coefficients and estimates --------------------------------------------------------------------

def sequences(n, gen, zeros=0):
    lpi = -torch.rand(n, generator=gen, dtype=torch.float64) * 20 - 1
    lq = lpi + torch.randn(n, generator=gen, dtype=torch.float64) * 1.5
    lP = lpi + torch.randn(n, generator=gen, dtype=torch.float64) * 2 - 1
    lP[:zeros] = -math.inf
    return lpi, lq, lP


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("baseline", ["batch", "none", 0.3])
@pytest.mark.parametrize("given_log_z", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficients_match_reference(div, baseline, given_log_z, dtype, gen):
    n = 257
    zeros = 11 if divergences.get(div).is_bounded_at_inf() else 0
    lpi, lq, lP = sequences(n, gen, zeros)
    lpi, lq, lP = (v.to(dtype).double() for v in (lpi, lq, lP))  # the reference sees the same rounded inputs
    lz = -1.7 if given_log_z else None
    want = reference.fdpg_coefficients(lpi, lq, lP, div, None if lz is None else torch.tensor(lz, dtype=dtype).double(),
                                       baseline)
    mode, value = (baseline, 0.0) if isinstance(baseline, str) else ("value", baseline)
    poison(((n,), dtype), ((n,), dtype), ((), dtype), ((), dtype), ((), dtype))
    got = _cuda.coefficients(*(v.to(dtype).to(DEVICE) for v in (lpi, lq, lP)), div, None, lz, mode, value)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for g, w, name in zip(got, want, ("coef", "log_z", "weights", "ess", "baseline")):
        assert g.dtype == dtype and g.device.type == "cuda", name
        torch.testing.assert_close(g.double().cpu(), w.double(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n", [1, 2, 1000, 65536])
def test_coefficients_many_sequences_one_launch(n, gen):
    lpi, lq, lP = (v.float().double() for v in sequences(n, gen, zeros=n // 10))
    want = reference.fdpg_coefficients(lpi, lq, lP, "js", None, "batch")
    got = _cuda.coefficients(*(v.float().to(DEVICE) for v in (lpi, lq, lP)), "js")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("given_log_z", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimates_match_reference(with_prior, given_log_z, dtype, gen):
    n = 1000
    lpi, lq, lP = sequences(n, gen, zeros=37)
    la = lpi + torch.randn(n, generator=gen, dtype=torch.float64) if with_prior else None
    lpi, lq, lP = (v.to(dtype).double() for v in (lpi, lq, lP))  # the reference sees the same rounded inputs
    la = None if la is None else la.to(dtype).double()
    lz = -2.2 if given_log_z else None
    want = reference.divergence_estimates(lpi, lq, lP, la,
                                          None if lz is None else torch.tensor(lz, dtype=dtype).double())
    got = _cuda.estimates(*(v.to(dtype).to(DEVICE) for v in (lpi, lq, lP)),
                          None if la is None else la.to(dtype).to(DEVICE), lz)
    assert list(got) == list(want)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for k in want:
        torch.testing.assert_close(got[k].double().cpu(), want[k], **tol, msg=lambda m: f"{k}: {m}")


# ---- composition: streams, torch.compile, opcheck, the other backends ----------------------------------------

def test_runs_on_the_current_stream(gen):
    n, V = 64, 50257
    pol = logits(n, V, torch.bfloat16, gen)
    t = targets_for(n, V, gen, pol)
    base = _cuda.paired_logprobs_fwd(pol, pol, t, 1.0, True, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        side = _cuda.paired_logprobs_fwd(pol, pol, t, 1.0, True, True)
        buf = pol.clone()
        _cuda.paired_logprobs_bwd(buf, None, t, side[1], None, side[0], inplace=True)
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(base, side):
        assert torch.equal(a, b)
    want = _cuda.paired_logprobs_bwd(pol, None, t, base[1], None, base[0])
    assert torch.equal(buf, want)


def test_torch_compile_matches_eager(gen):
    n, V = 16, 1000
    pol, pri = logits(n, V, torch.bfloat16, gen), logits(n, V, torch.bfloat16, gen)
    t = targets_for(n, V, gen, pol)

    def f(pol, pri, t):
        lp, lse, qlp, qlse, ent, kl = _cuda.paired_logprobs_fwd(pol, pri, t, 0.8, True, True)
        seq = _cuda.sequence_sums(lp.view(4, 4), t.view(4, 4) > 3)
        # on-policy (q = pi): well-conditioned coefficients. With q far from pi one sample holds nearly all the
        # weight and its coefficient w (f'(t) - B) cancels, so an ulp of difference in inductor's sum of qlp
        # against eager's is amplified thousands of times.
        coef = _cuda.coefficients(seq, seq, qlp.view(4, 4).sum(-1), "js")[0]
        return lp, ent, kl, coef

    eager = f(pol, pri, t)
    compiled = torch.compile(f, fullgraph=True)(pol, pri, t)
    for a, b in zip(eager[:3], compiled[:3]):  # the custom ops on the same inputs: bit for bit
        assert torch.equal(a, b)
    torch.testing.assert_close(eager[3], compiled[3], rtol=1e-5, atol=1e-6)


def test_opcheck(gen):
    n, V = 5, 37
    pol, pri = logits(n, V, torch.bfloat16, gen), logits(n, V, torch.float32, gen)
    t = targets_for(n, V, gen)
    lp, lse, qlp, qlse, ent, kl = _cuda.paired_logprobs_fwd(pol, pri, t, 1.0, True, True)
    ops = torch.ops.fdpg_cuda
    torch.library.opcheck(ops.paired_logprobs_fwd.default, (pol, pri, t, 1.0, True, True))
    bwd_args = (pri, t, lse, qlse, lp, lse, ent, kl, ent, kl, 1.0)
    torch.library.opcheck(ops.paired_logprobs_bwd.default, (pol, *bwd_args))
    torch.library.opcheck(ops.paired_logprobs_bwd_inplace.default, (pol.clone(), *bwd_args))
    mask = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
    torch.library.opcheck(ops.sequence_sums.default, (lp.view(1, n), None, mask))
    torch.library.opcheck(ops.sequence_sums.default, (lp.view(1, n), qlp.view(1, n), mask))
    v = -torch.rand(9, generator=gen).to(DEVICE)
    torch.library.opcheck(ops.coefficients.default, (v, v - 0.5, v * 2, None, [-1.0], [-1.0], [], 0, 0.0))
    torch.library.opcheck(ops.estimates.default, (v, v - 0.5, v * 2, v, None))


def _triton_or_skip(fn):
    try:
        return fn()
    except (ValueError, NotImplementedError, ImportError) as e:
        pytest.skip(f"the Triton backend is not available here: {e}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_triton_backend(dtype, gen):
    n, V = 8, 50257
    pol, pri = logits(n, V, dtype, gen), logits(n, V, dtype, gen)
    t = targets_for(n, V, gen, pol)
    tri = _triton_or_skip(lambda: fdpg.paired_token_logprobs(pol, pri, t, temperature=0.9, backend="triton"))
    cu = _cuda.paired_logprobs_fwd(pol, pri, t, 0.9, False, False)
    torch.testing.assert_close(cu[0], tri[0].float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cu[2], tri[1].float(), rtol=1e-5, atol=1e-4)


def test_public_ops_with_cuda_backend(gen):
    """Once fdpg.ops routes backend="cuda" here, the public ops give the reference's numbers and gradients."""
    n, V = 6, 1000
    pol = logits(n, V, torch.bfloat16, gen).requires_grad_(True)
    pri = logits(n, V, torch.bfloat16, gen)
    t = targets_for(n, V, gen)
    lp, qlp = fdpg.paired_token_logprobs(pol, pri, t, temperature=0.7, backend="cuda")
    want = ref_paired(pol.detach(), pri, t, 0.7)
    close(lp.detach(), want["lp"])
    close(qlp, want["qlp"])
    g = torch.randn(n, generator=gen).to(DEVICE)
    (lp * g).sum().backward()
    close_grad(pol.grad, ref_grad(pol.detach(), None, t, 0.7, g, None, None), torch.bfloat16)
