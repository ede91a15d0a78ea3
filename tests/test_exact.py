"""Exact evaluation: the listed space, sum_x pi(x) = 1, per-sequence log-probs, and every exact metric."""
import math

import pytest
import torch

import fdpg
from fdpg.exact import enumerate_space, exact_metrics, space_logprobs, space_size
from fdpg.models import build_tiny, model_inputs, score_tokens

torch.set_num_threads(1)


@pytest.mark.parametrize("V,T,eos", [(4, 1, 0), (4, 3, 0), (3, 4, 2), (5, 2, None), (2, 3, 1), (2, 1, None)])
def test_space_lists_every_sequence_once(V, T, eos):
    sp = enumerate_space(V, T, eos)
    assert len(sp) == space_size(V, T, eos)
    seqs = [tuple(r[:k]) for r, k in zip(sp.tokens.tolist(), sp.mask.sum(1).tolist())]
    assert len(set(seqs)) == len(seqs)
    # brute force: every word of length <= T that ends at its first EOS or has length T
    from itertools import product

    want = set()
    for L in range(1, T + 1):
        for w in product(range(V), repeat=L):
            if eos is not None and eos in w[:-1]:
                continue
            if L == T or (eos is not None and w[-1] == eos):
                want.add(w)
    assert set(seqs) == want
    pad = 0 if eos is None else eos
    assert bool((sp.tokens[~sp.mask] == pad).all())


def test_space_too_large():
    with pytest.raises(ValueError, match="too many"):
        enumerate_space(50, 6, 0, max_size=10**6)


def test_space_and_metrics_bad_arguments():
    with pytest.raises(ValueError, match="max_length: expected an int >= 1, got 0"):
        space_size(3, 0, 0)
    with pytest.raises(ValueError, match="max_length"):
        enumerate_space(3, 0, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        enumerate_space(0, 2, None)
    for eos in (5, -1):
        with pytest.raises(ValueError, match=r"eos_token_id: expected None or a token id in \[0, 3\)"):
            enumerate_space(3, 2, eos)
    lpi = torch.log_softmax(torch.randn(4, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="expected a finite Z > 0"):
        exact_metrics(lpi, lpi, torch.full((4,), -math.inf, dtype=torch.float64))


@pytest.fixture(scope="module")
def model():
    return build_tiny(5, n_layer=2, n_embd=16, seed=1, eos_token_id=0, initializer_range=0.5)


@pytest.mark.parametrize("T,eos,context", [(4, 0, None), (1, 0, None), (3, None, None), (3, 0, [0, 2, 4])])
def test_probabilities_sum_to_one_and_match_scoring(model, T, eos, context):
    sp = enumerate_space(5, T, eos)
    lp = space_logprobs(model, sp, context=context, rows_per_batch=7)     # odd chunks on purpose
    assert lp.dtype == torch.float64
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    ctx = torch.tensor([context or [0]] * len(sp))
    inp = model_inputs(ctx, None, sp.tokens)
    tok_lp, _ = score_tokens(model, None, inp, sp.tokens, fused=False, with_prior=False, policy_grad=False)
    torch.testing.assert_close(lp, fdpg.sequence_logprobs(tok_lp, sp.mask).double(), atol=2e-5, rtol=0)


def reference_metrics(log_pi, log_a, log_b):
    """The library's IS estimates with the whole space as the batch and q uniform: exact (MATH.md's check)."""
    N = log_pi.shape[0]
    log_q = torch.full_like(log_pi, -math.log(N))
    return fdpg.divergence_estimates(log_pi, log_q, log_a + log_b, log_a)


def test_exact_metrics_against_the_estimator_on_the_whole_space(gen):
    N = 50
    log_pi = torch.log_softmax(torch.randn(N, generator=gen, dtype=torch.float64), 0)
    log_a = torch.log_softmax(torch.randn(N, generator=gen, dtype=torch.float64), 0)
    log_b = torch.randn(N, generator=gen, dtype=torch.float64)
    m = exact_metrics(log_pi, log_a, log_b)
    r = reference_metrics(log_pi, log_a, log_b)
    for k in ("kl_p_pi", "kl_pi_p", "kl_pi_a", "tv", "js", "log_z"):
        assert m[k] == pytest.approx(float(r[k]), abs=1e-12, rel=1e-9), k
    assert m["e_pi_b"] == pytest.approx(float((log_pi + log_b).exp().sum()))
    assert m["pi_mass"] == pytest.approx(1.0) and m["constraint_satisfaction"] == 1.0


def test_exact_metrics_with_a_pointwise_constraint(gen):
    N = 40
    log_pi = torch.log_softmax(torch.randn(N, generator=gen, dtype=torch.float64), 0)
    log_a = torch.log_softmax(torch.randn(N, generator=gen, dtype=torch.float64), 0)
    sat = torch.rand(N, generator=gen) < 0.5
    log_b = torch.where(sat, 0.0, -math.inf).double()
    reward = torch.randn(N, generator=gen, dtype=torch.float64)
    phi = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    m = exact_metrics(log_pi, log_a, log_b, satisfied=sat, reward=reward, features=phi)
    pi = log_pi.exp()
    assert m["log_z"] == pytest.approx(math.log(log_a.exp()[sat].sum().item()))
    assert m["kl_pi_p"] == math.inf                          # pi puts mass where p = 0
    assert m["constraint_satisfaction"] == pytest.approx(pi[sat].sum().item()) == pytest.approx(m["e_pi_b"])
    assert m["reward"] == pytest.approx((pi * reward).sum().item())
    assert m["moments"] == pytest.approx((pi @ phi).tolist())
    r = reference_metrics(log_pi, log_a, log_b)
    for k in ("kl_p_pi", "kl_pi_a", "tv", "js"):
        assert m[k] == pytest.approx(float(r[k]), abs=1e-12, rel=1e-9), k
    # pi = p: every divergence is 0
    p = log_a + log_b - torch.logsumexp(log_a + log_b, 0)
    m0 = exact_metrics(p, log_a, log_b, satisfied=sat)
    for k in ("kl_p_pi", "kl_pi_p", "tv", "js"):
        assert m0[k] == pytest.approx(0.0, abs=1e-12)
    assert m0["kl_pi_a"] == pytest.approx(-m0["log_z"])      # the best achievable KL(p||a) = -log Z
