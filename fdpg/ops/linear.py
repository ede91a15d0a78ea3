"""Per-token log-probabilities through the output layer, without materialising the B x T x V logits."""
from __future__ import annotations

import torch

from .. import reference
from . import _checks as C

__all__ = ["linear_token_logprobs", "paired_linear_token_logprobs"]


def _check_layer(prefix: str, hidden, weight, bias, targets) -> int:
    C.float_tensor(f"{prefix}hidden", hidden)
    C.float_tensor(f"{prefix}weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden: expected shape [..., d], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight: expected shape [V, d] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}weight: hidden size {weight.shape[1]} differs from {prefix}hidden's "
                         f"{hidden.shape[-1]}; expected weight of shape [V, {hidden.shape[-1]}]")
    if bias is not None:
        C.float_tensor(f"{prefix}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    C.int_tensor("targets", targets)
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (the leading dims of {prefix}hidden "
                         f"{tuple(hidden.shape)}), got {tuple(targets.shape)}")
    C.same_device(**{f"{prefix}hidden": hidden, f"{prefix}weight": weight, f"{prefix}bias": bias,
                     "targets": targets})
    return weight.shape[0]


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, backend: str = "auto",
                          validate: bool | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[targets]`` without holding all the logits.

    Args:
        hidden: ``[..., d]`` (e.g. ``[B, T, d]``), float16, bfloat16, float32 or float64.
        weight: ``[V, d]`` output layer (``lm_head.weight``); bias: ``[V]`` or None.
        targets: ``[...]`` integer token ids in ``[0, V)``.
        chunk_size: rows of logits per chunk for the torch backend (default: about 64 MiB of float32).

    Returns:
        ``[...]`` float32, differentiable with respect to hidden, weight and bias. The torch backend holds one
        chunk of logits at a time and recomputes each chunk in backward.
    """
    V = _check_layer("", hidden, weight, bias, targets)
    tau = C.temperature(temperature)
    check = C.should_validate(validate, hidden)
    if check:
        C.target_range(targets, V, "weight.shape[0]")
    C.backend(backend, hidden.device)
    lp = reference.linear_token_logprobs(hidden, weight, targets, bias, tau, chunk_size)
    if check:
        C.no_nan("hidden/weight", lp, " in the logits they produce (NaN or inf among the inputs)")
    return lp


def paired_linear_token_logprobs(policy_hidden: torch.Tensor, policy_weight: torch.Tensor,
                                 prior_hidden: torch.Tensor, prior_weight: torch.Tensor, targets: torch.Tensor, *,
                                 policy_bias: torch.Tensor | None = None, prior_bias: torch.Tensor | None = None,
                                 temperature: float = 1.0, backend: str = "auto", validate: bool | None = None,
                                 chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and prior per-token log-probs from each model's last hidden states and output layer.

    Shapes as :func:`linear_token_logprobs`; the two models may differ in hidden size but must share the
    vocabulary. Returns ``(policy_lp, prior_lp)``; ``prior_lp`` never requires grad.
    """
    V = _check_layer("policy_", policy_hidden, policy_weight, policy_bias, targets)
    Vp = _check_layer("prior_", prior_hidden, prior_weight, prior_bias, targets)
    if Vp != V:
        raise ValueError(f"prior_weight: vocabulary size {Vp} differs from policy_weight's {V}; policy and prior "
                         "must share one vocabulary")
    C.same_device(policy_hidden=policy_hidden, prior_hidden=prior_hidden)
    tau = C.temperature(temperature)
    check = C.should_validate(validate, policy_hidden)
    if check:
        C.target_range(targets, V, "weight.shape[0]")
    C.backend(backend, policy_hidden.device)
    out = reference.paired_linear_token_logprobs(policy_hidden, policy_weight, prior_hidden, prior_weight, targets,
                                                 policy_bias, prior_bias, tau, chunk_size)
    if check:
        C.no_nan("policy_hidden/policy_weight", out[0], " in the logits they produce")
        C.no_nan("prior_hidden/prior_weight", out[1], " in the logits they produce")
    return out
