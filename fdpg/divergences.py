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
    sum_k c_k exp(a_k s) + rest(s)`` with ``rest`` growing at most linearly, which lets the coefficient op fold
    the importance weight into every exponential (see :meth:`weighted_f_prime`).
    """

    name: str
    f: Fn
    f_prime: Fn | None = None
    exp_terms: tuple[tuple[float, float], ...] = ()
    rest: Fn | None = None
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

    def weighted_f_prime(self, s: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
        """``exp(log_w) * f'(t)`` at ``s = log t``, with ``exp(log_w)`` folded into every exponential."""
        if self.exp_terms or self.rest is not None:
            out = torch.zeros_like(s) if self.rest is None else _mul0(torch.exp(log_w), self.rest(s))
            dead = log_w == -math.inf  # pi(x) = 0: the term is 0 even where exp(a*s) is infinite
            for c, a in self.exp_terms:
                out = out + c * torch.exp(torch.where(dead, log_w, a * s + log_w))
            return out
        if self.explicit_f_prime is not None:
            return torch.exp(log_w) * self.f_prime(s)
        # exp(log_w) * exp(-s) * df/ds, the two exponentials combined.
        return torch.exp(log_w - s) * _autograd_df_ds(self.f, s)

    def is_bounded_at_inf(self) -> bool:
        """True when ``f'(t)`` stays finite as ``t -> inf``, i.e. samples with ``P(x) = 0`` are allowed."""
        if self.bounded_at_inf is not None:
            return self.bounded_at_inf
        with torch.enable_grad():
            v = self.fprime(torch.tensor([1e4, float("inf")], dtype=torch.float64))
        return bool(torch.isfinite(v).all())


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


def _mul0(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w * x`` with ``0 * inf = 0``: a sample of zero weight contributes nothing."""
    return torch.where(w == 0, torch.zeros_like(x), w * x)


def _autograd_df_ds(f: Fn, s: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = s.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x).sum(), x)
    return g


def _autograd_f_prime(f: Fn, s: torch.Tensor) -> torch.Tensor:
    return torch.exp(-s) * _autograd_df_ds(f, s)


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
    return 0.5 * (first + LOG2 - F.softplus(s))


def _js() -> Divergence:
    return Divergence("js", f=_js_f, rest=lambda s: 0.5 * (LOG2 - F.softplus(-s)), bounded_at_inf=True)


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
        far = torch.exp(m) * ((torch.exp(alpha * s - m) - alpha * torch.exp(s - m) - (1.0 - alpha) * torch.exp(-m)) / den)
        return torch.where(torch.abs(s) < 1.0, near, far)

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


def register(name: str, f: Fn, f_prime: Fn | None = None) -> Divergence:
    """Register a user divergence under ``name`` (f' from autograd when omitted) and return it."""
    if not isinstance(name, str) or not name or name in BUILTIN or name.startswith("alpha:"):
        raise ValueError(f"register: name must be a new non-empty string, not {name!r}")
    d = Divergence(name, f=f, f_prime=f_prime)
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
