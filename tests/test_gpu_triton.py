"""The Triton kernels compiled for a real GPU (not the interpreter) on CUDA tensors, against the float64 reference:
paired_token_stats (every term, masks, temperature, odd vocabularies, T = 1, fully masked rows, inplace backward)
and fdpg_coefficients / divergence_estimates. Skipped without a GPU (the interpreter twins are test_triton_*.py)."""
import math

import pytest
import torch

import fdpg
from fdpg import divergences, reference

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}  # inputs are exact in their dtype
DIVS = ["forward_kl", "reverse_kl", "tv", "js", "hellinger", "chi2", "alpha:0.5", "alpha:-0.7", "alpha:2"]


def close(got, want, what, rtol=2e-5):
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=rtol, atol=rtol * max(scale, 1.0), msg=what)


@pytest.mark.parametrize("V", [1, 37, 4099, 50257, 131072 + 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1), (4, 33)])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_paired_token_stats_on_gpu(V, dtype, shape, tau, gen):
    if V > 100_000 and shape == (4, 33) and dtype != torch.bfloat16:
        pytest.skip("one large-vocabulary case per shape is enough")
    pol = (torch.randn(*shape, V, generator=gen) * 4).to(dtype)
    pri = (torch.randn(*shape, V, generator=gen) * 4).to(dtype)
    y = torch.randint(0, V, shape, generator=gen)
    mask = torch.rand(shape, generator=gen) > 0.3
    mask[0] = False  # a fully masked row: its sums are exactly 0
    mask[-1, 0] = True
    w = {k: torch.randn(shape, generator=gen, dtype=torch.float64) for k in ("lp", "lse", "ent", "kl")}
    ws = torch.randn(shape[0], generator=gen, dtype=torch.float64)

    x = pol.double().requires_grad_(True)
    ref = reference.paired_token_stats(x, pri.double(), y, mask, True, True, tau)
    loss = sum((ref[k] * w[k2]).sum() for k, k2 in
               [("policy_lp", "lp"), ("policy_lse", "lse"), ("entropy", "ent"), ("kl", "kl")])
    loss = loss + (ref["policy_seq"] * ws).sum()
    (gx,) = torch.autograd.grad(loss, x)

    for inplace in (False, True):
        p = pol.to(DEV).clone().requires_grad_(not inplace)
        leaf = p
        if inplace:  # the inplace backward writes into a non-leaf's buffer
            leaf = pol.to(DEV).clone().requires_grad_(True)
            p = leaf * 1
        st = fdpg.paired_token_stats(p, pri.to(DEV), y.to(DEV), mask=mask.to(DEV), entropy=True, kl=True,
                                     temperature=tau, backend="triton", validate=True, inplace_backward=inplace)
        what = f"V={V} {dtype} {shape} tau={tau} inplace={inplace}"
        for k in ("policy_lp", "prior_lp", "policy_lse", "prior_lse", "entropy", "kl", "policy_seq", "prior_seq"):
            got = getattr(st, k)
            assert got.dtype == torch.float32, (k, what)
            close(got, ref[k].detach(), f"{k}: {what}")
        assert (st.policy_seq[0] == 0).item() and (st.prior_seq[0] == 0).item()
        loss = sum((getattr(st, k) * w[k2].to(DEV)).sum() for k, k2 in
                   [("policy_lp", "lp"), ("policy_lse", "lse"), ("entropy", "ent"), ("kl", "kl")])
        loss = loss + (st.policy_seq * ws.to(DEV)).sum()
        loss.backward()
        assert leaf.grad.dtype == dtype
        close(leaf.grad.float(), gx, f"grad: {what}", rtol=8e-3 if dtype != torch.float32 else 2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_strided_on_gpu(dtype, gen):
    """logits[:, :-1] (a strided view) and the auto backend on CUDA."""
    B, T, V = 3, 17, 32000
    full = (torch.randn(B, T, V, generator=gen) * 3).to(dtype)
    y = torch.randint(0, V, (B, T - 1), generator=gen)
    want = torch.log_softmax(full[:, :-1].double(), -1).gather(-1, y[..., None])[..., 0]
    for backend in ("triton", "auto"):
        got = fdpg.token_logprobs(full.to(DEV)[:, :-1], y.to(DEV), backend=backend)
        close(got, want, f"{backend} {dtype}")


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("n", [1, 150, 70000])
def test_coefficients_on_gpu(div, n, gen):
    d = divergences.get(div)
    lq = -20 - torch.rand(n, generator=gen) * 20
    lpi = lq + torch.randn(n, generator=gen) * 1.5
    lP = lq + torch.randn(n, generator=gen) * 1.5 - 1.0
    if d.is_bounded_at_inf() and n > 1:
        lP[::7] = -math.inf
    for baseline in ("batch", "none", 0.3):
        for log_z in (None, -0.7):
            out = fdpg.fdpg_coefficients(lpi.to(DEV), lq.to(DEV), lP.to(DEV), div, log_z=log_z,
                                         baseline=baseline, backend="triton")
            coef, lz, w, ess, b = reference.fdpg_coefficients(lpi.double(), lq.double(), lP.double(), div,
                                                               log_z, baseline)
            what = f"{div} n={n} baseline={baseline} log_z={log_z}"
            close(out.coef, coef, what, rtol=5e-5)
            close(out.weights, w, what, rtol=5e-5)
            close(out.log_z, lz, what)
            close(out.ess, ess, what, rtol=5e-5)
            close(out.baseline, b, what, rtol=5e-5)
