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
