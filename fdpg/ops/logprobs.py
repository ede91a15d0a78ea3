"""Per-token and per-sequence log-probabilities (and per-token entropy and KL) from logits.

The Triton kernels (``fdpg.kernels.logprobs``, imported lazily) are registered as the torch.library ops
``fdpg::token_stats_fwd``, ``fdpg::token_stats_bwd`` and ``fdpg::token_stats_bwd_inplace`` (with fake kernels,
so ``torch.compile(fullgraph=True)`` traces through them) behind one autograd Function, :class:`_TokenStats`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as C

__all__ = ["token_logprobs", "paired_token_logprobs", "paired_token_stats", "PairedTokenStats", "sequence_logprobs",
           "completion_mask"]


class PairedTokenStats(NamedTuple):
    """Result of :func:`paired_token_stats`. With ``x = logits / temperature`` at each position ``[...]``:

    policy_lp, prior_lp: ``log softmax(x)[y]``. policy_lse, prior_lse: ``logsumexp(x)`` (``V(s)`` of soft
    Q-learning). entropy: ``H(pi)``. kl: ``KL(pi || a)`` over the vocabulary. policy_seq, prior_seq ``[...[:-1]]``:
    masked sums of the log-probs over the last dim. policy_max, prior_max: ``max(x)`` (no grad). Policy fields are
    differentiable with respect to the policy logits (``policy_max`` excepted); prior fields never require grad.
    Fields not asked for, or without a prior or a mask, are None.
    """

    policy_lp: Tensor
    prior_lp: Optional[Tensor]
    policy_lse: Tensor
    prior_lse: Optional[Tensor]
    entropy: Optional[Tensor]
    kl: Optional[Tensor]
    policy_seq: Optional[Tensor]
    prior_seq: Optional[Tensor]
    policy_max: Tensor
    prior_max: Optional[Tensor]


# ---- torch.library ops (Triton kernels inside) --------------------------------------------------------------

def _kernels(cuda: bool = False):
    """The launch wrappers: Triton's (``fdpg.kernels.logprobs``) or the CUDA extension's, which share one interface."""
    if cuda:
        from .. import _cuda

        return _cuda
    from ..kernels import logprobs as K  # imports triton: only once a Triton backend is chosen

    return K


_FWD_OUT = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("fdpg::token_stats_fwd", mutates_args=())
def _token_stats_fwd(policy: Tensor, prior: Optional[Tensor], targets: Tensor, mask: Optional[Tensor],
                     temperature: float, entropy: bool, kl: bool, cuda: bool = False) -> _FWD_OUT:
    """(lp, lse, max, entropy, kl, seq, prior_lp, prior_lse, prior_max, prior_seq); absent ones are empty [0]."""
    K = _kernels(cuda)
    o = K.token_stats_forward(policy, prior, targets, temperature, entropy, kl)
    seq = pseq = None
    if mask is not None:
        seq, pseq = K.masked_row_sums(o["lp"], mask, o.get("prior_lp"))

    def get(t):  # absent outputs: distinct empty tensors (outputs of a custom op may not alias each other)
        return policy.new_empty(0, dtype=torch.float32) if t is None else t

    return (o["lp"], o["lse"], o["max"], get(o.get("entropy")), get(o.get("kl")), get(seq), get(o.get("prior_lp")),
            get(o.get("prior_lse")), get(o.get("prior_max")), get(pseq))


@_token_stats_fwd.register_fake
def _(policy, prior, targets, mask, temperature, entropy, kl, cuda=False):
    lead = policy.shape[:-1]
    tok = lambda on: policy.new_empty(lead if on else (0,), dtype=torch.float32)  # noqa: E731
    seq = lambda on: policy.new_empty(lead[:-1] if on else (0,), dtype=torch.float32)  # noqa: E731
    has_prior = prior is not None
    return (tok(True), tok(True), tok(True), tok(entropy), tok(kl and has_prior), seq(mask is not None),
            tok(has_prior), tok(has_prior), tok(has_prior), seq(mask is not None and has_prior))


def _bwd_impl(policy, prior, targets, mask, lse, entropy, kl, prior_lse, grad_lp, grad_lse, grad_entropy, grad_kl,
              grad_seq, temperature, out, cuda):
    return _kernels(cuda).token_stats_backward(
        policy, prior, targets, lse, entropy=entropy, kl=kl, prior_lse=prior_lse, grad_lp=grad_lp,
        grad_lse=grad_lse, grad_entropy=grad_entropy, grad_kl=grad_kl, grad_seq=grad_seq, mask=mask,
        temperature=temperature, out=out)


@torch.library.custom_op("fdpg::token_stats_bwd", mutates_args=())
def _token_stats_bwd(policy: Tensor, prior: Optional[Tensor], targets: Tensor, mask: Optional[Tensor], lse: Tensor,
                     entropy: Optional[Tensor], kl: Optional[Tensor], prior_lse: Optional[Tensor],
                     grad_lp: Optional[Tensor], grad_lse: Optional[Tensor], grad_entropy: Optional[Tensor],
                     grad_kl: Optional[Tensor], grad_seq: Optional[Tensor], temperature: float,
                     cuda: bool = False) -> Tensor:
    """Gradient with respect to ``policy`` (a new contiguous tensor of its dtype)."""
    return _bwd_impl(policy, prior, targets, mask, lse, entropy, kl, prior_lse, grad_lp, grad_lse, grad_entropy,
                     grad_kl, grad_seq, temperature, None, cuda)


@_token_stats_bwd.register_fake
def _(policy, prior, targets, mask, lse, entropy, kl, prior_lse, grad_lp, grad_lse, grad_entropy, grad_kl,
      grad_seq, temperature, cuda=False):
    return torch.empty_like(policy, memory_format=torch.contiguous_format)


@torch.library.custom_op("fdpg::token_stats_bwd_inplace", mutates_args=("policy",))
def _token_stats_bwd_inplace(policy: Tensor, prior: Optional[Tensor], targets: Tensor, mask: Optional[Tensor],
                             lse: Tensor, entropy: Optional[Tensor], kl: Optional[Tensor],
                             prior_lse: Optional[Tensor], grad_lp: Optional[Tensor], grad_lse: Optional[Tensor],
                             grad_entropy: Optional[Tensor], grad_kl: Optional[Tensor], grad_seq: Optional[Tensor],
                             temperature: float, cuda: bool = False) -> None:
    """The same gradient, written over ``policy``'s own buffer (the logits are dead after the loss). Where the
    prior's logits lie in that buffer too, other than as the very same tensor, the kernel would read prior rows
    that other programs have overwritten: the gradient is computed out of place, then copied in."""
    a = (policy, prior, targets, mask, lse, entropy, kl, prior_lse, grad_lp, grad_lse, grad_entropy, grad_kl,
         grad_seq, temperature)
    if prior is not None and _aliased(prior, policy):
        policy.copy_(_bwd_impl(*a, None, cuda))
    else:
        _bwd_impl(*a, policy, cuda)


def _aliased(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` share storage without being the very same view."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and (a.data_ptr(), a.shape, a.stride()) != (b.data_ptr(), b.shape, b.stride()))


@_token_stats_bwd_inplace.register_fake
def _(policy, prior, targets, mask, lse, entropy, kl, prior_lse, grad_lp, grad_lse, grad_entropy, grad_kl,
      grad_seq, temperature, cuda=False):
    return None


class _TokenStats(torch.autograd.Function):
    """Triton (or CUDA) forward and backward of :func:`paired_token_stats`; outputs as ``fdpg::token_stats_fwd``."""

    @staticmethod
    def forward(ctx, policy, prior, targets, mask, temperature, entropy, kl, inplace, cuda=False):
        outs = torch.ops.fdpg.token_stats_fwd(policy, prior, targets, mask, temperature, entropy, kl, cuda)
        lp, lse, mx, ent, klv, seq, plp, plse, pmx, pseq = outs
        # the prior's logits are kept alive for backward only when KL needs them. Inputs that never need grad
        # (prior logits, token ids, mask) are kept as attributes: they may be inference tensors, e.g. a prior
        # scored under torch.inference_mode, which save_for_backward refuses.
        ctx.save_for_backward(policy, lse, ent if entropy else None, klv if kl else None, plse if kl else None)
        ctx.prior, ctx.targets, ctx.mask = (prior if kl else None), targets, mask
        ctx.temperature, ctx.entropy, ctx.kl, ctx.inplace, ctx.cuda = temperature, entropy, kl, inplace, cuda
        ctx.has_mask = mask is not None
        ctx.mark_non_differentiable(mx, plp, plse, pmx, pseq)
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, g_lp, g_lse, _gmx, g_ent, g_kl, g_seq, *_prior):
        policy, lse, ent, klv, plse = ctx.saved_tensors
        prior, targets, mask = ctx.prior, ctx.targets, ctx.mask
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        g_ent = g_ent if ctx.entropy else None
        g_kl = g_kl if ctx.kl else None
        g_seq = g_seq if ctx.has_mask else None
        if g_lp is None and g_lse is None and g_ent is None and g_kl is None and g_seq is None:
            return (None,) * 9
        args = (policy, prior if g_kl is not None else None, targets, mask if g_seq is not None else None, lse,
                ent if g_ent is not None else None, klv if g_kl is not None else None,
                plse if g_kl is not None else None, g_lp, g_lse, g_ent, g_kl, g_seq, ctx.temperature, ctx.cuda)
        if ctx.inplace and not torch.is_grad_enabled():
            torch.ops.fdpg.token_stats_bwd_inplace(*args)
            grad = policy.detach()
        # (under create_graph the out-of-place op: its gradient is not differentiable either, and says so)
        else:
            grad = torch.ops.fdpg.token_stats_bwd(*args)
        return grad, None, None, None, None, None, None, None, None


# ---- public ops -----------------------------------------------------------------------------------------------


def _resolve(backend: str, logits: Tensor, *others: Tensor | None) -> str:
    be = C.backend(backend, logits.device, cuda_ok=True)
    if be not in ("triton", "cuda"):
        return be
    wide = [t for t in (logits, *others) if t is not None and t.dtype == torch.float64]
    if wide:
        if backend == "auto":
            return "torch"  # float64 is the reference precision: the torch path keeps it
        raise TypeError(f"backend: the {C.BACKEND_NAMES[be]} kernels take float16, bfloat16 or float32 logits, got float64; "
                        f"use backend='torch' (or 'auto') for float64")
    return be


def _inplace_flag(inplace) -> bool:
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace_backward: expected a bool, got {type(inplace).__name__}")
    return inplace


def _inplace_ok(logits: Tensor, inplace: bool) -> bool:
    """In-place backward where asked for and possible (not into an ``expand``-ed tensor whose rows share memory)."""
    return inplace and not _kernels().overlapping(logits)


def _check_mask(mask, targets: Tensor) -> None:
    C.tensor("mask", mask)
    if targets.dim() == 0:
        raise ValueError("mask: needs targets with at least one dim (the sums run over the last dim)")
    if tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask: expected shape {tuple(targets.shape)} like targets, got {tuple(mask.shape)}")


def paired_token_stats(policy_logits: Tensor, prior_logits: Tensor | None, targets: Tensor, *,
                       mask: Tensor | None = None, entropy: bool = False, kl: bool = False, temperature: float = 1.0,
                       backend: str = "auto", validate: bool | None = None,
                       inplace_backward: bool = False) -> PairedTokenStats:
    """Per-token log-probs, logsumexp and max of policy and prior, and optionally the policy's entropy, the exact
    ``KL(pi || a)`` and masked per-sequence sums, in one pass over each row of logits.

    Args:
        policy_logits: ``[..., V]`` (e.g. ``[B, T, V]``), float16, bfloat16 or float32 (float64: torch backend);
            any strides (``logits[:, :-1]`` is read without a copy).
        prior_logits: ``[..., V]`` like ``policy_logits`` (dtype may differ), or None (policy only).
        targets: ``[...]`` integer token ids in ``[0, V)``.
        mask: ``[...]`` bool (or 0/1 numbers): adds ``policy_seq``/``prior_seq``, the masked sums of the
            log-probs over the last dim (``[B]`` for ``[B, T]``); masked positions count exactly 0.
        entropy, kl: also return ``H(pi)`` and ``KL(pi || a)`` (``kl`` needs ``prior_logits``), float32 ``[...]``,
            differentiable with respect to ``policy_logits``.
        temperature: both distributions are ``softmax(logits / temperature)``.
        backend: ``"auto" | "triton" | "cuda" | "torch"``.
        validate: check values (token ids in range, NaN/+inf rows); default on except for CUDA tensors.
        inplace_backward: the Triton backward writes the gradient into ``policy_logits``' own buffer (no new
            ``[..., V]`` tensor); only when the logits are not used after this op. Ignored by the torch backend.

    Returns:
        :class:`PairedTokenStats`, float32 (float64 for float64 logits under the torch backend).
    """
    V = C.logits_and_targets("policy_logits", policy_logits, targets)
    if prior_logits is not None:
        Vp = C.logits_and_targets("prior_logits", prior_logits, targets)
        if Vp != V:
            raise ValueError(f"prior_logits: vocabulary size {Vp} differs from policy_logits' {V}; policy and "
                             "prior must share one vocabulary")
    elif kl:
        raise ValueError("kl: KL(pi || a) needs prior_logits; got prior_logits=None")
    if mask is not None:
        _check_mask(mask, targets)
    tau = C.temperature(temperature)
    inplace_backward = _inplace_flag(inplace_backward)
    C.same_device(policy_logits=policy_logits, prior_logits=prior_logits, targets=targets, mask=mask)
    check = C.should_validate(validate, policy_logits)
    if check:
        C.target_range(targets, V)
        if mask is not None and (mask.numel() == 0 or not bool(mask.bool().any())):
            raise ValueError("mask: every position of the batch is masked; expected at least one unmasked token")
    be = _resolve(backend, policy_logits, prior_logits)
    entropy, kl = bool(entropy), bool(kl)
    if be in ("triton", "cuda"):
        prior = None if prior_logits is None else prior_logits.detach()
        outs = _TokenStats.apply(policy_logits, prior, targets, mask, tau, entropy, kl,
                                 _inplace_ok(policy_logits, inplace_backward), be == "cuda")
        lp, lse, mx, ent, klv, seq, plp, plse, pmx, pseq = outs
        has_prior = prior is not None
        res = PairedTokenStats(lp, plp if has_prior else None, lse, plse if has_prior else None,
                               ent if entropy else None, klv if kl else None,
                               seq if mask is not None else None,
                               pseq if mask is not None and has_prior else None,
                               mx, pmx if has_prior else None)
    else:
        d = reference.paired_token_stats(policy_logits, prior_logits, targets, mask, entropy, kl, tau)
        res = PairedTokenStats(**d)
    if check:
        C.finite_lse("policy_logits", res.policy_lse)
        if res.prior_lse is not None:
            C.finite_lse("prior_logits", res.prior_lse)
    return res


def token_logprobs(logits: Tensor, targets: Tensor, *, temperature: float = 1.0, backend: str = "auto",
                   validate: bool | None = None, inplace_backward: bool = False) -> Tensor:
    """Log-probability of each target token: ``log_softmax(logits / temperature)[targets]``.

    Args:
        logits: ``[..., V]`` (e.g. ``[B, T, V]`` or ``[N, V]``), float16, bfloat16, float32 or float64 (float64
            runs the torch backend).
        targets: ``[...]`` integer token ids in ``[0, V)``.
        temperature: positive float; the distribution is ``softmax(logits / temperature)``.
        backend: ``"auto" | "triton" | "cuda" | "torch"``.
        validate: check values (token-id range, NaN/+inf rows); default on except for CUDA tensors.
        inplace_backward: Triton backend: write the gradient into ``logits``' buffer (see
            :func:`paired_token_stats`).

    Returns:
        ``[...]`` float32 (float64 for float64 logits), differentiable with respect to ``logits``.
    """
    V = C.logits_and_targets("logits", logits, targets)
    tau = C.temperature(temperature)
    inplace_backward = _inplace_flag(inplace_backward)
    C.same_device(logits=logits, targets=targets)
    check = C.should_validate(validate, logits)
    if check:
        C.target_range(targets, V)
    be = _resolve(backend, logits)
    if be in ("triton", "cuda"):
        outs = _TokenStats.apply(logits, None, targets, None, tau, False, False, _inplace_ok(logits, inplace_backward),
                                 be == "cuda")
        lp, lse = outs[0], outs[1]
    else:
        lp, lse = reference.token_logprobs_lse(logits, targets, tau)
    if check:
        C.finite_lse("logits", lse)
    return lp


def paired_token_logprobs(policy_logits: Tensor, prior_logits: Tensor, targets: Tensor, *,
                          temperature: float = 1.0, backend: str = "auto", validate: bool | None = None,
                          inplace_backward: bool = False) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the same targets under the policy and the frozen prior, in one pass.

    Args:
        policy_logits, prior_logits: ``[..., V]`` each (same shape; dtypes may differ).
        targets: ``[...]`` integer token ids.
        inplace_backward: Triton backend: write the gradient into ``policy_logits``' buffer.

    Returns:
        ``(policy_lp, prior_lp)``, both ``[...]`` float32. Gradient flows to ``policy_logits`` only;
        ``prior_lp`` never requires grad. :func:`paired_token_stats` has the rest (entropy, KL, sums).
    """
    C.tensor("prior_logits", prior_logits)
    st = paired_token_stats(policy_logits, prior_logits, targets, temperature=temperature, backend=backend,
                            validate=validate, inplace_backward=inplace_backward)
    return st.policy_lp, st.prior_lp


def sequence_logprobs(token_lp: Tensor, mask: Tensor, *, validate: bool | None = None) -> Tensor:
    """Masked per-sequence sums: ``token_lp [B, T]``, ``mask [B, T]`` (bool, or 0/1 numbers) -> ``[B]`` float32
    (float64 for float64 log-probs).

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
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask: expected bool or 0/1 values")
        live = token_lp.masked_fill(~mask.bool(), 0)
        C.no_nan("token_lp", live, " at an unmasked position")
        if bool((live == math.inf).any()):
            raise ValueError("token_lp: contains +inf at an unmasked position; log-probabilities are <= 0")
    if token_lp.dtype in (torch.float16, torch.bfloat16):
        token_lp = token_lp.float()         # float32 sums (and results) for half-precision log-probs
    return reference.sequence_logprobs(token_lp, mask)


def completion_mask(tokens: Tensor, eos_token_id: int | None, *, start: int = 0) -> Tensor:
    """Mask of the sampled continuation: positions ``>= start`` up to and including the first EOS after ``start``.

    Built by position, never by token id, so it is right when pad == eos (GPT-2). tokens ``[B, T]`` -> bool
    ``[B, T]``. With ``eos_token_id=None`` every position from ``start`` on is kept.
    """
    C.int_tensor("tokens", tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens: expected shape [B, T], got {tuple(tokens.shape)}")
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or eos_token_id < 0):
        raise ValueError(f"eos_token_id: expected None or a token id >= 0, got {eos_token_id!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start: expected an int >= 0 (the first position of the continuation), got {start!r}")
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)
    keep = (pos >= start).expand(B, T)
    if eos_token_id is None:
        return keep.clone()
    is_eos = (tokens == eos_token_id) & keep
    # number of EOS strictly before each position; keep while it is 0
    before = torch.cumsum(is_eos.int(), -1) - is_eos.int()
    return keep & (before == 0)
