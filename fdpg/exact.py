"""Exact evaluation on spaces small enough to list: every sequence, its probability, every metric.

The space: all continuations of at most ``max_length`` tokens from a vocabulary of ``V``, ending at their first EOS
or at the length limit (exactly what :func:`fdpg.sampling.sample` draws). It is scored without listing every
sequence to the model: one forward pass over each EOS-free prefix of length ``max_length - 1`` gives the
next-token distribution at every position, hence the log-probability of every sequence extending one of its
prefixes (a sequence ending in EOS early, or a full-length one), so the model sees ``(V-1)^(T-1)`` rows for
``N ~ V (V-1)^(T-1)`` sequences.

    >>> space = enumerate_space(vocab_size=6, max_length=4, eos_token_id=0)
    >>> lp = space_logprobs(model, space)                 # [N] float64; exp(lp).sum() == 1
    >>> m = exact_metrics(lp_pi, lp_a, log_b)             # kl_p_pi, kl_pi_p, kl_pi_a, tv, js, log_z, ...
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

__all__ = ["Space", "space_size", "enumerate_space", "space_logprobs", "exact_metrics"]


def space_size(vocab_size: int, max_length: int, eos_token_id: int | None) -> int:
    """Number of sequences in the space (Python int, exact)."""
    _check_space(vocab_size, max_length, eos_token_id)
    V, T = vocab_size, max_length
    if eos_token_id is None:
        return V ** T
    # ends with EOS at length L < T: (V-1)^(L-1); full length T (last token free): (V-1)^(T-1) V
    return sum((V - 1) ** (L - 1) for L in range(1, T)) + (V - 1) ** (T - 1) * V


def _check_space(vocab_size, max_length, eos_token_id) -> None:
    for name, v in (("vocab_size", vocab_size), ("max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or not 0 <= eos_token_id < vocab_size):
        raise ValueError(f"eos_token_id: expected None or a token id in [0, {vocab_size}), got {eos_token_id!r}")


@dataclass
class Space:
    """Every sequence: tokens ``[N, T]`` long (padding after the end), mask ``[N, T]`` bool; how to score them:
    prefixes ``[M, T-1]`` (the rows the model sees), and for sequence n its prefix row ``row[n]``, the position
    of its last token ``last_pos[n]`` and that token ``last_tok[n]`` (sequences sorted by row)."""

    vocab_size: int
    max_length: int
    eos_token_id: int | None
    tokens: torch.Tensor
    mask: torch.Tensor
    prefixes: torch.Tensor
    row: torch.Tensor
    last_pos: torch.Tensor
    last_tok: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _grid(alphabet: torch.Tensor, n: int) -> torch.Tensor:
    """All ``len(alphabet)^n`` words of length n, lexicographic: ``[M, n]``."""
    if n == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    if n == 1:
        return alphabet[:, None].clone()
    return torch.cartesian_prod(*[alphabet] * n).reshape(-1, n)


def enumerate_space(vocab_size: int, max_length: int, eos_token_id: int | None, *,
                    max_size: int | None = None) -> Space:
    """List the space (raises ValueError when it holds more than ``max_size`` sequences)."""
    V, T, eos = vocab_size, max_length, eos_token_id
    n = space_size(V, T, eos)
    if max_size is not None and n > max_size:
        raise ValueError(f"the space holds {n:.3g} sequences (vocabulary {V}, max_length {T}), more than "
                         f"{max_size:.3g}; too many to list")
    pad = 0 if eos is None else eos
    alphabet = torch.tensor([a for a in range(V) if a != eos], dtype=torch.long)
    if len(alphabet) == 0:
        raise ValueError(f"the vocabulary of {V} token(s) holds nothing but EOS")
    prefixes = _grid(alphabet, T - 1)                              # [M, T-1], no EOS
    M = prefixes.shape[0]
    rows, poss, toks, seqs, lens = [], [], [], [], []
    # full-length sequences: prefix + any token
    r = torch.arange(M).repeat_interleave(V)
    last = torch.arange(V).repeat(M)
    rows.append(r), poss.append(torch.full_like(r, T - 1)), toks.append(last)
    seqs.append(torch.cat([prefixes[r], last[:, None]], 1)), lens.append(torch.full_like(r, T))
    if eos is not None:
        # ends at EOS at position L - 1 < T - 1: one canonical row per prefix y_<L (the rest of the row = a[0])
        for L in range(1, T):
            canon = (prefixes[:, L - 1:] == alphabet[0]).all(1) if L - 1 < T - 1 else torch.ones(M, dtype=torch.bool)
            r = canon.nonzero().squeeze(1)
            s = torch.full((r.shape[0], T), pad, dtype=torch.long)
            s[:, :L - 1] = prefixes[r, :L - 1]
            s[:, L - 1] = eos
            rows.append(r), poss.append(torch.full_like(r, L - 1)), toks.append(torch.full_like(r, eos))
            seqs.append(s), lens.append(torch.full_like(r, L))
    row, order = torch.cat(rows).sort(stable=True)
    tokens = torch.cat(seqs)[order]
    n_tok = torch.cat(lens)[order]
    mask = torch.arange(T)[None, :] < n_tok[:, None]
    assert tokens.shape[0] == n, (tokens.shape[0], n)
    return Space(V, T, eos, tokens, mask, prefixes, row, torch.cat(poss)[order], torch.cat(toks)[order])


@torch.no_grad()
def space_logprobs(model, space: Space, *, context: list[int] | None = None, bos_token_id: int = 0,
                   rows_per_batch: int | None = None, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``log model(x | context)`` for every sequence of the space: ``[N]`` float64 (on the model's device).

    ``context`` defaults to ``[bos_token_id]``. Logits are normalised in float64.
    """
    dev = next(model.parameters()).device
    ctx = torch.tensor(context if context is not None else [bos_token_id], dtype=torch.long, device=dev)
    P, T, V = ctx.shape[0], space.max_length, space.vocab_size
    prefixes = space.prefixes.to(dev)
    M = prefixes.shape[0]
    if rows_per_batch is None:
        rows_per_batch = max(1, (1 << 22) // max(1, (P + T) * V))
    row, last_pos, last_tok = space.row.to(dev), space.last_pos.to(dev), space.last_tok.to(dev)
    out = torch.empty(len(space), dtype=torch.float64, device=dev)
    bounds = torch.searchsorted(row, torch.arange(0, M + rows_per_batch, rows_per_batch, device=dev)).tolist()
    amp = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    for i, r0 in enumerate(range(0, M, rows_per_batch)):
        pre = prefixes[r0:r0 + rows_per_batch]
        m = pre.shape[0]
        ids = torch.cat([ctx.expand(m, P), pre], 1)
        with amp:
            logits = model(input_ids=ids, use_cache=False).logits[:, P - 1:]   # [m, T, V]
        logsm = torch.log_softmax(logits.double(), -1)
        taken = logsm[:, :T - 1].gather(-1, pre[:, :, None]).squeeze(-1)       # [m, T-1]
        cum = torch.cat([torch.zeros(m, 1, dtype=torch.float64, device=dev), taken.cumsum(1)], 1)  # [m, T]
        a, b = bounds[i], bounds[i + 1]
        lr, lpos = row[a:b] - r0, last_pos[a:b]
        out[a:b] = cum[lr, lpos] + logsm[lr, lpos, last_tok[a:b]]
    return out


def _sum(x: torch.Tensor) -> float:
    return float(x.sum())


def exact_metrics(log_pi: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, *,
                  satisfied: torch.Tensor | None = None, log_b_raw: torch.Tensor | None = None,
                  reward: torch.Tensor | None = None, features: torch.Tensor | None = None) -> dict:
    """Every metric of MATH.md, exactly, over a whole space: inputs ``[N]`` (features ``[N, K]``), any float dtype
    (computed in float64). ``log_b`` is the target's (floored) log b; ``log_b_raw`` the unfloored one for E_pi[b].

    Returns floats: kl_p_pi, kl_pi_p (inf where pi puts mass outside p's support), kl_pi_a, tv, js, log_z,
    e_pi_b, constraint_satisfaction (E_pi[1[constraints]], 1 without constraints), pi_mass (sum_x pi(x)), and
    reward (E_pi[r]) and moments (E_pi[phi], a list) when given.
    """
    f64 = torch.float64
    lpi, la, lb = log_pi.to(f64), log_a.to(f64), log_b.to(f64)
    lP = la + lb
    log_z = torch.logsumexp(lP, 0)
    if not bool(torch.isfinite(log_z)):
        raise ValueError(f"log_a + log_b: the target's mass over the space is {float(log_z.exp())} (log Z = "
                         f"{float(log_z)}); expected a finite Z > 0 (some sequence with P(x) > 0)")
    lp = lP - log_z
    pi, p = lpi.exp(), lp.exp()
    zero = torch.zeros_like(pi)
    out = {
        "kl_p_pi": _sum(torch.where(p > 0, p * (lp - lpi), zero)),
        "kl_pi_p": _sum(torch.where(pi > 0, pi * (lpi - lp), zero)),
        "kl_pi_a": _sum(torch.where(pi > 0, pi * (lpi - la), zero)),
        "tv": 0.5 * _sum((pi - p).abs()),
    }
    m = torch.logaddexp(lpi, lp)
    js_pi = torch.where(pi > 0, pi * (math.log(2.0) + lpi - m), zero)
    js_p = torch.where(p > 0, p * (math.log(2.0) + lp - m), zero)
    out["js"] = 0.5 * _sum(js_pi + js_p)
    out["log_z"] = float(log_z)
    raw = lb if log_b_raw is None else log_b_raw.to(f64)
    out["e_pi_b"] = _sum(pi * raw.exp())
    out["constraint_satisfaction"] = 1.0 if satisfied is None else _sum(pi * satisfied.to(f64))
    out["pi_mass"] = _sum(pi)
    if reward is not None:
        out["reward"] = _sum(pi * reward.to(f64))
    if features is not None:
        out["moments"] = (pi @ features.to(f64)).tolist()
    return out
