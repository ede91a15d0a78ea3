"""Pure-torch ground truth of every fdpg op: readable, differentiable by autograd, float64-capable.

These functions do no argument checking (the public ops in :mod:`fdpg.ops` do) and are what every faster
backend is tested against. Inputs of any float dtype are computed in ``promote(dtype, float32)``: float32 for
fp16/bf16/fp32, float64 for float64 (the tests' reference precision).
"""
from __future__ import annotations

import math

import torch

from .divergences import Divergence, get as get_divergence

__all__ = [
    "token_logprobs", "token_logprobs_lse", "paired_token_logprobs", "linear_token_logprobs", "paired_linear_token_logprobs",
    "sequence_logprobs", "log_z", "fdpg_coefficients", "divergence_estimates", "LinearTokenLogprobs",
    "paired_token_stats",
]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in the accumulation dtype (no copy, no division at temperature 1)."""
    x = logits.to(_acc(logits.dtype))
    return x if temperature == 1.0 else x / temperature


def _tracked(t):
    """A normal tensor for autograd to save: inference tensors (made under torch.inference_mode) are copied."""
    if t is None or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return t
    return t.clone() if t.is_inference() else t


def token_logprobs_lse(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """``(lp, lse)``: ``lp = z[targets] - logsumexp(z)`` with ``z = logits / temperature``.

    logits ``[..., V]``, targets ``[...]`` (any integer dtype) -> two ``[...]`` tensors.
    """
    z = _scaled(logits, temperature)
    lse = torch.logsumexp(z, -1)
    return z.gather(-1, _tracked(targets).long().unsqueeze(-1)).squeeze(-1) - lse, lse


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)[..., targets]``: logits ``[..., V]``, targets ``[...]`` -> ``[...]``."""
    return token_logprobs_lse(logits, targets, temperature)[0]


def paired_token_logprobs(policy_logits, prior_logits, targets, temperature: float = 1.0):
    """``(policy_lp, prior_lp)``: the prior's log-probs are computed without autograd."""
    policy_lp = token_logprobs(policy_logits, targets, temperature)
    with torch.no_grad():
        prior_lp = token_logprobs(prior_logits.detach(), targets, temperature)
    return policy_lp, prior_lp


def sequence_logprobs(token_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked sums over the last dim: ``[B, T], [B, T] -> [B]``. Masked positions count 0 even if -inf/NaN."""
    return torch.where(mask.bool(), token_lp, torch.zeros((), dtype=token_lp.dtype, device=token_lp.device)).sum(-1)


def paired_token_stats(policy_logits, prior_logits, targets, mask=None, entropy: bool = False, kl: bool = False,
                       temperature: float = 1.0) -> dict:
    """Per-token statistics of policy (and prior) logits, plain torch (MATH.md, "Per-token quantities").

    policy_logits ``[..., V]``, prior_logits ``[..., V]`` or None, targets ``[...]``, mask ``[...]`` or None.
    With ``x = z / tau``: ``policy_lp = log_softmax(x)[y]``, ``policy_lse = logsumexp(x)``, ``policy_max =
    max(x)`` (no grad), ``entropy = H(softmax(x))``, ``kl = KL(softmax(x) || softmax(x'))``, and with a mask the
    masked sums over the last dim ``policy_seq``/``prior_seq`` ``[...[:-1]]``. Everything about the prior carries
    no grad. Returns a dict with those keys (and ``prior_lp``, ``prior_lse``, ``prior_max``); keys not asked for
    (or without a prior or mask) hold None.
    """
    out = dict.fromkeys(("policy_lp", "prior_lp", "policy_lse", "prior_lse", "entropy", "kl", "policy_seq",
                         "prior_seq", "policy_max", "prior_max"))
    prior_logits, targets, mask = _tracked(prior_logits), _tracked(targets), _tracked(mask)
    x = _scaled(policy_logits, temperature)
    lse = torch.logsumexp(x, -1)
    idx = targets.long().unsqueeze(-1)
    out["policy_lp"] = x.gather(-1, idx).squeeze(-1) - lse
    out["policy_lse"] = lse
    out["policy_max"] = x.detach().amax(-1)
    if entropy or kl:
        logp = x - lse.unsqueeze(-1)
        p = torch.exp(logp)
        live = p > 0  # p log p -> 0 as p -> 0; the where keeps -inf (banned tokens) out of values and gradients
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if entropy:
        out["entropy"] = -(p * torch.where(live, logp, zero)).sum(-1)
    if prior_logits is not None:
        with torch.no_grad():
            xa = _scaled(prior_logits.detach(), temperature)
            lse_a = torch.logsumexp(xa, -1)
            out["prior_lp"] = xa.gather(-1, idx).squeeze(-1) - lse_a
            out["prior_lse"] = lse_a
            out["prior_max"] = xa.amax(-1)
        if kl:
            loga = xa - lse_a.unsqueeze(-1)
            out["kl"] = (p * torch.where(live, logp - loga, zero)).sum(-1)
    elif kl:
        raise ValueError("kl: needs prior logits")
    if mask is not None:
        out["policy_seq"] = sequence_logprobs(out["policy_lp"], mask)
        if prior_logits is not None:
            out["prior_seq"] = sequence_logprobs(out["prior_lp"], mask)
    return out


# ---- fused output layer, chunked ----------------------------------------------------------------------------

def _chunk_rows(V: int, budget: int = 1 << 24) -> int:
    """Rows per chunk so that one chunk of float32 logits holds about ``budget`` elements (64 MiB)."""
    return max(1, budget // max(V, 1))


def _chunk_logits(h, weight, bias, temperature):
    acc = _acc(torch.promote_types(h.dtype, weight.dtype))
    z = h.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(z.dtype)
    return z / temperature


class LinearTokenLogprobs(torch.autograd.Function):
    """``(lp, lse, max)`` of ``x = (h @ W^T + b) / tau``: ``log_softmax(x)[y]``, ``logsumexp(x)``, ``max(x)``, chunk
    by chunk; backward recomputes each chunk's logits.

    Forward holds one chunk of logits at a time (never all N x V); saves only the inputs and the per-row
    logsumexp. hidden ``[N, d]``, weight ``[V, d]``, bias ``[V]`` or None, targets ``[N]`` -> three ``[N]``, float32
    (float64 for float64 inputs); ``max`` carries no gradient. Once differentiable: the gradients carry no graph,
    so a second derivative raises rather than coming out wrong.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk):
        N = hidden.shape[0]
        out_dtype = _acc(torch.promote_types(hidden.dtype, weight.dtype))
        lp, lse, mx = (torch.empty(N, dtype=out_dtype, device=hidden.device) for _ in range(3))
        for i in range(0, N, chunk):
            z = _chunk_logits(hidden[i:i + chunk], weight, bias, temperature)
            lse[i:i + chunk] = torch.logsumexp(z, -1)
            mx[i:i + chunk] = z.amax(-1)
            lp[i:i + chunk] = z.gather(-1, targets[i:i + chunk].long().unsqueeze(-1)).squeeze(-1) - lse[i:i + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(mx)
        ctx.set_materialize_grads(False)
        return lp, lse, mx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp, grad_lse, _grad_max):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_lp is None and grad_lse is None:
            return None, None, None, None, None, None
        acc = lse.dtype
        w32 = weight.to(acc)
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_b and bias is not None) else None
        g_lp = torch.zeros_like(lse) if grad_lp is None else grad_lp.to(acc)
        # d lp / d z = (onehot(y) - softmax(z)) / tau, d lse / d z = softmax(z) / tau:
        # d z = (g_lp onehot(y) - (g_lp - g_lse) softmax(z)) / tau
        g_p = g_lp if grad_lse is None else g_lp - grad_lse.to(acc)
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].to(acc)
            z = _chunk_logits(h, w32, bias, tau)
            g = torch.exp(z - lse[i:i + chunk, None]) * (-g_p[i:i + chunk, None])
            g.scatter_add_(-1, targets[i:i + chunk].long().unsqueeze(-1), g_lp[i:i + chunk, None])
            g /= tau
            if gh is not None:
                gh[i:i + chunk] = (g @ w32).to(gh.dtype)
            if gw is not None:
                gw += g.t() @ h
            if gb is not None:
                gb += g.sum(0)
        return (gh, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None, None)


def linear_token_stats(hidden, weight, targets, bias=None, temperature: float = 1.0, chunk: int | None = None):
    """``(lp, lse, max)`` through the output layer: hidden ``[..., d]``, weight ``[V, d]`` -> three ``[...]``."""
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or _chunk_rows(weight.shape[0])
    out = LinearTokenLogprobs.apply(h, weight, bias, targets.reshape(-1), float(temperature), int(chunk))
    return tuple(t.reshape(lead) for t in out)


def linear_token_logprobs(hidden, weight, targets, bias=None, temperature: float = 1.0, chunk: int | None = None):
    """Per-token log-probs through the output layer: hidden ``[..., d]``, weight ``[V, d]`` -> ``[...]``."""
    return linear_token_stats(hidden, weight, targets, bias, temperature, chunk)[0]


def paired_linear_token_logprobs(policy_hidden, policy_weight, prior_hidden, prior_weight, targets, policy_bias=None,
                                 prior_bias=None, temperature: float = 1.0, chunk: int | None = None):
    """``(policy_lp, prior_lp)`` through each model's output layer; the prior's without autograd."""
    policy_lp = linear_token_logprobs(policy_hidden, policy_weight, targets, policy_bias, temperature, chunk)
    with torch.no_grad():
        prior_lp = linear_token_logprobs(prior_hidden.detach(), prior_weight.detach(), targets,
                                         None if prior_bias is None else prior_bias.detach(), temperature, chunk)
    return policy_lp, prior_lp


# ---- sequence level ---------------------------------------------------------------------------------------

def log_z(proposal_logprob: torch.Tensor, target_logscore: torch.Tensor) -> torch.Tensor:
    """Importance-sampling estimate ``log Z = logsumexp(log P - log q) - log N`` (scalar)."""
    n = target_logscore.shape[-1]
    return torch.logsumexp(target_logscore - proposal_logprob, -1) - math.log(n)


def fdpg_coefficients(policy_logprob, proposal_logprob, target_logscore, divergence="forward_kl",
                      log_z_value=None, baseline="batch"):
    """f-DPG sequence coefficients, plain torch. Returns ``(coef, log_z, weights, ess, baseline)``.

    ``coef_i = (pi_i/q_i) (f'(t_i) - B)`` with ``s_i = log pi_i - log P_i + log Z``; ``weights`` are the
    normalised importance weights ``softmax(log pi - log q)``; ``B`` is ``sum_i weights_i f'(t_i)`` for
    ``baseline="batch"``, 0 for ``"none"``, or the given number.
    """
    div: Divergence = get_divergence(divergence)
    lpi, lq, lP = policy_logprob.detach(), proposal_logprob.detach(), target_logscore.detach()
    lz = log_z(lq, lP) if log_z_value is None else torch.as_tensor(log_z_value, dtype=lpi.dtype, device=lpi.device)
    s = lpi - lP + lz
    log_w = lpi - lq
    log_wn = torch.log_softmax(log_w, -1)
    weights = torch.exp(log_wn)
    ess = 1.0 / (weights * weights).sum(-1)
    if baseline == "batch":
        b = div.weighted_f_prime(s, log_wn).sum(-1)
    elif baseline == "none" or baseline is None:
        b = torch.zeros((), dtype=lpi.dtype, device=lpi.device)
    else:
        b = torch.as_tensor(float(baseline), dtype=lpi.dtype, device=lpi.device)
    if baseline == "batch" and s.shape[-1] > 0:
        # Differenced against the sample of the largest weight, *: f'_j - B = (f'_j - f'_*) + (f'_* - B) and
        # f'_* - B = sum_k wn_k (f'_* - f'_k), so coef_j = -gap_j + wn_j sum_k gap_k with gap_k = w_k (f'_* - f'_k)
        # (the same value). Where a sample holds all but ~eps of the weight, f'_j - B for it (and for any sample
        # with its f') cancels to rounding noise that pi/q (up to e^700) would blow up; the gaps do not cancel.
        i = torch.argmax(log_w, -1, keepdim=True)
        gap = div.weighted_f_prime_gap(s.gather(-1, i), s, log_w).scatter(-1, i, 0.0)
        coef = torch.exp(log_wn) * gap.sum(-1, keepdim=True) - gap
    else:
        coef = div.weighted_f_prime(s, log_w, b)   # (pi/q)(f' - B), the baseline taken before the weight
    return coef, lz, weights, ess, b


def divergence_estimates(policy_logprob, proposal_logprob, target_logscore, prior_logprob=None, log_z_value=None):
    """Importance-sampling estimates of MATH.md from samples of q: a dict of scalar tensors."""
    lpi, lq, lP = policy_logprob.detach(), proposal_logprob.detach(), target_logscore.detach()
    lz = log_z(lq, lP) if log_z_value is None else torch.as_tensor(log_z_value, dtype=lpi.dtype, device=lpi.device)
    lp = lP - lz                                   # log p
    w_pi = torch.exp(lpi - lq)                     # pi/q
    w_p = torch.exp(lp - lq)                       # p/q (0 where P = 0)
    zero = torch.zeros_like(lpi)
    out = {
        "kl_p_pi": torch.where(w_p > 0, w_p * (lp - lpi), zero).mean(-1),
        "kl_pi_p": torch.where(w_pi > 0, w_pi * (lpi - lp), zero).mean(-1),
        "tv": 0.5 * torch.abs(w_pi - w_p).mean(-1),
    }
    # JS = 1/2 [ pi log(2 pi / (pi + p)) + p log(2 p / (pi + p)) ] / q
    m = torch.logaddexp(lpi, lp)
    js_pi = torch.where(w_pi > 0, w_pi * (math.log(2.0) + lpi - m), zero)
    js_p = torch.where(w_p > 0, w_p * (math.log(2.0) + lp - m), zero)
    out["js"] = 0.5 * (js_pi + js_p).mean(-1)
    if prior_logprob is not None:
        la = prior_logprob.detach()
        out["kl_pi_a"] = torch.where(w_pi > 0, w_pi * (lpi - la), zero).mean(-1)
    wn = torch.softmax(lpi - lq, -1)
    out["ess"] = 1.0 / (wn * wn).sum(-1)
    out["log_z"] = lz
    return out
