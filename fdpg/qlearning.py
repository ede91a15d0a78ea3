"""KL-control by token-level Q-learning from a fixed batch (Jaques et al. 2019), as pure tensor functions.

Layout of every ``[B, T]`` tensor: position ``t`` holds the action ``a_t = y_t`` taken in state
``s_t = (c, y_<t)``; ``mask`` marks the sampled tokens (up to and including EOS). A sequence reward ``R(x)`` is
paid at its last unmasked token, where ``done_t = 1``. ``next_value[:, t]`` is the bootstrap value of the state
``s_{t+1}`` reached by ``a_t`` (the target network's value at position ``t + 1``; see :func:`shift_next`).

Psi-learning (soft Q-learning with the prior as reference):
``y_t = r_t / beta + log a(a_t | s_t) + gamma (1 - done_t) V'(s_{t+1})``, ``V'(s) = logsumexp_a Q'(s, a)``.
Q-learning with a KL-control reward: ``y_t = r_t + c k_t + gamma (1 - done_t) max_a Q'(s_{t+1}, a)``.
The Q-value of the action taken is the policy's logit ``z[a_t] = log pi(a_t | s_t) + logsumexp(z)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "last_token", "token_rewards", "shift_next", "psi_targets", "q_targets", "td_loss", "optimal_psi",
    "reference_td_loss",
]


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """``done [B, T]`` bool: True at each row's last unmasked position (none for a fully masked row)."""
    m = mask.bool()
    T = m.shape[-1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(-1, keepdim=True)
    return m & (pos == last)


def token_rewards(reward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards ``r [B, T]`` float32: the sequence reward ``[B]`` at the last token, 0 elsewhere."""
    done = last_token(mask)
    return torch.where(done, reward.to(torch.float32)[:, None], torch.zeros((), device=reward.device))


def shift_next(values: torch.Tensor) -> torch.Tensor:
    """``values[:, t] -> values[:, t + 1]`` with 0 in the last column: the value of the state after ``a_t``."""
    return F.pad(values[..., 1:], (0, 1))


def psi_targets(prior_lp: torch.Tensor, next_value: torch.Tensor, rewards: torch.Tensor, done: torch.Tensor, *,
                beta: float, gamma: float = 1.0) -> torch.Tensor:
    """Psi-learning regression targets ``y [B, T]`` (no grad): see the module docstring."""
    if not beta > 0:
        raise ValueError(f"beta: expected a positive number, got {beta}")
    cont = (~done.bool()).to(next_value.dtype)
    return (rewards / beta + prior_lp + gamma * cont * next_value).detach()


def q_targets(rewards: torch.Tensor, kl_reward: torch.Tensor | None, next_value: torch.Tensor,
              done: torch.Tensor, *, weight: float = 0.0, gamma: float = 1.0) -> torch.Tensor:
    """Q-learning targets ``y = r + c k + gamma (1 - done) max_a Q'(s', a)`` ``[B, T]`` (no grad)."""
    cont = (~done.bool()).to(next_value.dtype)
    y = rewards + gamma * cont * next_value
    if kl_reward is not None and weight:
        y = y + weight * kl_reward
    return y.detach()


def td_loss(q_taken: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, kind: str = "huber") -> torch.Tensor:
    """Huber (smooth L1) or squared error between ``Q(s_t, a_t)`` and the fixed targets, mean over unmasked tokens.
    ``q_taken``, ``targets``, ``mask``: one shape (e.g. ``[B, T]``)."""
    for name, t in (("targets", targets), ("mask", mask)):
        if tuple(t.shape) != tuple(q_taken.shape):
            raise ValueError(f"{name}: expected shape {tuple(q_taken.shape)} like q_taken, got {tuple(t.shape)}")
    m = mask.bool()
    if kind == "huber":
        per = F.smooth_l1_loss(q_taken, targets.detach(), reduction="none")
    elif kind == "mse":
        per = (q_taken - targets.detach()) ** 2
    else:
        raise ValueError(f"loss: expected 'huber' or 'mse', got {kind!r}")
    return torch.where(m, per, torch.zeros((), dtype=per.dtype, device=per.device)).sum() / m.sum().clamp_min(1)


def reference_td_loss(policy_logits: torch.Tensor, prior_logits: torch.Tensor, target_logits, tokens: torch.Tensor,
                      mask: torch.Tensor, reward: torch.Tensor, *, algorithm: str, beta: float = 1.0,
                      gamma: float = 1.0, kl_kind: str = "none", kl_weight: float = 0.0, loss: str = "huber"):
    """The straightforward TD loss, as Jaques et al.'s code computes it: full log-softmaxes of policy and prior (and
    the softmax of the policy for the exact KL) over the vocabulary. A reference for tests and benchmarks, not for
    training: it holds several float32 ``[B, T, V]`` tensors beside the logits.

    ``policy_logits``, ``prior_logits`` ``[B, T, V]`` (position t scores token t); ``target_logits``: a list of the
    target network's ``[B, T, V]`` logits, one per Monte-Carlo pass (the bootstrap is their minimum);
    ``algorithm`` "psi_learning" | "q_learning". Returns ``(loss, q_taken [B, T], targets [B, T])``.
    """
    idx = tokens[..., None]
    logp = torch.log_softmax(policy_logits.float(), -1)
    loga = torch.log_softmax(prior_logits.detach().float(), -1)
    q_taken = policy_logits.float().gather(-1, idx).squeeze(-1)
    prior_lp = loga.gather(-1, idx).squeeze(-1)
    with torch.no_grad():
        if algorithm == "psi_learning":
            v = torch.stack([torch.logsumexp(z.float(), -1) for z in target_logits]).amin(0)
        else:
            v = torch.stack([z.float().amax(-1) for z in target_logits]).amin(0)
    next_v = shift_next(v)
    done = last_token(mask)
    r = token_rewards(reward, mask)
    if algorithm == "psi_learning":
        y = psi_targets(prior_lp, next_v, r, done, beta=beta, gamma=gamma)
    else:
        k = None
        if kl_kind == "sampled":
            k = prior_lp - logp.gather(-1, idx).squeeze(-1).detach()
        elif kl_kind == "exact":
            k = -(logp.exp() * (logp - loga)).sum(-1).detach()
        y = q_targets(r, k, next_v, done, weight=kl_weight, gamma=gamma)
    return td_loss(q_taken, y, mask, loss), q_taken, y


def optimal_psi(cond_logprobs: Callable[[torch.Tensor], torch.Tensor], reward: Callable[[torch.Tensor], torch.Tensor],
                vocab_size: int, max_length: int, eos_token_id: int | None, *, beta: float):
    """The fixed point of Psi-learning (gamma = 1) on a listable space, by backward recursion over prefixes.

    ``cond_logprobs(prefixes [M, t]) -> [M, V]`` gives ``log a(. | prefix)`` (float64 preferred);
    ``reward(sequences [M, t]) -> [M]`` the reward of finished sequences (EOS included where present). A sequence
    ends at EOS or at ``max_length`` tokens. Returns ``{t: (prefixes [M_t, t], psi [M_t, V])}`` for every live
    prefix length t (prefixes without EOS), with ``psi(s, a) = log a(a | s) + (R(s a) / beta if s a is finished
    else V(s a))`` and ``V(s) = logsumexp_a psi(s, a)``; ``V(empty prefix)`` is log Z of ``a(x) exp(R(x)/beta)``.
    """
    V = vocab_size
    tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    next_v: torch.Tensor | None = None  # V(s a) for the live prefixes of length t + 1, in their enumeration order
    for t in range(max_length - 1, -1, -1):
        prefixes = _live_prefixes(V, t, eos_token_id)
        la = cond_logprobs(prefixes).to(torch.float64)
        M = prefixes.shape[0]
        ext = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(M)[:, None]], 1)  # [M*V, t+1]
        finished = torch.full((M * V,), t + 1 == max_length)
        if eos_token_id is not None:
            finished |= ext[:, -1] == eos_token_id
        cont = torch.full((M * V,), -math.inf, dtype=torch.float64)
        if finished.any():
            cont[finished] = reward(ext[finished]).to(torch.float64) / beta
        if (~finished).any():
            # live extensions of length t + 1 are enumerated in the same order by _live_prefixes(V, t + 1, eos)
            cont[~finished] = next_v
        psi = la + cont.view(M, V)
        tables[t] = (prefixes, psi)
        next_v = torch.logsumexp(psi, -1)
    return tables


def _live_prefixes(V: int, t: int, eos_token_id: int | None) -> torch.Tensor:
    """All prefixes of length t without EOS, in lexicographic order: ``[M, t]`` int64."""
    tokens = [a for a in range(V) if a != eos_token_id]
    if t == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    grid = torch.cartesian_prod(*[torch.tensor(tokens)] * t) if t > 1 else torch.tensor(tokens)[:, None]
    return grid.reshape(-1, t)
