"""paired_token_stats: per-token log-probs, logsumexp, max, entropy and exact KL(pi || a) (MATH.md, "Per-token
quantities from one pass"): the torch reference against torch.distributions, and the public op's contract."""
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import fdpg
from fdpg import reference
from fdpg.ops.logprobs import PairedTokenStats, paired_token_stats


def make(gen, B=3, T=4, V=29, dtype=torch.float64, scale=3.0):
    pol = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    pri = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (B, T), generator=gen)
    return pol, pri, y


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_reference_against_torch_distributions(tau, gen):
    pol, pri, y = make(gen)
    x = pol.clone().requires_grad_(True)
    d = reference.paired_token_stats(x, pri, y, None, True, True, tau)
    pi, a = Categorical(logits=x / tau), Categorical(logits=pri / tau)
    torch.testing.assert_close(d["entropy"], pi.entropy())
    torch.testing.assert_close(d["kl"], kl_divergence(pi, a))
    torch.testing.assert_close(d["policy_lp"], pi.log_prob(y))
    torch.testing.assert_close(d["prior_lp"], a.log_prob(y))
    torch.testing.assert_close(d["policy_lse"], torch.logsumexp(x / tau, -1))
    torch.testing.assert_close(d["policy_max"], pol.amax(-1) / tau)
    assert d["policy_seq"] is None and d["prior_seq"] is None
    g1, g2 = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen,
                                                                                  dtype=torch.float64)
    (got,) = torch.autograd.grad((d["entropy"] * g1 + d["kl"] * g2).sum(), x)
    x2 = pol.clone().requires_grad_(True)
    pi2 = Categorical(logits=x2 / tau)
    (want,) = torch.autograd.grad((pi2.entropy() * g1 + kl_divergence(pi2, a) * g2).sum(), x2)
    torch.testing.assert_close(got, want)
    # the closed forms the kernels implement: dH/dx = -p (log p + H), dKL/dx = p (log p - log a - KL)
    p, logp, loga = pi.probs, pi.logits, a.logits
    H, KL = d["entropy"].detach()[..., None], d["kl"].detach()[..., None]
    closed = (-p * (logp + H) * g1[..., None] + p * (logp - loga - KL) * g2[..., None]) / tau
    torch.testing.assert_close(got, closed.detach())


def test_identities(gen):
    pol, pri, y = make(gen, V=50)
    st = paired_token_stats(pol, pol.clone(), y, entropy=True, kl=True)
    torch.testing.assert_close(st.kl, torch.zeros_like(st.kl), atol=1e-12, rtol=0)
    st = paired_token_stats(pol, pri, y, entropy=True, kl=True)
    assert (st.kl > 0).all() and (st.entropy > 0).all() and (st.entropy <= math.log(50) + 1e-12).all()
    uniform = paired_token_stats(torch.zeros(2, 50, dtype=torch.float64), None, torch.zeros(2, dtype=torch.long),
                                 entropy=True)
    torch.testing.assert_close(uniform.entropy, torch.full((2,), math.log(50), dtype=torch.float64))
    # KL(pi || a) = sum_a pi (log pi - log a), the sum over the vocabulary written out
    logp, loga = torch.log_softmax(pol, -1), torch.log_softmax(pri, -1)
    torch.testing.assert_close(st.kl, (logp.exp() * (logp - loga)).sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_public_op_torch_backend(dtype, gen):
    pol, pri, y = make(gen, dtype=dtype)
    pol.requires_grad_(True)
    pri.requires_grad_(True)  # the prior never gets a gradient, even when its logits ask for one
    mask = torch.rand(3, 4, generator=gen) > 0.3
    mask[1] = False
    st = paired_token_stats(pol, pri, y, mask=mask, entropy=True, kl=True, temperature=0.8, backend="torch")
    assert isinstance(st, PairedTokenStats)
    for f in st._fields:
        assert getattr(st, f).dtype == torch.float32, f
    assert st.policy_seq.shape == (3,) and st.policy_seq[1] == 0 and st.prior_seq[1] == 0
    for t in (st.prior_lp, st.prior_lse, st.prior_seq, st.prior_max, st.policy_max):
        assert not t.requires_grad
    for t in (st.policy_lp, st.policy_lse, st.entropy, st.kl, st.policy_seq):
        assert t.requires_grad
    torch.testing.assert_close(st.policy_seq, fdpg.sequence_logprobs(st.policy_lp, mask))
    ref = reference.paired_token_stats(pol.detach().double(), pri.detach().double(), y, mask, True, True, 0.8)
    for f in st._fields:
        torch.testing.assert_close(getattr(st, f).double(), ref[f], rtol=1e-5, atol=1e-5, msg=f)
    (st.entropy.sum() + st.kl.sum() + st.policy_seq.sum()).backward()
    assert pol.grad is not None and torch.isfinite(pol.grad).all() and pri.grad is None
    # backend "auto" on CPU tensors is the torch path; float64 stays float64 there
    st64 = paired_token_stats(pol.detach().double(), None, y, entropy=True)
    assert st64.policy_lp.dtype == torch.float64 and st64.kl is None and st64.prior_lp is None


def test_banned_tokens_and_masked_padding(gen):
    pol, pri, y = make(gen, V=20)
    pol[..., :5] = -math.inf
    pri[..., :3] = -math.inf
    y = y.clamp_min(5)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[:, 2:] = False
    y[:, 2:] = 0  # padding: a banned token, log-prob -inf, masked out of the sums exactly
    x = pol.clone().requires_grad_(True)
    st = paired_token_stats(x, pri, y, mask=mask, entropy=True, kl=True)
    assert torch.isfinite(st.entropy).all() and torch.isfinite(st.kl).all()
    assert (st.policy_lp[:, 2:] == -math.inf).all() and torch.isfinite(st.policy_seq).all()
    (st.entropy.sum() + st.kl.sum() + st.policy_seq.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[..., :5] == 0).all()
    # the prior banning a token the policy allows: KL(pi || a) is +inf, not NaN
    st = paired_token_stats(pol, pri.clone().fill_(0).index_fill_(-1, torch.tensor([7]), -math.inf), y, kl=True,
                            validate=False)
    assert (st.kl == math.inf).all()


def test_compile_fullgraph_torch_backend(gen):
    pol, pri, y = make(gen, dtype=torch.float32)
    mask = torch.rand(3, 4, generator=gen) > 0.3

    def step(p):
        st = paired_token_stats(p * 1.0, pri, y, mask=mask, entropy=True, kl=True, backend="torch", validate=False)
        return st.policy_seq.sum() + 0.1 * st.entropy.sum() - st.kl.sum() + st.policy_lse.sum()

    torch._dynamo.reset()
    p1, p2 = pol.clone().requires_grad_(True), pol.clone().requires_grad_(True)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(p1)
    out.backward()
    want = step(p2)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(p1.grad, p2.grad)


def test_bad_inputs(gen):
    pol, pri, y = make(gen, dtype=torch.float32)
    with pytest.raises(ValueError, match="kl: KL.*needs prior_logits"):
        paired_token_stats(pol, None, y, kl=True)
    with pytest.raises(ValueError, match="prior_logits: vocabulary size 30 differs from policy_logits' 29"):
        paired_token_stats(pol, torch.randn(3, 4, 30), y)
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 4\)"):
        paired_token_stats(pol, pri, y, mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: every position"):
        paired_token_stats(pol, pri, y, mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected a torch.Tensor"):
        paired_token_stats(pol, pri, y, mask=[[1] * 4] * 3)
    with pytest.raises(ValueError, match="mask: needs targets with at least one dim"):
        paired_token_stats(pol[0, 0], None, y[0, 0], mask=torch.tensor(True))
    with pytest.raises(ValueError, match=r"targets: token ids must lie in \[0, 29\)"):
        paired_token_stats(pol, pri, y + 29)
    with pytest.raises(ValueError, match="prior_logits: .*NaN"):
        paired_token_stats(pol, torch.full_like(pri, math.nan), y)
    with pytest.raises(ValueError, match="backend: expected one of"):
        paired_token_stats(pol, pri, y, backend="fast")
    with pytest.raises(ValueError, match="backend: 'cuda' needs CUDA tensors"):
        paired_token_stats(pol, pri, y, backend="cuda")


def test_inference_mode_prior_and_tokens_with_kl(gen):
    """A prior scored (and tokens sampled) under torch.inference_mode can feed the differentiable KL."""
    V = 37
    pol = torch.randn(2, 3, V, generator=gen).requires_grad_(True)
    with torch.inference_mode():
        pri = torch.randn(2, 3, V, generator=gen)
        y = torch.randint(0, V, (2, 3), generator=gen)
        mask = torch.ones(2, 3, dtype=torch.bool)
    for backend in ("torch", "triton"):
        st = paired_token_stats(pol, pri, y, mask=mask, kl=True, entropy=True, backend=backend)
        (g,) = torch.autograd.grad((st.kl.sum() + st.policy_seq.sum() + st.entropy.sum()), pol)
        assert torch.isfinite(g).all()
