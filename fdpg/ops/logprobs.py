"""Per-token and per-sequence log-probabilities from logits."""
from __future__ import annotations

import torch

from .. import reference
from . import _checks as C

__all__ = ["token_logprobs", "paired_token_logprobs", "sequence_logprobs", "completion_mask"]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   backend: str = "auto", validate: bool | None = None) -> torch.Tensor:
    """Log-probability of each target token: ``log_softmax(logits / temperature)[targets]``.

    Args:
        logits: ``[..., V]`` (e.g. ``[B, T, V]`` or ``[N, V]``), float16, bfloat16, float32 or float64.
        targets: ``[...]`` integer token ids in ``[0, V)``.
        temperature: positive float; the distribution is ``softmax(logits / temperature)``.
        backend: ``"auto" | "triton" | "cuda" | "torch"``.
        validate: check values (token-id range, NaN/+inf rows); default on except for CUDA tensors.

    Returns:
        ``[...]`` float32 (float64 for float64 logits), differentiable with respect to ``logits``.
    """
    V = C.logits_and_targets("logits", logits, targets)
    tau = C.temperature(temperature)
    C.same_device(logits=logits, targets=targets)
    check = C.should_validate(validate, logits)
    if check:
        C.target_range(targets, V)
    C.backend(backend, logits.device)
    lp, lse = reference.token_logprobs_lse(logits, targets, tau)
    if check:
        C.finite_lse("logits", lse)
    return lp


def paired_token_logprobs(policy_logits: torch.Tensor, prior_logits: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, backend: str = "auto",
                          validate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the same targets under the policy and the frozen prior.

    Args:
        policy_logits, prior_logits: ``[..., V]`` each (same shape; dtypes may differ).
        targets: ``[...]`` integer token ids.

    Returns:
        ``(policy_lp, prior_lp)``, both ``[...]`` float32. Gradient flows to ``policy_logits`` only;
        ``prior_lp`` never requires grad.
    """
    V = C.logits_and_targets("policy_logits", policy_logits, targets)
    Vp = C.logits_and_targets("prior_logits", prior_logits, targets)
    if Vp != V:
        raise ValueError(f"prior_logits: vocabulary size {Vp} differs from policy_logits' {V}; policy and prior "
                         "must share one vocabulary")
    tau = C.temperature(temperature)
    C.same_device(policy_logits=policy_logits, prior_logits=prior_logits, targets=targets)
    check = C.should_validate(validate, policy_logits)
    if check:
        C.target_range(targets, V)
    C.backend(backend, policy_logits.device)
    policy_lp, policy_lse = reference.token_logprobs_lse(policy_logits, targets, tau)
    with torch.no_grad():
        prior_lp, prior_lse = reference.token_logprobs_lse(prior_logits.detach(), targets, tau)
    if check:
        C.finite_lse("policy_logits", policy_lse)
        C.finite_lse("prior_logits", prior_lse)
    return policy_lp, prior_lp


def sequence_logprobs(token_lp: torch.Tensor, mask: torch.Tensor, *, validate: bool | None = None) -> torch.Tensor:
    """Masked per-sequence sums: ``token_lp [B, T]``, ``mask [B, T]`` (bool, or 0/1 numbers) -> ``[B]``.

    Masked positions contribute exactly 0 (even where ``token_lp`` is -inf). A fully masked row sums to 0; a
    batch with no unmasked position at all raises (checked when validating).
    """
    C.float_tensor("token_lp", token_lp)
    C.tensor("mask", mask)
    if mask.shape != token_lp.shape:
        raise ValueError(f"mask: expected shape {tuple(token_lp.shape)} like token_lp, got {tuple(mask.shape)}")
    C.same_device(token_lp=token_lp, mask=mask)
    if C.should_validate(validate, token_lp):
        if mask.numel() == 0 or not bool(mask.bool().any()):
            raise ValueError("mask: every position of the batch is masked; expected at least one unmasked token")
        C.no_nan("token_lp", token_lp.masked_fill(~mask.bool(), 0), " at an unmasked position")
    return reference.sequence_logprobs(token_lp, mask)


def completion_mask(tokens: torch.Tensor, eos_token_id: int | None, *, start: int = 0) -> torch.Tensor:
    """Mask of the sampled continuation: positions ``>= start`` up to and including the first EOS after ``start``.

    Built by position, never by token id, so it is right when pad == eos (GPT-2). tokens ``[B, T]`` -> bool
    ``[B, T]``. With ``eos_token_id=None`` every position from ``start`` on is kept.
    """
    C.int_tensor("tokens", tokens)
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)
    keep = (pos >= start).expand(B, T)
    if eos_token_id is None:
        return keep.clone()
    is_eos = (tokens == eos_token_id) & keep
    # number of EOS strictly before each position; keep while it is 0
    before = torch.cumsum(is_eos.int(), -1) - is_eos.int()
    return keep & (before == 0)
