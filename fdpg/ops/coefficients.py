"""Sequence-level f-DPG coefficients and importance-sampling estimates of the divergences."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import divergences, reference
from ..divergences import Divergence, get as get_divergence
from . import _checks as C

__all__ = ["FDPGCoefficients", "fdpg_coefficients", "divergence_estimates"]


@dataclass
class FDPGCoefficients:
    """Result of :func:`fdpg_coefficients` (all tensors carry no grad).

    coef ``[N]``: ``(pi_i/q_i) (f'(t_i) - B)``; ``mean(coef * log pi)`` has gradient ``grad D_f(pi || p)``.
    log_z ``[]``: the log-partition function used. weights ``[N]``: normalised importance weights pi/q (sum 1).
    ess ``[]``: effective sample size ``1 / sum weights^2`` (between 1 and N). baseline ``[]``: B.
    """

    coef: torch.Tensor
    log_z: torch.Tensor
    weights: torch.Tensor
    ess: torch.Tensor
    baseline: torch.Tensor

    def loss(self, policy_logprob: torch.Tensor) -> torch.Tensor:
        """The surrogate ``mean(coef.detach() * policy_logprob)``; descending it decreases ``D_f(pi || p)``."""
        return (self.coef.detach().to(policy_logprob.dtype) * policy_logprob).mean()


# ---- Triton backend: built-in divergences as kernel parameters, torch.library ops ----------------------------

_LOG2 = math.log(2.0)
# f'(s) = ce exp(ae s) + k0 + k1 s + k2 sign(s) + k3 softplus(-s), as (ce, ae, k0, k1, k2, k3)
_SPECS = {
    "forward_kl": (-1.0, -1.0, 0.0, 0.0, 0.0, 0.0),
    "reverse_kl": (0.0, 0.0, 1.0, 1.0, 0.0, 0.0),
    "tv": (0.0, 0.0, 0.0, 0.0, 0.5, 0.0),
    "js": (0.0, 0.0, 0.5 * _LOG2, 0.0, 0.0, -0.5),
    "hellinger": (-1.0, -0.5, 1.0, 0.0, 0.0, 0.0),
    "chi2": (2.0, 1.0, -2.0, 0.0, 0.0, 0.0),
}


def _code(fn):
    return None if fn is None else getattr(fn, "__code__", fn)


def divergence_spec(div: Divergence) -> tuple[float, ...] | None:
    """The Triton kernel's parameters of ``f'`` for a built-in divergence; None for any other (user-defined, or a
    Divergence that only shares a built-in's name)."""
    if div.name in _SPECS:
        ref = divergences.BUILTIN[div.name]()
        spec = _SPECS[div.name]
    elif div.name.startswith("alpha:") and isinstance(div.params.get("alpha"), float):
        a = div.params["alpha"]
        ref = get_divergence("alpha:" + repr(a))
        c = 1.0 / (a - 1.0)
        spec = (c, a - 1.0, -c, 0.0, 0.0, 0.0)
    else:
        return None
    same = (div.exp_terms == ref.exp_terms and div.params == ref.params and div.bounded_at_inf == ref.bounded_at_inf
            and all(_code(getattr(div, k)) is _code(getattr(ref, k)) for k in ("f", "explicit_f_prime", "rest")))
    return spec if same else None


def _kernels():
    from ..kernels import coefficients as K  # imports triton: only once a Triton backend is chosen

    return K


@torch.library.custom_op("fdpg::seq_coefficients", mutates_args=())
def _seq_coefficients(policy_logprob: Tensor, proposal_logprob: Tensor, target_logscore: Tensor,
                      log_z: Optional[Tensor], spec: list[float], baseline_mode: int,
                      baseline_value: float) -> tuple[Tensor, Tensor, Tensor]:
    """(coef [N], weights [N], [log_z, ess, baseline]) float32, in one launch."""
    return _kernels().coefficients(policy_logprob, proposal_logprob, target_logscore, log_z, spec, baseline_mode,
                                   baseline_value)


@_seq_coefficients.register_fake
def _(policy_logprob, proposal_logprob, target_logscore, log_z, spec, baseline_mode, baseline_value):
    n = policy_logprob.shape[0]
    new = lambda *shape: policy_logprob.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(n), new(n), new(3)


@torch.library.custom_op("fdpg::seq_estimates", mutates_args=())
def _seq_estimates(policy_logprob: Tensor, proposal_logprob: Tensor, target_logscore: Tensor,
                   prior_logprob: Optional[Tensor], log_z: Optional[Tensor]) -> Tensor:
    """[kl_p_pi, kl_pi_p, tv, js, kl_pi_a, ess, log_z] float32, in one launch."""
    return _kernels().estimates(policy_logprob, proposal_logprob, target_logscore, prior_logprob, log_z)


@_seq_estimates.register_fake
def _(policy_logprob, proposal_logprob, target_logscore, prior_logprob, log_z):
    return policy_logprob.new_empty(7, dtype=torch.float32)



def _resolve(backend: str, like: Tensor, div: Divergence | None = None) -> str:
    be = C.backend(backend, like.device, cuda_ok=True)
    if be == "torch":
        return be
    if be == "triton" and like.dtype == torch.float64:
        if backend == "auto":
            return "torch"
        raise TypeError("backend: the Triton kernel computes in float32 and takes float16, bfloat16 or float32 "
                        "inputs, got float64; use backend='torch' (or 'auto') for float64")
    if div is not None and divergence_spec(div) is None:
        if backend == "auto":
            return "torch"
        raise ValueError(f"backend: the {C.BACKEND_NAMES[be]} kernel knows only the built-in divergences (forward_kl, reverse_kl, "
                         f"tv, js, hellinger, chi2, alpha:<a>); {div.name!r} is user-defined: use backend='torch' "
                         f"or 'auto'")
    return be


def _check_sequences(policy_logprob, proposal_logprob, target_logscore, prior_logprob=None) -> None:
    named = {"policy_logprob": policy_logprob, "proposal_logprob": proposal_logprob,
             "target_logscore": target_logscore}
    if prior_logprob is not None:
        named["prior_logprob"] = prior_logprob
    for k, v in named.items():
        C.float_tensor(k, v)
        if v.dim() != 1 or v.shape[0] == 0:
            raise ValueError(f"{k}: expected a non-empty 1-D tensor [N] of per-sequence values, "
                             f"got shape {tuple(v.shape)}")
    n = policy_logprob.shape[0]
    for k, v in named.items():
        if v.shape[0] != n:
            raise ValueError(f"{k}: expected shape ({n},) like policy_logprob, got {tuple(v.shape)}")
    C.same_device(**named)


def _check_values(policy_logprob, proposal_logprob, target_logscore, prior_logprob=None, *,
                  log_z_given: bool = False) -> None:
    for k, v in (("policy_logprob", policy_logprob), ("proposal_logprob", proposal_logprob),
                 ("prior_logprob", prior_logprob), ("target_logscore", target_logscore)):
        if v is None:
            continue
        C.no_nan(k, v)
        if bool((v == math.inf).any()):
            raise ValueError(f"{k}: contains +inf; log-probabilities and log-scores must be < +inf")
    if bool((policy_logprob == -math.inf).all()):
        raise ValueError("policy_logprob: every sample has pi(x) = 0 (log pi = -inf), so the importance weights "
                         "pi/q cannot be normalised; expected at least one finite log-probability")
    if bool((proposal_logprob == -math.inf).any()):
        raise ValueError("proposal_logprob: contains -inf, i.e. q(x) = 0 for a sample said to be drawn from q")
    if not log_z_given and bool((target_logscore == -math.inf).all()):
        raise ValueError("target_logscore: every sample has P(x) = 0 (log P = -inf), so log Z cannot be estimated "
                         "from this batch (pass log_z); the constraint may be unsatisfiable by the proposal")


def _resolve_log_z(log_z, like: torch.Tensor, check: bool):
    """``log_z`` as a 0-d tensor like ``like``; a number is checked for finiteness always, a tensor only when
    ``check`` (validating: a host sync)."""
    if log_z is None:
        return None
    if isinstance(log_z, bool) or not isinstance(log_z, (int, float, torch.Tensor)):
        raise TypeError(f"log_z: expected a number or a scalar tensor, got {type(log_z).__name__}")
    if isinstance(log_z, (int, float)) and not math.isfinite(log_z):
        raise ValueError(f"log_z: expected a finite number, got {log_z}")
    lz = torch.as_tensor(log_z, dtype=like.dtype, device=like.device).detach()
    if lz.numel() != 1:
        raise ValueError(f"log_z: expected a scalar, got shape {tuple(lz.shape)}")
    if check and not torch.compiler.is_compiling() and not bool(torch.isfinite(lz)):
        raise ValueError(f"log_z: expected a finite number, got {float(lz)}")
    return lz.reshape(())


def _resolve_baseline(baseline):
    if baseline is None or (isinstance(baseline, str) and baseline in ("batch", "none")):
        return "none" if baseline is None else baseline
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise ValueError(f"baseline: expected 'batch', 'none' or a number, got {baseline!r}")
    if not math.isfinite(baseline):
        raise ValueError(f"baseline: expected a finite number, got {baseline!r}")
    return float(baseline)


def _float64(*ts):
    return [None if t is None else t.to(torch.float64) for t in ts]


def _float(*ts):
    dt = torch.float64 if any(t.dtype == torch.float64 for t in ts if t is not None) else torch.float32
    return [None if t is None else t.detach().to(dt) for t in ts]


def fdpg_coefficients(policy_logprob: torch.Tensor, proposal_logprob: torch.Tensor, target_logscore: torch.Tensor,
                      divergence: str | Divergence = "forward_kl", *, log_z=None, baseline="batch",
                      backend: str = "auto", validate: bool | None = None) -> FDPGCoefficients:
    """Per-sequence f-DPG coefficients from sequence log-probabilities.

    Args:
        policy_logprob: ``[N]`` log pi(x_i).
        proposal_logprob: ``[N]`` log q(x_i) of the model that drew x_i (= policy_logprob on-policy).
        target_logscore: ``[N]`` log P(x_i) = log a(x_i) + log b(x_i); may be -inf (constraint broken).
        divergence: a name of :func:`fdpg.divergences.get` or a :class:`~fdpg.divergences.Divergence`.
        log_z: scalar log Z to use; None estimates it from this batch, ``logsumexp(log P - log q) - log N``.
        baseline: ``"batch"`` (self-normalised estimate of E_pi[f'(t)]), ``"none"``, or a number (B = -1 with
            forward KL is GDC++).

    Returns:
        :class:`FDPGCoefficients`, float32 (float64 for float64 inputs). Gradient descent on
        ``mean(coef * log pi)`` decreases ``D_f(pi || p)``.
    """
    _check_sequences(policy_logprob, proposal_logprob, target_logscore)
    div = get_divergence(divergence)
    base = _resolve_baseline(baseline)
    check = C.should_validate(validate, policy_logprob)
    if check:
        _check_values(policy_logprob, proposal_logprob, target_logscore, log_z_given=log_z is not None)
        if not div.is_bounded_at_inf() and bool((target_logscore == -math.inf).any()):
            raise ValueError(f"target_logscore: contains -inf (a sample with P(x) = 0), where f'(t) of the unbounded "
                             f"divergence {div.name!r} is infinite; floor log b(x) at a finite value (e.g. "
                             f"log 1e-3, the trainer's 'log_b_floor') or use a bounded divergence "
                             f"(forward_kl, tv, js, hellinger, alpha < 1)")
    lpi, lq, lP = _float(policy_logprob, proposal_logprob, target_logscore)
    be = _resolve(backend, lpi, div)
    if be == "cuda":
        from .. import _cuda

        mode, value = ("value", float(base)) if isinstance(base, float) else (base, 0.0)
        lz = _resolve_log_z(log_z, lpi, check)
        coef, lz, weights, ess, b = _cuda.coefficients(lpi, lq, lP, div.name, None, lz, mode, value)
        return FDPGCoefficients(coef=coef, log_z=lz, weights=weights, ess=ess, baseline=b)
    if be == "triton":
        mode, value = (1, 0.0) if base == "batch" else (0, 0.0) if base == "none" else (2, float(base))
        coef, weights, scal = torch.ops.fdpg.seq_coefficients(lpi, lq, lP, _resolve_log_z(log_z, lpi, check),
                                                              list(divergence_spec(div)), mode, value)
        return FDPGCoefficients(coef=coef, log_z=scal[0], weights=weights, ess=scal[1], baseline=scal[2])
    # the torch backend computes in float64 (a few [N] vectors): a batch whose importance weights span more than
    # float32's exponent range (pi/q > e^88: one sample dominating) keeps every coefficient to float32 precision
    # (log Z rounded to the inputs' dtype before it enters s, as the CUDA kernel does)
    lz = _resolve_log_z(log_z, lpi, check)
    lpi64, lq64, lP64 = _float64(lpi, lq, lP)
    lz = reference.log_z(lq64, lP64).to(lpi.dtype) if lz is None else lz
    out = reference.fdpg_coefficients(lpi64, lq64, lP64, div, lz.to(torch.float64), base)
    return FDPGCoefficients(*(t.to(lpi.dtype) for t in out))


def divergence_estimates(policy_logprob: torch.Tensor, proposal_logprob: torch.Tensor,
                         target_logscore: torch.Tensor, prior_logprob: torch.Tensor | None = None, log_z=None, *,
                         backend: str = "auto", validate: bool | None = None) -> dict[str, torch.Tensor]:
    """Importance-sampling estimates from samples x_i ~ q (MATH.md, "Estimates to log").

    Inputs ``[N]`` as :func:`fdpg_coefficients`; ``prior_logprob`` ``[N]`` log a(x_i) adds ``kl_pi_a``.
    Returns a dict of scalar tensors: ``kl_p_pi``, ``kl_pi_p``, ``kl_pi_a`` (with the prior), ``tv``, ``js``,
    ``ess``, ``log_z``.
    """
    _check_sequences(policy_logprob, proposal_logprob, target_logscore, prior_logprob)
    check = C.should_validate(validate, policy_logprob)
    if check:
        _check_values(policy_logprob, proposal_logprob, target_logscore, prior_logprob,
                      log_z_given=log_z is not None)
    lpi, lq, lP, la = _float(policy_logprob, proposal_logprob, target_logscore, prior_logprob)
    be = _resolve(backend, lpi)
    if be == "cuda":
        from .. import _cuda

        return _cuda.estimates(lpi, lq, lP, la, _resolve_log_z(log_z, lpi, check))
    if be == "triton":
        v = torch.ops.fdpg.seq_estimates(lpi, lq, lP, la, _resolve_log_z(log_z, lpi, check))
        out = {"kl_p_pi": v[0], "kl_pi_p": v[1], "tv": v[2], "js": v[3]}
        if la is not None:
            out["kl_pi_a"] = v[4]
        out.update(ess=v[5], log_z=v[6])
        return out
    out = reference.divergence_estimates(*_float64(lpi, lq, lP, la, _resolve_log_z(log_z, lpi, check)))
    return {k: v.to(lpi.dtype) for k, v in out.items()}
