import math

import pytest
import torch

from fdpg import divergences

ALL = ["forward_kl", "reverse_kl", "tv", "js", "hellinger", "chi2", "alpha:-1", "alpha:0.5", "alpha:2", "alpha:3.5"]


def autograd_f_prime(f, s):
    """d f / d t = (d f / d s) / t, with d f / d s from autograd in float64."""
    x = s.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return g * torch.exp(-s)


@pytest.mark.parametrize("name", ALL)
def test_f_prime_matches_autograd_of_f(name, gen):
    d = divergences.get(name)
    s = torch.randn(400, generator=gen, dtype=torch.float64) * 6
    s = s[s.abs() > 1e-6]  # TV's f is not differentiable at t = 1
    # rtol: torch's expm1 backward is (expm1(s) + 1), which loses ~1e-8 relative where expm1(s) ~ -1
    torch.testing.assert_close(d.fprime(s), autograd_f_prime(d.f, s), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_f_prime_is_callable_on_every_divergence(name, gen):
    d = divergences.get(name)
    s = torch.randn(50, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(d.f_prime(s), d.fprime(s))
    torch.testing.assert_close(d.f_prime(s), autograd_f_prime(d.f, s), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_generator_is_zero_at_one_and_convex(name, gen):
    d = divergences.get(name)
    assert d.f(torch.zeros(1, dtype=torch.float64)).abs().item() < 1e-15
    t = torch.rand(200, generator=gen, dtype=torch.float64) * 5 + 0.01
    t1, t2 = t[:100], t[100:]
    lam = torch.rand(100, generator=gen, dtype=torch.float64)
    mid = d.f(torch.log(lam * t1 + (1 - lam) * t2))
    assert (mid <= lam * d.f(torch.log(t1)) + (1 - lam) * d.f(torch.log(t2)) + 1e-12).all()


@pytest.mark.parametrize("name", ALL)
def test_weighted_f_prime_folds_the_weight(name, gen):
    d = divergences.get(name)
    s = torch.randn(300, generator=gen, dtype=torch.float64) * 5
    log_w = torch.randn(300, generator=gen, dtype=torch.float64) * 5
    torch.testing.assert_close(d.weighted_f_prime(s, log_w), torch.exp(log_w) * d.fprime(s), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL)
def test_no_nan_and_no_spurious_overflow_at_extreme_s(name, dtype):
    d = divergences.get(name)
    s = torch.tensor([-1e4, -800.0, -100.0, -1.0, 0.0, 1.0, 100.0, 800.0, 1e4], dtype=dtype)
    for v in (d.f(s), d.fprime(s)):
        assert not torch.isnan(v).any(), (name, v)
    if d.is_bounded_at_inf():
        pos = s[s >= 0]
        assert torch.isfinite(d.fprime(pos)).all(), (name, d.fprime(pos))
    if name in ("js", "tv"):
        assert torch.isfinite(d.f(s[s <= 0])).all()
    if name.startswith("alpha"):
        # f grows to +inf at both ends (convex, minimum 0 at s = 0), never NaN or -inf
        assert (d.f(s) >= 0).all()


@pytest.mark.parametrize("name", ALL)
def test_importance_weighted_f_prime_at_extreme_policy_logprob(name):
    """The coefficient (pi/q) f'(pi/p) with log pi from -1e4 to 1e4 and moderate log q, log p: never NaN;
    forward KL's is exactly -p/q whatever pi; the others with a finite limit as pi -> 0 give 0 there."""
    d = divergences.get(name)
    lpi = torch.tensor([-1e4, -800.0, -50.0, -3.0, 0.0], dtype=torch.float64)
    lq, lp = torch.full_like(lpi, -2.0), torch.full_like(lpi, -4.0)
    v = d.weighted_f_prime(lpi - lp, lpi - lq)
    assert not torch.isnan(v).any(), v
    if name == "forward_kl":
        torch.testing.assert_close(v, -torch.exp(lp - lq))
    if name in ("tv", "js", "hellinger", "alpha:0.5", "reverse_kl"):
        assert v[0] == 0.0, v


def test_limits_at_infinity():
    inf = torch.tensor([math.inf], dtype=torch.float64)
    assert divergences.get("forward_kl").fprime(inf).item() == 0.0
    assert divergences.get("tv").fprime(inf).item() == 0.5
    assert divergences.get("js").fprime(inf).item() == pytest.approx(0.5 * math.log(2))
    assert divergences.get("hellinger").fprime(inf).item() == 1.0
    assert divergences.get("alpha:0.5").fprime(inf).item() == pytest.approx(2.0)
    assert divergences.get("js").f(-inf).item() == pytest.approx(0.5 * math.log(2))
    assert divergences.get("reverse_kl").f(-inf).item() == 0.0
    # f's limits where they are infinite (t log 2 - log t / 2 + ... for JS; t^a or t for alpha)
    both = torch.tensor([-math.inf, math.inf], dtype=torch.float64)
    for name, at0 in (("js", 0.5 * math.log(2)), ("alpha:0.5", 2.0), ("alpha:2", 0.5), ("alpha:3", 1 / 3),
                      ("alpha:-0.5", math.inf), ("alpha:-2", math.inf)):
        v = divergences.get(name).f(both)
        assert v[0].item() == pytest.approx(at0) and v[1].item() == math.inf, name
    assert divergences.get("alpha:3").f(torch.tensor([30.0])).item() == pytest.approx(
        (math.exp(90) - 3 * math.exp(30) + 2) / 6, rel=1e-5)   # representable in float32: no overflow on the way
    for name in ("forward_kl", "tv", "js", "hellinger", "alpha:0.5", "alpha:-2"):
        assert divergences.get(name).is_bounded_at_inf()
    for name in ("reverse_kl", "chi2", "alpha:2", "alpha:1.01"):
        assert not divergences.get(name).is_bounded_at_inf()


def test_user_divergence_from_f_alone_and_with_f_prime(gen):
    s = torch.randn(100, generator=gen, dtype=torch.float64) * 3
    chi2 = divergences.get("chi2")
    mine = divergences.Divergence("mine", f=lambda s: torch.expm1(s) ** 2)
    torch.testing.assert_close(mine.fprime(s), chi2.fprime(s))
    lw = torch.randn(100, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mine.weighted_f_prime(s, lw), chi2.weighted_f_prime(s, lw))
    assert not mine.is_bounded_at_inf()
    both = divergences.Divergence("both", f=chi2.f, f_prime=lambda s: 2 * torch.expm1(s))
    torch.testing.assert_close(both.fprime(s), chi2.fprime(s))
    reg = divergences.register("test_quartic", f=lambda s: torch.expm1(s) ** 4)
    assert divergences.get("test_quartic") is reg
    assert divergences.get(reg) is reg


def test_get_errors():
    with pytest.raises(ValueError, match="unknown name 'nope'.*forward_kl"):
        divergences.get("nope")
    with pytest.raises(ValueError, match="alpha"):
        divergences.get("alpha:1")
    with pytest.raises(ValueError, match="alpha"):
        divergences.get("alpha:0")
    with pytest.raises(ValueError, match="alpha:<number>"):
        divergences.get("alpha:x")
    with pytest.raises(TypeError, match="divergence"):
        divergences.get(3)
    with pytest.raises(ValueError, match="name"):
        divergences.register("js", f=lambda s: s)
    assert divergences.get("KL").name == "forward_kl"
