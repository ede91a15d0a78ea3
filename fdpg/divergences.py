"""f-divergences D_f(pi || p) = E_p[f(pi/p)], written in log space.

Every function takes ``s = log t = log(pi/p)`` (a tensor, any float dtype) and never forms ``t = exp(s)``
where that could overflow: results are finite wherever the true value is representable, and never NaN for
finite ``s`` (``s = +inf``, a sample outside the target's support, is handled where the limit exists).

``f_prime(s)`` is ``f'(t)``, the derivative with respect to ``t``. The f-DPG coefficient of a sample is
``(pi/q) * (f'(t) - B)``; :meth:`Divergence.weighted_f_prime` computes ``exp(log_w) * f'(t)`` without
overflow, folding the importance weight into the exponent (forward KL's ``f'`` alone is ``-exp(-s)``, which
overflows for ``s < -709`` in float64, while ``(pi/q) f'`` stays ``-p/q``).

    >>> from fdpg import divergences
    >>> js = divergences.get("js")
    >>> js.f_prime(torch.tensor([0.0]))          # 1/2 (log 2 - log 2) = 0
    >>> mine = divergences.Divergence("mine", f=lambda s: torch.expm1(s) ** 4)   # f' from autograd
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Divergence", "get", "register", "names", "BUILTIN"]

LOG2 = math.log(2.0)

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """An f-divergence given by its generator ``f`` as a function of ``s = log t``.

    ``f_prime`` (derivative with respect to ``t``, as a function of ``s``) may be omitted: it is then
    ``exp(-s) * d f / d s`` from autograd (or the built-ins' closed form); ``f_prime`` is callable either way. The built-ins also carry ``exp_terms`` and ``rest``: ``f'(s) =
    sum_k c_k exp(a_k s) + rest_const + rest(s)`` with ``rest`` growing at most linearly, which lets the coefficient op fold
    the importance weight into every exponential (see :meth:`weighted_f_prime`).
    """

    name: str
    f: Fn
    f_prime: Fn | None = None
    exp_terms: tuple[tuple[float, float], ...] = ()
    rest: Fn | None = None
    rest_const: float = 0.0    # a constant part of f' kept apart from ``rest``: it cancels exactly in differences
    # f'(+inf) is finite: the divergence tolerates samples with P(x) = 0 (log b = -inf).
    bounded_at_inf: bool | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.f_prime is None:  # always callable: derived from the closed form or from autograd of f
            object.__setattr__(self, "f_prime", _FromF(self))

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return self.f(s)

    @property
    def explicit_f_prime(self) -> Fn | None:
        """The ``f_prime`` given by the caller, or None where it is derived from ``f``."""
        return None if isinstance(self.f_prime, _FromF) else self.f_prime

    def fprime(self, s: torch.Tensor) -> torch.Tensor:
        """``f'(t)`` at ``s = log t`` (the same as ``f_prime(s)``)."""
        return self.f_prime(s)

    def weighted_f_prime(self, s: torch.Tensor, log_w: torch.Tensor, shift=0.0) -> torch.Tensor:
        """``exp(log_w) * (f'(t) - shift)`` at ``s = log t``, with ``exp(log_w)`` folded into every exponential.

        ``shift`` (a number or a tensor broadcasting with ``s``: the f-DPG baseline) is taken from the part of
        ``f'`` that is not an exponential of ``s`` before the weight multiplies it, so that the two never cancel
        as overflowing products: a dominant sample's coefficient ``(pi/q)(f' - B)`` stays finite where ``pi/q``
        alone overflows. A sample of zero weight (``log_w = -inf``) gives 0.
        """
        dead = log_w == -math.inf  # pi(x) = 0: the term is 0 even where f'(t) or exp(a*s) is infinite
        if self.exp_terms or self.rest is not None:
            out = _fold(log_w, (self.rest_const - shift) + (0.0 if self.rest is None else self.rest(s)))
            for c, a in self.exp_terms:
                out = out + c * torch.exp(torch.where(dead, log_w, a * s + log_w))
            return out
        if self.explicit_f_prime is not None:
            out = _fold(log_w, self.f_prime(s) - shift)
        else:  # exp(log_w) * exp(-s) * df/ds, the two exponentials combined
            g = _fold(log_w.to(torch.float64) - _at_inf(s), _autograd_df_ds(self.f, s)).to(s.dtype)
            out = g - _fold(log_w, shift + torch.zeros_like(s))
        return torch.where(dead, torch.zeros_like(out), out)

    def weighted_f_prime_gap(self, s_i: torch.Tensor, s: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
        """``exp(log_w) * (f'(t_i) - f'(t))`` elementwise, at ``s_i = log t_i`` (a scalar) and ``s = log t``: each
        term exact where the two sides are close (the exponentials and the rest differenced before the weight
        multiplies them), 0 where ``log_w = -inf``. The batch-baseline coefficient of a sample holding nearly all
        the importance weight is ``wn_i sum_j`` of these (:func:`fdpg.reference.fdpg_coefficients`)."""
        s_i = s_i.expand_as(s)
        dead = log_w == -math.inf
        if self.exp_terms or self.rest is not None:
            # sum_k c_k (exp(a_k s_i + lw) - exp(a_k s + lw)) + exp(lw) (rest(s_i) - rest(s)), rest_const gone
            out = torch.zeros_like(s) if self.rest is None else _fold(log_w, self.rest(s_i) - self.rest(s))
            for c, a in self.exp_terms:
                out = out + c * (torch.exp(torch.where(dead, log_w, a * s_i + log_w))
                                 - torch.exp(torch.where(dead, log_w, a * s + log_w)))
            return out
        out = _fold(log_w, self.fprime(s_i) - self.fprime(s))
        return torch.where(dead, torch.zeros_like(out), out)

    def is_bounded_at_inf(self) -> bool:
        """True when ``f'(t)`` stays finite as ``t -> inf``, i.e. samples with ``P(x) = 0`` are allowed.

        Unless declared (``bounded_at_inf``, as :func:`register` takes it): true when ``f'`` is finite at
        ``s = 40``, ``80`` and ``inf`` and has settled by ``s = 40`` (its values at 40 and 80, in float64, agree to
        1e-6 relative).
        """
        if self.bounded_at_inf is not None:
            return self.bounded_at_inf
        with torch.enable_grad():
            v = self.fprime(torch.tensor([40.0, 80.0, float("inf")], dtype=torch.float64))
        return bool(torch.isfinite(v).all()) and abs(float(v[1] - v[0])) <= 1e-6 * (1.0 + abs(float(v[0])))


class _FromF:
    """``f'(t)`` of a divergence given without one: the built-ins' closed form, else ``exp(-s) df/ds`` by autograd."""

    __slots__ = ("div",)

    def __init__(self, div: "Divergence"):
        self.div = div

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        d = self.div
        if d.exp_terms or d.rest is not None:
            return d.weighted_f_prime(s, torch.zeros_like(s))
        return _autograd_f_prime(d.f, s)

    def __repr__(self) -> str:
        return "<f' derived from f>"


def _fold(log_w: torch.Tensor, x) -> torch.Tensor:
    """``exp(log_w) * x``, finite wherever the product is: where ``exp(log_w)`` alone overflows or underflows it is
    ``sign(x) exp(log_w + log|x|)``. 0 where ``x = 0`` or ``log_w = -inf``."""
    x = torch.as_tensor(x, device=log_w.device)
    w = torch.exp(log_w)
    direct = w * x
    far = torch.sign(x) * torch.exp(log_w + torch.log(torch.abs(x)))
    out = torch.where(torch.isfinite(direct) & (w != 0) & torch.isfinite(w), direct, far)
    return torch.where((x == 0) | (log_w == -math.inf), torch.zeros_like(out), out)


S_INF = 80.0  # where f' by autograd is taken for s = +inf (P(x) = 0): is_bounded_at_inf found it settled there


def _at_inf(s: torch.Tensor) -> torch.Tensor:
    """``s`` in float64 with +inf replaced by ``S_INF``."""
    s = s.detach().to(torch.float64)
    return torch.where(s == math.inf, torch.full_like(s, S_INF), s)


def _autograd_df_ds(f: Fn, s: torch.Tensor) -> torch.Tensor:
    """``df/ds`` by autograd in float64 (float32's exponent range ends at s = 88), at ``S_INF`` for s = +inf."""
    with torch.enable_grad():
        x = _at_inf(s).requires_grad_(True)
        (g,) = torch.autograd.grad(f(x).sum(), x)
    return g


def _autograd_f_prime(f: Fn, s: torch.Tensor) -> torch.Tensor:
    """``f'(t) = exp(-s) df/ds``, the exponential folded in (finite wherever ``df/ds`` is, in float64)."""
    return _fold(-_at_inf(s), _autograd_df_ds(f, s)).to(s.dtype)


def _xexp(s: torch.Tensor) -> torch.Tensor:
    """``s * exp(s)``, 0 at ``s = -inf``."""
    return torch.where(s == -math.inf, torch.zeros_like(s), s * torch.exp(s))


# ---- built-in generators, as functions of s ---------------------------------------------------------------

def _forward_kl() -> Divergence:
    # f(t) = -log t ; f'(t) = -1/t = -exp(-s)
    return Divergence("forward_kl", f=lambda s: -s, exp_terms=((-1.0, -1.0),), bounded_at_inf=True)


def _reverse_kl() -> Divergence:
    # f(t) = t log t ; f'(t) = log t + 1
    return Divergence("reverse_kl", f=_xexp, rest=lambda s: s + 1.0, bounded_at_inf=False)


def _tv() -> Divergence:
    # f(t) = |t - 1| / 2 ; f'(t) = sign(t - 1) / 2
    return Divergence("tv", f=lambda s: 0.5 * torch.abs(torch.expm1(s)), rest=lambda s: 0.5 * torch.sign(s),
                      bounded_at_inf=True)


def _js_f(s: torch.Tensor) -> torch.Tensor:
    # 1/2 [ t log(2t/(1+t)) + log(2/(1+t)) ]; log(2t/(1+t)) = log2 - softplus(-s), log(2/(1+t)) = log2 - softplus(s)
    a = LOG2 - F.softplus(-s)
    first = torch.where(s == -math.inf, torch.zeros_like(s), torch.exp(s) * a)
    out = 0.5 * (first + LOG2 - F.softplus(s))
    return torch.where(s == math.inf, s, out)  # t log 2 - log t / 2 + ... -> inf


def _js() -> Divergence:
    # f'(t) = 1/2 log(2t / (1 + t)) = 1/2 (log 2 - softplus(-s)): log 2 apart, so that differences of f' keep
    # softplus(-s) ~ exp(-s) where it is far below log 2
    return Divergence("js", f=_js_f, rest=lambda s: -0.5 * F.softplus(-s), rest_const=0.5 * LOG2,
                      bounded_at_inf=True)


def _hellinger() -> Divergence:
    # f(t) = (sqrt t - 1)^2 ; f'(t) = 1 - t^{-1/2}
    return Divergence("hellinger", f=lambda s: torch.expm1(0.5 * s) ** 2, exp_terms=((-1.0, -0.5),),
                      rest=lambda s: torch.ones_like(s), bounded_at_inf=True)


def _chi2() -> Divergence:
    # f(t) = (t - 1)^2 ; f'(t) = 2 (t - 1)
    return Divergence("chi2", f=lambda s: torch.expm1(s) ** 2, exp_terms=((2.0, 1.0),),
                      rest=lambda s: torch.full_like(s, -2.0), bounded_at_inf=False)


def _alpha(alpha: float) -> Divergence:
    if not math.isfinite(alpha) or alpha in (0.0, 1.0):
        raise ValueError(f"divergence: alpha must be finite and not 0 or 1 (got {alpha}); "
                         "alpha -> 1 is 'reverse_kl' and alpha -> 0 is 'forward_kl'")
    den = alpha * (alpha - 1.0)

    def f(s: torch.Tensor) -> torch.Tensor:
        # (t^a - a t - (1 - a)) / (a (a - 1)): near s = 0 as (expm1(a s) - a expm1(s)), free of cancellation;
        # elsewhere with the largest exponential factored out, so that no inf - inf can occur.
        near = (torch.expm1(alpha * s) - alpha * torch.expm1(s)) / den
        m = torch.maximum(torch.maximum(alpha * s, s), torch.zeros_like(s))
        inner = (torch.exp(alpha * s - m) - alpha * torch.exp(s - m) - (1.0 - alpha) * torch.exp(-m)) / den
        far = torch.exp(m + torch.log(inner.clamp(min=0)))   # f >= 0; exp(m) alone may overflow where f does not
        out = torch.where(torch.abs(s) < 1.0, near, far)
        # the limits: f(inf) = inf for every alpha; f(0) = 1/alpha for alpha > 0, inf for alpha < 0
        low = torch.full_like(s, 1.0 / alpha if alpha > 0 else math.inf)
        return torch.where(s == math.inf, s, torch.where(s == -math.inf, low, out))

    c = 1.0 / (alpha - 1.0)
    return Divergence(f"alpha:{alpha:g}", f=f, exp_terms=((c, alpha - 1.0),),
                      rest=lambda s: torch.full_like(s, -c), bounded_at_inf=alpha < 1.0,
                      params={"alpha": alpha})


BUILTIN: dict[str, Callable[[], Divergence]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "tv": _tv,
    "js": _js,
    "hellinger": _hellinger,
    "chi2": _chi2,
}
_ALIASES = {"kl": "forward_kl", "fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "js", "squared_hellinger": "hellinger",
            "pearson": "chi2"}
_USER: dict[str, Divergence] = {}


def names() -> list[str]:
    """Every name :func:`get` accepts (``alpha:<value>`` stands for the family)."""
    return sorted(BUILTIN) + ["alpha:<value>"] + sorted(_USER)


def register(name: str, f: Fn, f_prime: Fn | None = None, *, bounded_at_inf: bool | None = None) -> Divergence:
    """Register a user divergence under ``name`` (f' from autograd when omitted) and return it.

    ``bounded_at_inf``: whether ``f'(t)`` stays finite as ``t -> inf`` (samples with P(x) = 0 allowed); None
    decides by evaluating ``f'`` (:meth:`Divergence.is_bounded_at_inf`). The name must not be one :func:`get`
    resolves to a built-in (any case, aliases such as ``kl`` included); registering a user name again replaces
    that divergence.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if not key or key in BUILTIN or key in _ALIASES or key.startswith("alpha:"):
        raise ValueError(f"register: name must be a non-empty string that names no built-in divergence or "
                         f"alias ({', '.join(sorted(BUILTIN) + sorted(_ALIASES))}, alpha:<value>), not {name!r}")
    d = Divergence(name, f=f, f_prime=f_prime, bounded_at_inf=bounded_at_inf)
    _USER[name] = d
    return d


def get(name: str | Divergence) -> Divergence:
    """The divergence called ``name``: one of :func:`names`, or ``"alpha:<value>"``; a Divergence passes through."""
    if isinstance(name, Divergence):
        return name
    if not isinstance(name, str):
        raise TypeError(f"divergence: expected a name (str) or a Divergence, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in BUILTIN:
        return BUILTIN[key]()
    if key.startswith("alpha:"):
        try:
            alpha = float(key.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"divergence: {name!r} is not 'alpha:<number>'") from None
        return _alpha(alpha)
    if name in _USER:
        return _USER[name]
    raise ValueError(f"divergence: unknown name {name!r}; expected one of {', '.join(names())}")
