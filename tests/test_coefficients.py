import math

import mpmath
import pytest
import torch

import fdpg
from fdpg import divergences

DIVS = ["forward_kl", "reverse_kl", "tv", "js", "hellinger", "chi2", "alpha:0.5", "alpha:-0.7", "alpha:2"]
BASELINES = ["batch", "none", 0.3, -1.0]


def exact_divergence(div, log_pi, log_p):
    """D_f(pi || p) = sum_{p>0} p f(pi/p) + sum_{p=0} pi f'(inf), in float64, differentiable in log_pi."""
    d = divergences.get(div)
    on = log_p > -math.inf
    s = log_pi[on] - log_p[on]
    val = (torch.exp(log_p[on]) * d.f(s)).sum()
    if (~on).any():
        val = val + torch.exp(log_pi[~on]).sum() * d.fprime(torch.tensor(math.inf, dtype=torch.float64))
    return val


def space(gen, n=50, zeros=0):
    theta = (torch.randn(n, generator=gen, dtype=torch.float64) * 1.5).requires_grad_(True)
    log_P = torch.randn(n, generator=gen, dtype=torch.float64) * 2 - 3.0  # unnormalised, Z != 1
    log_P[:zeros] = -math.inf
    return theta, log_P


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("zeros", [0, 7])
def test_exact_gradient_over_the_whole_space(div, baseline, zeros, gen):
    """MATH.md's check: q uniform, the whole space as the batch: mean(coef * grad log pi) == grad D_f exactly."""
    if zeros and not divergences.get(div).is_bounded_at_inf():
        pytest.skip("unbounded divergence: P = 0 is rejected (tested below)")
    theta, log_P = space(gen, zeros=zeros)
    n = theta.shape[0]
    log_pi = torch.log_softmax(theta, 0)
    log_q = torch.full((n,), -math.log(n), dtype=torch.float64)
    out = fdpg.fdpg_coefficients(log_pi, log_q, log_P, div, baseline=baseline)
    assert not out.coef.requires_grad
    (got,) = torch.autograd.grad(out.loss(log_pi), theta)
    log_p = log_P - torch.logsumexp(log_P, 0)
    (want,) = torch.autograd.grad(exact_divergence(div, torch.log_softmax(theta, 0), log_p), theta)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.log_z, torch.logsumexp(log_P, 0))


def test_gdc_plus_plus_and_dpg_coefficients(gen):
    n = 64
    lpi = -torch.rand(n, generator=gen, dtype=torch.float64) * 10
    lq = -torch.rand(n, generator=gen, dtype=torch.float64) * 10
    lP = -torch.rand(n, generator=gen, dtype=torch.float64) * 12
    lP[::5] = -math.inf
    log_z = -2.5
    P, Z, pi, q = lP.exp(), math.exp(log_z), lpi.exp(), lq.exp()
    gdcpp = fdpg.fdpg_coefficients(lpi, lq, lP, "forward_kl", log_z=log_z, baseline=-1.0)
    torch.testing.assert_close(gdcpp.coef, -(P - Z * pi) / (Z * q))
    dpg = fdpg.fdpg_coefficients(lpi, lq, lP, "forward_kl", log_z=log_z, baseline="none")
    torch.testing.assert_close(dpg.coef, -P / (Z * q))
    # log Z estimated from the batch, in log space
    est = fdpg.fdpg_coefficients(lpi, lq, lP, "forward_kl")
    torch.testing.assert_close(est.log_z, torch.log((P / q).mean()))


def test_weights_ess_and_batch_baseline(gen):
    n = 40
    lpi = torch.randn(n, generator=gen) * 2
    lq = torch.randn(n, generator=gen) * 2
    lP = torch.randn(n, generator=gen) * 2
    out = fdpg.fdpg_coefficients(lpi, lq, lP, "js")
    w = torch.exp(lpi - lq)
    torch.testing.assert_close(out.weights, w / w.sum())
    torch.testing.assert_close(out.ess, w.sum() ** 2 / (w * w).sum())
    s = lpi - lP + out.log_z
    fp = divergences.get("js").fprime(s)
    torch.testing.assert_close(out.baseline, (out.weights * fp).sum())
    torch.testing.assert_close(out.coef, w * (fp - out.baseline), rtol=1e-5, atol=1e-6)
    on_policy = fdpg.fdpg_coefficients(lpi, lpi, lP, "js")
    torch.testing.assert_close(on_policy.ess, torch.tensor(float(n)))
    assert out.coef.dtype == torch.float32


@pytest.mark.parametrize("div", DIVS)
def test_float32_extreme_sequence_logprobs_stay_finite(div, gen):
    """Long sequences: log-probs in the hundreds; the coefficients must not overflow where the true ones don't."""
    n = 32
    lq = -300 - torch.rand(n, generator=gen) * 200
    lpi = lq + torch.randn(n, generator=gen) * 3
    lP = lq + torch.randn(n, generator=gen) * 3
    out = fdpg.fdpg_coefficients(lpi, lq, lP, div)
    ref = fdpg.fdpg_coefficients(lpi.double(), lq.double(), lP.double(), div)
    assert torch.isfinite(out.coef).all() and torch.isfinite(out.log_z)
    torch.testing.assert_close(out.coef.double(), ref.coef, rtol=2e-3, atol=2e-3)


def _fprime_mp(div: str, s):
    """f'(t) at s = log t in mpmath (the closed forms of MATH.md)."""
    mp = mpmath
    if div == "forward_kl":
        return -mp.exp(-s)
    if div == "reverse_kl":
        return s + 1
    if div == "tv":
        return mp.mpf(0.5) * mp.sign(s)
    if div == "js":
        return (mp.log(2) - mp.log(1 + mp.exp(-s))) / 2
    if div == "hellinger":
        return 1 - mp.exp(-s / 2)
    if div == "chi2":
        return 2 * (mp.exp(s) - 1)
    a = mp.mpf(div.split(":")[1])
    return (mp.exp((a - 1) * s) - 1) / (a - 1)


def pairwise_coefficients(lpi, lq, lP, div):
    """Batch-baseline coefficients ``sum_j wn_j (pi_i/q_i)(f'_i - f'_j)`` in 60-digit arithmetic (mpmath): the
    ground truth however the weights are spread, float64 [N]."""
    with mpmath.workdps(60):
        lpi, lq, lP = ([mpmath.mpf(float(v)) for v in t] for t in (lpi, lq, lP))
        n = len(lpi)
        lz = mpmath.log(sum(mpmath.exp(p - q) for p, q in zip(lP, lq)) / n)
        lw = [p - q for p, q in zip(lpi, lq)]
        W = sum(mpmath.exp(v) for v in lw)
        fp = [_fprime_mp(div, p - P + lz) for p, P in zip(lpi, lP)]
        out = [mpmath.exp(lw[i]) * sum(mpmath.exp(lw[j]) * (fp[i] - fp[j]) for j in range(n)) / W for i in range(n)]
        return torch.tensor([float(v) for v in out], dtype=torch.float64)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("gap", [10.0, 40.0, 100.0, 300.0])
def test_a_sample_holding_nearly_all_the_weight(div, gap, gen):
    """One sample with pi/q = e^gap over the others (an off-policy batch of long sequences): past ~e^16 (float32)
    or e^36 (float64) its coefficient (pi/q)(f' - B) is a difference that rounding turns into noise times pi/q; it
    must come out as the pairwise value, in float64 and (where float32 holds pi/q) in float32 inputs."""
    n = 24
    lq = -60 - torch.rand(n, generator=gen, dtype=torch.float64) * 10
    lpi = lq + torch.randn(n, generator=gen, dtype=torch.float64)
    lP = lq + torch.randn(n, generator=gen, dtype=torch.float64)
    lpi[7] = lq[7] + gap
    want = pairwise_coefficients(lpi, lq, lP, div)
    assume = torch.isfinite(want).all()
    got = fdpg.fdpg_coefficients(lpi, lq, lP, div).coef
    if assume:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    if gap <= 80.0 and float(want.abs().max()) < 1e30:
        got32 = fdpg.fdpg_coefficients(lpi.float(), lq.float(), lP.float(), div).coef
        torch.testing.assert_close(got32.double(), want, rtol=2e-4, atol=2e-4 * float(want.abs().max()))


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("gap", [40.0, 60.0, 100.0])
def test_heavy_samples_sharing_f_prime(div, gap, gen):
    """Two copies of the heaviest sequence (and, for TV, samples on one side of s = 0 share f'): the second copy's
    coefficient cancels like the first's, so every coefficient is differenced against the heaviest sample."""
    n = 16
    lq = -60 - torch.rand(n, generator=gen, dtype=torch.float64) * 10
    lpi = lq + torch.randn(n, generator=gen, dtype=torch.float64)
    lP = lq + torch.randn(n, generator=gen, dtype=torch.float64)
    lpi[3] = lq[3] + gap
    lpi[9], lq[9], lP[9] = lpi[3], lq[3], lP[3]               # a duplicate of the heaviest
    lpi[11] = lq[11] + gap - 1.0                              # and a near-heavy one
    want = pairwise_coefficients(lpi, lq, lP, div)
    if not torch.isfinite(want).all():
        pytest.skip("true coefficients beyond float64")
    got = fdpg.fdpg_coefficients(lpi, lq, lP, div).coef
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8 * float(want.abs().max()))
    tie = fdpg.fdpg_coefficients(torch.tensor([-1.0, -2, -3, -4]), torch.tensor([-41.0, -41, -3, -4]),
                                 torch.tensor([-1.5, -2.7, -2.7, -3.8]), "tv", log_z=0.0).coef
    torch.testing.assert_close(tie, torch.tensor([1.4621, 0.5379, -1.0, -1.0]), rtol=0, atol=1e-4)


def test_user_divergences_edge_cases(gen):
    """A user divergence (f' by autograd) gives the built-in's coefficients with a sample of pi(x) = 0; its
    boundedness at t -> inf is found from f' where autograd cannot reach s = inf; names of built-ins (any case,
    aliases) are refused."""
    inf = math.inf
    lpi, lq, lP = torch.tensor([-inf, -1.0, -2.0, -1.5]), torch.tensor([-1.0, -1.0, -2.0, -1.2]), \
        torch.tensor([-1.2, -0.8, -2.5, -1.0])
    mine = divergences.register("test_chi2_copy", f=divergences.get("chi2").f)
    for baseline in ("batch", "none", 0.5):
        want = fdpg.fdpg_coefficients(lpi, lq, lP, "chi2", baseline=baseline).coef
        got = fdpg.fdpg_coefficients(lpi, lq, lP, mine, baseline=baseline).coef
        assert torch.isfinite(got).all() and got[0] == 0
        torch.testing.assert_close(got, want)
    hel = divergences.register("test_hellinger_copy", f=divergences.get("hellinger").f)
    assert hel.is_bounded_at_inf() and not mine.is_bounded_at_inf()
    torch.testing.assert_close(hel.fprime(torch.tensor([50.0, inf], dtype=torch.float64)),
                               torch.tensor([1.0, 1.0], dtype=torch.float64))
    lP0 = lP.clone()
    lP0[2] = -inf                                   # P(x) = 0 under a bounded user divergence: f'(inf) = 1
    torch.testing.assert_close(fdpg.fdpg_coefficients(lpi, lq, lP0, hel).coef,
                               fdpg.fdpg_coefficients(lpi, lq, lP0, "hellinger").coef)
    declared = divergences.register("test_declared", f=lambda s: -s, bounded_at_inf=False)
    assert not declared.is_bounded_at_inf()
    for name in ("kl", "Forward_KL", " JSD", "pearson", "alpha:3"):
        with pytest.raises(ValueError, match="names no built-in divergence or alias"):
            divergences.register(name, f=lambda s: s * s)


def test_a_given_log_z_allows_a_batch_without_p_mass(gen):
    """With log Z given (a running estimate), a batch in which no sample has P > 0 is well defined."""
    lpi = -5 * torch.rand(6, generator=gen)
    lP = torch.full((6,), -math.inf)
    out = fdpg.fdpg_coefficients(lpi, lpi, lP, "forward_kl", log_z=-3.0)
    assert torch.equal(out.coef, torch.zeros(6))
    est = fdpg.divergence_estimates(lpi, lpi, lP, log_z=-3.0)
    assert est["kl_pi_p"] == math.inf and est["tv"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"log Z cannot be estimated from this batch \(pass log_z\)"):
        fdpg.fdpg_coefficients(lpi, lpi, lP, "forward_kl")
    with pytest.raises(TypeError, match="log_z: expected a number or a scalar tensor, got str"):
        fdpg.fdpg_coefficients(lpi, lpi, lpi, "forward_kl", log_z="1")


def test_estimates_are_exact_over_the_whole_space(gen):
    theta, log_P = space(gen, zeros=5)
    n = theta.shape[0]
    lpi = torch.log_softmax(theta.detach(), 0)
    la = torch.log_softmax(torch.randn(n, generator=gen, dtype=torch.float64), 0)
    lq = torch.full((n,), -math.log(n), dtype=torch.float64)
    est = fdpg.divergence_estimates(lpi, lq, log_P, la)
    lp = log_P - torch.logsumexp(log_P, 0)
    pi, p = lpi.exp(), lp.exp()
    on = p > 0
    torch.testing.assert_close(est["kl_p_pi"], (p[on] * (lp[on] - lpi[on])).sum())
    assert est["kl_pi_p"] == math.inf  # pi puts mass where p = 0
    torch.testing.assert_close(est["kl_pi_a"], (pi * (lpi - la)).sum())
    torch.testing.assert_close(est["tv"], 0.5 * (pi - p).abs().sum())
    m = 0.5 * (pi + p)
    js = 0.5 * (pi * (pi / m).log()).sum() + 0.5 * (p[on] * (p[on] / m[on]).log()).sum()
    torch.testing.assert_close(est["js"], js)
    torch.testing.assert_close(est["js"], exact_divergence("js", lpi, lp))
    torch.testing.assert_close(est["log_z"], torch.logsumexp(log_P, 0))
    full = fdpg.divergence_estimates(lpi, lq, torch.randn(n, dtype=torch.float64))
    assert torch.isfinite(full["kl_pi_p"]) and "kl_pi_a" not in full


def test_bad_inputs(gen):
    n = 8
    lpi, lq, lP = (-torch.rand(n, generator=gen) * 5 for _ in range(3))

    def bad(exc, match, *args, **kw):
        with pytest.raises(exc, match=match):
            fdpg.fdpg_coefficients(*args, **kw)

    bad(ValueError, "policy_logprob: contains NaN", lpi.clone().fill_(math.nan), lq, lP)
    bad(ValueError, r"target_logscore: contains \+inf", lpi, lq, lP.clone().fill_(math.inf))
    bad(ValueError, "proposal_logprob: contains -inf", lpi, lq.clone().fill_(-math.inf), lP)
    bad(ValueError, "policy_logprob: every sample has pi", lpi.clone().fill_(-math.inf), lq, lP, "js")
    with pytest.raises(ValueError, match="policy_logprob: every sample has pi"):
        fdpg.divergence_estimates(lpi.clone().fill_(-math.inf), lq, lP)
    bad(ValueError, "target_logscore: every sample has P", lpi, lq, lP.clone().fill_(-math.inf))
    for div in ("reverse_kl", "chi2", "alpha:2", "alpha:1.5"):
        lP0 = lP.clone()
        lP0[0] = -math.inf
        bad(ValueError, f"target_logscore: contains -inf.*{div}.*floor", lpi, lq, lP0, div)
    for div in ("forward_kl", "tv", "js", "hellinger", "alpha:0.5"):
        lP0 = lP.clone()
        lP0[0] = -math.inf
        assert torch.isfinite(fdpg.fdpg_coefficients(lpi, lq, lP0, div).coef).all()
    bad(ValueError, "unknown name 'kld'", lpi, lq, lP, "kld")
    bad(ValueError, r"proposal_logprob: expected shape \(8,\)", lpi, lq[:4], lP)
    bad(ValueError, "target_logscore: expected a non-empty 1-D", lpi, lq, lP[None])
    bad(TypeError, "policy_logprob: expected a floating-point", lpi.long(), lq, lP)
    bad(ValueError, "baseline: expected 'batch', 'none' or a number", lpi, lq, lP, baseline="mean")
    bad(ValueError, "log_z: expected a finite number", lpi, lq, lP, log_z=math.nan)
    with pytest.raises(ValueError, match="prior_logprob: contains NaN"):
        fdpg.divergence_estimates(lpi, lq, lP, lP.clone().fill_(math.nan))
