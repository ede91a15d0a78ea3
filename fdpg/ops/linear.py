"""Per-token log-probabilities through the output layer, without materialising the B x T x V logits.

The Triton kernels (``fdpg.kernels.linear``, imported lazily) are registered as the torch.library ops
``fdpg::linear_logprobs_fwd`` and ``fdpg::linear_logprobs_bwd`` (with fake kernels, so ``torch.compile`` traces
through them) behind one autograd Function, :class:`_LinearLogprobs`.

Two modes of the Triton backward (the forward is the same):

- exact (default): every logit tile in fp32 (fp32 accumulation, bias and softmax in fp32), no tile skipped; the
  gradient of the logits is rounded once to the matmul dtype (bf16 for a bf16 model) for the two backward
  matmuls, which accumulate in fp32.
- fast (``fast=True``): the backward skips every ``[BLOCK_N, BLOCK_V]`` tile (128 x 128 on a GPU) in which every
  softmax probability is below ``filter_eps`` (default 2**-12, Cut Cross-Entropy's bf16 threshold) and no target
  falls: those tiles' grad_hidden and grad_weight work is never done. The error is bounded per row ``n`` by
  ``|g_n - g_lse,n| / tau * (mass of softmax entries < filter_eps in row n) * max |W|`` for grad_hidden (and the
  transposed bound for grad_weight); grad_bias, lp and lse are exact. Trained language models put almost all the
  mass on a few tokens, so most tiles are skipped; on a flat softmax nearly all of it may be dropped.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as C

__all__ = ["linear_token_logprobs", "paired_linear_token_logprobs", "LinearLogprobs", "PairedLinearLogprobs",
           "FILTER_EPS"]

#: Default threshold of the fast mode: ``torch.finfo(torch.bfloat16).eps / 32``, as Cut Cross-Entropy's "auto".
FILTER_EPS = 2.0 ** -12


class LinearLogprobs(NamedTuple):
    """``linear_token_logprobs(..., return_lse=True)``. With ``x = (hidden @ weight.T + bias) / temperature``:
    ``lp = log_softmax(x)[targets]``, ``lse = logsumexp(x)`` (differentiable; ``V(s)`` of soft Q-learning),
    ``max = max(x)`` (no grad), each ``[...]`` float32."""

    lp: Tensor
    lse: Tensor
    max: Tensor


class PairedLinearLogprobs(NamedTuple):
    """``paired_linear_token_logprobs(..., return_lse=True)``: the fields of :class:`LinearLogprobs` for both
    models; the prior's never require grad."""

    policy_lp: Tensor
    prior_lp: Tensor
    policy_lse: Tensor
    prior_lse: Tensor
    policy_max: Tensor
    prior_max: Tensor


# ---- torch.library ops (Triton kernels inside) --------------------------------------------------------------

def _kernels():
    from ..kernels import linear as K  # imports triton: only once a Triton backend is chosen

    return K


@torch.library.custom_op("fdpg::linear_logprobs_fwd", mutates_args=())
def _linear_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """hidden ``[N, d]``, weight ``[V, d]``, bias ``[V]`` or None, targets ``[N]`` -> (lp, lse, max) ``[N]`` fp32."""
    return _kernels().linear_logprobs_fwd(hidden, weight, bias, targets, temperature)


@_linear_fwd.register_fake
def _(hidden, weight, bias, targets, temperature):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fdpg::linear_logprobs_bwd", mutates_args=())
def _linear_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                grad_lp: Tensor, grad_lse: Optional[Tensor], temperature: float, need_hidden: bool,
                need_weight: bool, need_bias: bool, filter_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden ``[N, d]``, grad_weight ``[V, d]``, grad_bias ``[V]``); one not asked for is an empty ``[0]``."""
    out = _kernels().linear_logprobs_bwd(hidden, weight, bias, targets, lse, grad_lp, grad_lse, temperature,
                                         need_hidden, need_weight, need_bias, filter_eps)
    like = (hidden, weight, bias if bias is not None else hidden)
    return tuple(o if o is not None else t.new_empty(0) for o, t in zip(out, like))


@_linear_bwd.register_fake
def _(hidden, weight, bias, targets, lse, grad_lp, grad_lse, temperature, need_hidden, need_weight, need_bias,
      filter_eps):
    gh = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    gb = bias.new_empty(bias.shape) if (need_bias and bias is not None) else hidden.new_empty(0)
    return gh, gw, gb


class _LinearLogprobs(torch.autograd.Function):
    """``(lp, lse, max)`` of the fused output layer; backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, filter_eps):
        lp, lse, mx = torch.ops.fdpg.linear_logprobs_fwd(hidden, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.filter_eps = temperature, filter_eps
        ctx.mark_non_differentiable(mx)
        ctx.set_materialize_grads(False)
        return lp, lse, mx

    @staticmethod
    def backward(ctx, g_lp, g_lse, _g_max):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_lp is None and g_lse is None:
            return None, None, None, None, None, None
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        gh, gw, gb = torch.ops.fdpg.linear_logprobs_bwd(
            hidden, weight, bias, targets, lse, g_lp, g_lse, ctx.temperature, need_h, need_w,
            need_b and bias is not None, ctx.filter_eps)
        return (gh if need_h else None, gw if need_w else None, gb if (need_b and bias is not None) else None,
                None, None, None)


# ---- dispatch ---------------------------------------------------------------------------------------------

def _check_layer(prefix: str, hidden, weight, bias, targets) -> int:
    C.float_tensor(f"{prefix}hidden", hidden)
    C.float_tensor(f"{prefix}weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden: expected shape [..., d], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight: expected shape [V, d] with V >= 1, got {tuple(weight.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{prefix}hidden: expected a hidden size d >= 1, got shape {tuple(hidden.shape)}")
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


def _chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected None or a positive int (rows of logits per chunk), "
                         f"got {chunk_size!r}")
    return chunk_size


def _filter_eps(fast: bool, filter_eps) -> float:
    if not fast:
        return 0.0
    try:
        eps = float(filter_eps)
    except (TypeError, ValueError):
        raise TypeError(f"filter_eps: expected a float in (0, 1), got {filter_eps!r}") from None
    if not 0.0 < eps < 1.0:
        raise ValueError(f"filter_eps: expected a float in (0, 1), got {filter_eps!r}")
    return eps


def _use_triton(backend: str, device, *tensors) -> bool:
    """Triton for fp32/bf16/fp16; float64 always takes the (float64) torch path."""
    return C.backend(backend, device) == "triton" and all(
        t is None or t.dtype != torch.float64 for t in tensors)


def _triton_layer(hidden, weight, bias, targets, tau, eps, grad: bool):
    d = hidden.shape[-1]
    h, y = hidden.reshape(-1, d), targets.reshape(-1)
    if grad:
        lp, lse, mx = _LinearLogprobs.apply(h, weight, bias, y, tau, eps)
    else:
        lp, lse, mx = torch.ops.fdpg.linear_logprobs_fwd(h.detach(), weight.detach(),
                                                          None if bias is None else bias.detach(), y, tau)
    lead = hidden.shape[:-1]
    return lp.reshape(lead), lse.reshape(lead), mx.reshape(lead)


def _layer(hidden, weight, bias, targets, tau, eps, backend, chunk_size, grad: bool):
    """``(lp, lse, max)`` of one output layer on the chosen backend; ``grad=False`` is the prior's forward-only
    pass."""
    if _use_triton(backend, hidden.device, hidden, weight, bias):
        return _triton_layer(hidden, weight, bias, targets, tau, eps if grad else 0.0, grad=grad)
    if not grad:
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    return reference.linear_token_stats(hidden, weight, targets, bias, tau, chunk_size)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                          temperature: float = 1.0, backend: str = "auto", validate: bool | None = None,
                          chunk_size: int | None = None, fast: bool = False, filter_eps: float = FILTER_EPS,
                          return_lse: bool = False):
    """``log_softmax((hidden @ weight.T + bias) / temperature)[targets]`` without holding all the logits.

    Args:
        hidden: ``[..., d]`` (e.g. ``[B, T, d]``), float16, bfloat16, float32 or float64; any strides.
        weight: ``[V, d]`` output layer (``lm_head.weight``); bias: ``[V]`` or None.
        targets: ``[...]`` integer token ids in ``[0, V)``.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise) | ``"triton"`` | ``"torch"``. float64
            inputs always take the torch path.
        chunk_size: rows of logits per chunk for the torch backend (default: about 64 MiB of float32).
        fast: Triton backward skips tiles whose softmax entries are all below ``filter_eps`` (module docstring);
            the torch backend ignores it.
        return_lse: also return the per-position logsumexp and max of the tempered logits.

    Returns:
        ``[...]`` float32, differentiable with respect to hidden, weight and bias; with ``return_lse``, a
        :class:`LinearLogprobs` ``(lp, lse, max)``. The Triton backend keeps no logits in memory (forward: one
        tile per program; backward: one recompute, grad-logits chunks of at most 512 MiB); the torch backend holds
        one chunk of logits at a time and recomputes each chunk in backward.
    """
    V = _check_layer("", hidden, weight, bias, targets)
    tau = C.temperature(temperature)
    eps = _filter_eps(fast, filter_eps)
    chunk_size = _chunk_size(chunk_size)
    check = C.should_validate(validate, hidden)
    if check:
        C.target_range(targets, V, "weight.shape[0]")
    lp, lse, mx = _layer(hidden, weight, bias, targets, tau, eps, backend, chunk_size, grad=True)
    if check:
        C.finite_lse("hidden/weight/bias (the logits they produce)", lse)
    return LinearLogprobs(lp, lse, mx) if return_lse else lp


def paired_linear_token_logprobs(policy_hidden: Tensor, policy_weight: Tensor, prior_hidden: Tensor,
                                 prior_weight: Tensor, targets: Tensor, *, policy_bias: Tensor | None = None,
                                 prior_bias: Tensor | None = None, temperature: float = 1.0, backend: str = "auto",
                                 validate: bool | None = None, chunk_size: int | None = None, fast: bool = False,
                                 filter_eps: float = FILTER_EPS, return_lse: bool = False):
    """Policy and prior per-token log-probs from each model's last hidden states and output layer.

    Shapes and options as :func:`linear_token_logprobs`; the two models may differ in hidden size (and dtype) but
    must share the vocabulary. The prior is a forward-only launch without autograd. Returns
    ``(policy_lp, prior_lp)``, or with ``return_lse`` a :class:`PairedLinearLogprobs`; prior outputs never
    require grad.
    """
    V = _check_layer("policy_", policy_hidden, policy_weight, policy_bias, targets)
    Vp = _check_layer("prior_", prior_hidden, prior_weight, prior_bias, targets)
    if Vp != V:
        raise ValueError(f"prior_weight: vocabulary size {Vp} differs from policy_weight's {V}; policy and prior "
                         "must share one vocabulary")
    C.same_device(policy_hidden=policy_hidden, prior_hidden=prior_hidden)
    tau = C.temperature(temperature)
    eps = _filter_eps(fast, filter_eps)
    chunk_size = _chunk_size(chunk_size)
    check = C.should_validate(validate, policy_hidden)
    if check:
        C.target_range(targets, V, "weight.shape[0]")
    lp, lse, mx = _layer(policy_hidden, policy_weight, policy_bias, targets, tau, eps, backend, chunk_size,
                         grad=True)
    with torch.no_grad():
        plp, plse, pmx = _layer(prior_hidden, prior_weight, prior_bias, targets, tau, eps, backend, chunk_size,
                                grad=False)
    if check:
        C.finite_lse("policy_hidden/policy_weight/policy_bias (the logits they produce)", lse)
        C.finite_lse("prior_hidden/prior_weight/prior_bias (the logits they produce)", plse)
    if return_lse:
        return PairedLinearLogprobs(lp, plp, lse, plse, mx, pmx)
    return lp, plp
