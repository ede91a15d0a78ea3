import math

import pytest
import torch

from fdpg import qlearning as Q


def table_prior(V, seed=0):
    """A fixed random autoregressive prior over a tiny vocabulary: log a(. | prefix) from a hash of the prefix."""
    def cond(prefixes):
        out = []
        for row in prefixes.tolist():
            g = torch.Generator().manual_seed(hash((seed, *row)) % (2**31))
            out.append(torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1))
        return torch.stack(out) if out else torch.zeros(0, V, dtype=torch.float64)
    return cond


def all_sequences(V, T, eos):
    seqs = []

    def rec(prefix):
        for a in range(V):
            s = prefix + [a]
            if a == eos or len(s) == T:
                seqs.append(s)
            else:
                rec(s)
    rec([])
    return seqs


@pytest.mark.parametrize("eos", [0, None])
def test_optimal_psi_induces_p_beta_and_v0_is_log_z(eos):
    V, T, beta = 4, 4, 0.7
    cond = table_prior(V)
    reward = lambda seqs: (seqs == 2).sum(-1).to(torch.float64) * 1.3 - 0.5 * (seqs == 3).sum(-1)
    tables = Q.optimal_psi(cond, reward, V, T, eos, beta=beta)
    psi = {tuple(p): row for t, (ps, rows) in tables.items() for p, row in zip(ps.tolist(), rows)}
    seqs = all_sequences(V, T, eos)
    log_a, log_pi, log_tilt = [], [], []
    for s in seqs:
        la = lp = 0.0
        for t in range(len(s)):
            prefix = tuple(s[:t])
            la += float(cond(torch.tensor([list(prefix)], dtype=torch.long).reshape(1, t))[0, s[t]])
            lp += float(torch.log_softmax(psi[prefix], -1)[s[t]])
        log_a.append(la)
        log_pi.append(lp)
        log_tilt.append(float(reward(torch.tensor([s]))[0]) / beta)
    log_a, log_pi = torch.tensor(log_a, dtype=torch.float64), torch.tensor(log_pi, dtype=torch.float64)
    log_P = log_a + torch.tensor(log_tilt, dtype=torch.float64)
    log_z = torch.logsumexp(log_P, 0)
    assert torch.logsumexp(log_a, 0).abs() < 1e-12  # the prior is normalised over the listed space
    assert (log_pi.exp() - (log_P - log_z).exp()).abs().max() < 1e-6
    v0 = torch.logsumexp(tables[0][1][0], 0)
    assert abs(float(v0 - log_z)) < 1e-9


def test_token_layout_helpers():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    done = Q.last_token(mask)
    assert done.tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    r = Q.token_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    assert r.tolist() == [[0, 0, 2, 0], [0, 0, 0, -1], [0, 0, 0, 0]]
    v = torch.arange(12.0).view(3, 4)
    assert Q.shift_next(v).tolist() == [[1, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]]
    prior_lp = -torch.rand(3, 4)
    y = Q.psi_targets(prior_lp, Q.shift_next(v), r, done, beta=2.0)
    expect = r / 2.0 + prior_lp + (~done).float() * Q.shift_next(v)
    torch.testing.assert_close(y, expect)
    yq = Q.q_targets(r, -torch.ones(3, 4), Q.shift_next(v), done, weight=0.1, gamma=0.9)
    torch.testing.assert_close(yq, r - 0.1 + 0.9 * (~done).float() * Q.shift_next(v))
    with pytest.raises(ValueError, match="beta"):
        Q.psi_targets(prior_lp, v, r, done, beta=0.0)


def test_td_loss_masks_and_kinds():
    q = torch.tensor([[0.0, 3.0], [1.0, 100.0]], requires_grad=True)
    y = torch.tensor([[0.5, 0.0], [1.0, -100.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    huber = Q.td_loss(q, y, mask, "huber")
    assert math.isclose(float(huber.detach()), (0.125 + 2.5 + 0.0) / 3, rel_tol=1e-6)
    mse = Q.td_loss(q, y, mask, "mse")
    assert math.isclose(float(mse.detach()), (0.25 + 9.0) / 3, rel_tol=1e-6)
    mse.backward()
    assert q.grad[1, 1] == 0
    with pytest.raises(ValueError, match="loss"):
        Q.td_loss(q, y, mask, "l1")
    with pytest.raises(ValueError, match=r"targets: expected shape \(2, 2\) like q_taken"):
        Q.td_loss(q, y[:1], mask, "mse")
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 2\)"):
        Q.td_loss(q, y, mask[:, :1], "mse")


def test_optimal_psi_on_a_tiny_gpt2_prior_matches_the_exact_evaluator():
    """The fixed point through the models API: V(s_0) = log Z of the exact evaluator, and softmax(Psi) along each
    sequence is p_beta(x) = a(x) exp(R(x)/beta) / Z (float64)."""
    from fdpg import exact
    from fdpg.models import build_tiny
    from fdpg.targets import SeqBatch, Target, token_count

    torch.set_num_threads(1)
    V, T, eos, beta = 5, 4, 0, 0.8
    prior = build_tiny(vocab_size=V, n_layer=2, n_embd=32, seed=0, initializer_range=0.3)

    @torch.no_grad()
    def cond(prefixes):
        ids = torch.cat([torch.full((prefixes.shape[0], 1), eos), prefixes], 1)  # BOS = EOS, as GPT-2
        return torch.log_softmax(prior(input_ids=ids).logits[:, -1].double(), -1)

    target = Target(reward=token_count(2, weight=1.5), beta=beta)

    def reward(seqs):
        return target.reward(SeqBatch(seqs, torch.ones_like(seqs, dtype=torch.bool))).double()

    tables = Q.optimal_psi(cond, reward, V, T, eos, beta=beta)
    space = exact.enumerate_space(V, T, eos)
    la = exact.space_logprobs(prior, space)
    log_b = target.score(SeqBatch(space.tokens, space.mask)).log_b.double()
    log_z = torch.logsumexp(la + log_b, 0)
    assert abs(float(torch.logsumexp(tables[0][1][0], 0) - log_z)) < 1e-6
    psi = {tuple(p): torch.log_softmax(row, -1) for t, (ps, rows) in tables.items() for p, row in zip(ps.tolist(), rows)}
    log_pi = torch.tensor([sum(float(psi[tuple(s[:t])][s[t]]) for t in range(int(m.sum())))
                           for s, m in zip(space.tokens.tolist(), space.mask)], dtype=torch.float64)
    p_beta = (la + log_b - log_z).exp()
    assert (log_pi.exp() - p_beta).abs().max() < 1e-6
    m = exact.exact_metrics(log_pi, la, log_b)
    assert m["kl_p_pi"] < 1e-9 and abs(m["pi_mass"] - 1) < 1e-9
