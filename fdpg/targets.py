"""Targets ``P(x) = a(x) b(x)``: pointwise constraints, distributional constraints, reward tilts, and products.

``log b(x) = sum_i log 1[c_i(x)] + lambda . phi(x) + r(x) / beta``, floored at ``log_b_floor`` when one is set
(unbounded divergences need it where a pointwise constraint gives ``log b = -inf``). The prior ``a`` is scored by
the trainer; a :class:`Target` computes ``log b`` and the quantities logged beside it.

    >>> t = Target(constraints=[contains_token(3)])
    >>> s = t.score(SeqBatch(tokens, mask))       # s.log_b [B] (0 or -inf), s.satisfied [B] bool

Built-in parts work on tensors (no host sync); ``regex`` decodes with the tokenizer and ``callable`` calls a user
function ``module:function`` with ``(sequences, texts=..., contexts=...)`` (each keyword only when the function
accepts it): ``sequences`` is a list of token-id lists (the continuation, EOS included), ``texts`` their decoded
strings (needs a tokenizer), ``contexts`` the context token ids. It returns one value per sequence (booleans for
constraints, numbers for features and rewards) as a list, array or tensor.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from .config import ConfigError, FeatureSpec, TargetConfig

__all__ = ["SeqBatch", "Part", "contains_token", "token_count", "regex", "length", "from_callable", "Target",
           "TargetScores", "fit_lambdas", "build_target", "resolve_callable"]


class SeqBatch:
    """Sequences to score: tokens ``[B, T]`` long, mask ``[B, T]`` bool; optional contexts ``[B, P]`` (+ mask).

    Token-id lists and decoded texts are made once, on first use, and shared by every part that needs them.
    """

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, context_ids: torch.Tensor | None = None,
                 context_mask: torch.Tensor | None = None, tokenizer=None):
        self.tokens, self.mask = tokens, mask
        self.context_ids, self.context_mask = context_ids, context_mask
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @cached_property
    def sequences(self) -> list[list[int]]:
        lengths = self.mask.sum(-1).tolist()
        rows = self.tokens.tolist()
        return [r[:n] for r, n in zip(rows, lengths)]

    @cached_property
    def contexts(self) -> list[list[int]] | None:
        if self.context_ids is None:
            return None
        rows = self.context_ids.tolist()
        if self.context_mask is None:
            return rows
        return [[t for t, m in zip(r, ms) if m] for r, ms in zip(rows, self.context_mask.tolist())]

    @cached_property
    def texts(self) -> list[str]:
        if self.tokenizer is None:
            raise ValueError("texts: decoding needs a tokenizer, and this model has none")
        return self.tokenizer.batch_decode(self.sequences, skip_special_tokens=True)


@dataclass
class Part:
    """One part of the target: ``fn(batch) -> [B]`` (bool for a constraint, float otherwise), and a name."""

    name: str
    fn: Callable[[SeqBatch], torch.Tensor]
    needs_tokenizer: bool = False
    token_id: int | None = None

    def __call__(self, batch: SeqBatch) -> torch.Tensor:
        return self.fn(batch)


def contains_token(token_id: int, negate: bool = False) -> Part:
    def fn(b: SeqBatch):
        hit = ((b.tokens == token_id) & b.mask).any(-1)
        return ~hit if negate else hit
    return Part(f"{'not_' if negate else ''}contains_{token_id}", fn, token_id=token_id)


def token_count(token_id: int, weight: float = 1.0) -> Part:
    def fn(b: SeqBatch):
        return weight * ((b.tokens == token_id) & b.mask).sum(-1).to(torch.float32)
    return Part(f"count_{token_id}", fn, token_id=token_id)


def length(weight: float = 1.0) -> Part:
    return Part("length", lambda b: weight * b.mask.sum(-1).to(torch.float32))


def regex(pattern: str, negate: bool = False) -> Part:
    rx = re.compile(pattern)

    def fn(b: SeqBatch):
        hit = torch.tensor([rx.search(t) is not None for t in b.texts], device=b.tokens.device)
        return ~hit if negate else hit
    return Part(f"regex:{pattern}", fn, needs_tokenizer=True)


def resolve_callable(spec: str, key: str = "function", search=()) -> Callable:
    """Import ``module:function`` (the current directory and ``search`` directories are tried too)."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name.split(".")[0]:
                raise
            extra = [os.getcwd(), *map(str, search)]
            sys.path[:0] = extra
            try:
                mod = importlib.import_module(mod_name)
            finally:
                for p in extra:
                    sys.path.remove(p)
    except Exception as e:
        raise ConfigError(key, f"cannot import module {mod_name!r}: {type(e).__name__}: {e}") from None
    fn = mod
    for attr in fn_name.split("."):
        fn = getattr(fn, attr, None)
        if fn is None:
            raise ConfigError(key, f"module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise ConfigError(key, f"{spec!r} is not callable")
    return fn


def from_callable(fn: Callable, name: str, kind: str, negate: bool = False, weight: float = 1.0) -> Part:
    """Wrap a user function (see the module docstring); ``kind`` is "bool" or "float"."""
    try:
        params = inspect.signature(fn).parameters
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, var_kw = {}, False
    wants_texts = var_kw or "texts" in params
    wants_contexts = var_kw or "contexts" in params

    def call(b: SeqBatch):
        kw = {}
        if wants_texts and b.tokenizer is not None:
            kw["texts"] = b.texts
        if wants_contexts and b.contexts is not None:
            kw["contexts"] = b.contexts
        out = fn(b.sequences, **kw)
        dtype = torch.bool if kind == "bool" else torch.float32
        try:
            v = torch.as_tensor(out).to(device=b.tokens.device)
        except Exception as e:
            raise ValueError(f"{name}: expected one {'boolean' if kind == 'bool' else 'number'} per sequence, "
                             f"got {type(out).__name__} ({e})") from None
        v = v.reshape(-1) if v.dim() > 1 and v.numel() == len(b) else v
        if v.shape != (len(b),):
            raise ValueError(f"{name}: expected {len(b)} values (one per sequence), got shape {tuple(v.shape)}")
        if kind == "bool":
            if v.dtype != torch.bool and not bool(((v == 0) | (v == 1)).all()):
                raise ValueError(f"{name}: a constraint must return booleans (or 0/1), got {v.tolist()[:8]}...")
            v = v.to(dtype)
            return ~v if negate else v
        v = v.to(dtype)
        if not bool(torch.isfinite(v).all()):
            i = int((~torch.isfinite(v)).nonzero()[0])
            raise ValueError(f"{name}: returned {float(v[i])} (not finite) for sequence {i} of the batch "
                             f"({b.sequences[i]})")
        return weight * v
    return Part(name, call)


@dataclass
class TargetScores:
    """log_b ``[B]`` (floored: what training uses), log_b_raw ``[B]`` (unfloored), satisfied ``[B]`` bool (every
    pointwise constraint holds), features ``[B, K]`` float32 or None, reward ``[B]`` float32 or None."""

    log_b: torch.Tensor
    log_b_raw: torch.Tensor
    satisfied: torch.Tensor
    features: torch.Tensor | None = None
    reward: torch.Tensor | None = None


@dataclass
class Target:
    """``log b(x)``: constraints (bool parts), features with moments ``mu_bar`` and ``lambdas``, a reward over
    ``beta``, a floor. ``lambdas`` are set by :meth:`set_lambdas` (fitted by :func:`fit_lambdas`)."""

    constraints: list[Part] = field(default_factory=list)
    features: list[Part] = field(default_factory=list)
    mu_bar: list[float] = field(default_factory=list)
    reward: Part | None = None
    beta: float = 1.0
    log_b_floor: float | None = None
    lambdas: torch.Tensor | None = None

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (
                math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta: expected a finite number > 0 (the reward's temperature), got {self.beta!r}")
        if self.log_b_floor is not None and not (isinstance(self.log_b_floor, (int, float))
                                                 and math.isfinite(self.log_b_floor) and self.log_b_floor <= 0):
            raise ValueError(f"log_b_floor: expected None or a finite number <= 0 (e.g. log 1e-3), "
                             f"got {self.log_b_floor!r}")
        if len(self.mu_bar) != len(self.features):
            raise ValueError(f"mu_bar: expected one target moment per feature ({len(self.features)}), "
                             f"got {len(self.mu_bar)}")

    @property
    def has_constraints(self) -> bool:
        return bool(self.constraints)

    def set_lambdas(self, lambdas) -> None:
        self.lambdas = torch.as_tensor(lambdas, dtype=torch.float64).reshape(len(self.features))

    def satisfied(self, batch: SeqBatch) -> torch.Tensor:
        ok = torch.ones(len(batch), dtype=torch.bool, device=batch.tokens.device)
        for c in self.constraints:
            ok = ok & c(batch).to(torch.bool)
        return ok

    def feature_values(self, batch: SeqBatch) -> torch.Tensor | None:
        if not self.features:
            return None
        return torch.stack([f(batch).to(torch.float32) for f in self.features], -1)

    def score(self, batch: SeqBatch) -> TargetScores:
        sat = self.satisfied(batch)
        dev = batch.tokens.device
        log_b = torch.where(sat, torch.zeros((), device=dev), torch.full((), -math.inf, device=dev))
        phi = self.feature_values(batch)
        if phi is not None:
            if self.lambdas is None:
                raise RuntimeError("Target: the features' lambdas are not set (fit them with fit_lambdas first)")
            log_b = log_b + phi @ self.lambdas.to(device=dev, dtype=torch.float32)
        r = self.reward(batch).to(torch.float32) if self.reward is not None else None
        if r is not None:
            log_b = log_b + r / self.beta
        floored = log_b if self.log_b_floor is None else log_b.clamp_min(self.log_b_floor)
        return TargetScores(log_b=floored, log_b_raw=log_b, satisfied=sat, features=phi, reward=r)


def fit_lambdas(phi: torch.Tensor, log_w: torch.Tensor, mu_bar, *, lr: float = 1.0, steps: int = 2000,
                tol: float = 1e-4, init=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Moment matching on the convex dual ``log Z(lambda) - lambda . mu_bar`` by gradient descent (MATH.md).

    Args:
        phi: ``[N, K]`` features of samples x_j ~ q.
        log_w: ``[N]`` ``log(a(x_j) 1[constraints] / q(x_j))`` (0 for samples of the prior without constraints;
            -inf for samples outside the support).
        mu_bar: ``[K]`` target moments.

    Returns:
        ``(lambdas [K], moments [K], converged)`` in float64, where ``moments`` is the self-normalised estimate of
        ``E_p_lambda[phi]`` at the returned lambdas and ``converged`` says ``max |moments - mu_bar| <= tol``.
    """
    if not isinstance(phi, torch.Tensor) or phi.dim() != 2 or phi.shape[0] == 0:
        raise ValueError(f"phi: expected a tensor [N, K] of features (N >= 1), got "
                         f"{tuple(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__}")
    n, k = phi.shape
    phi = phi.detach().to(torch.float64)
    log_w = torch.as_tensor(log_w).detach().to(torch.float64)
    mu = torch.as_tensor(mu_bar, dtype=torch.float64, device=phi.device).reshape(-1)
    lam = (torch.zeros(k, dtype=torch.float64, device=phi.device) if init is None
           else torch.as_tensor(init, dtype=torch.float64, device=phi.device).clone().reshape(-1))
    for name, v, shape in (("log_w", log_w, (n,)), ("mu_bar", mu, (k,)), ("init", lam, (k,))):
        if tuple(v.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (phi is [{n}, {k}]), got {tuple(v.shape)}")
    for name, v in (("phi", phi), ("mu_bar", mu), ("init", lam)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name}: contains NaN or inf; expected finite values")
    if bool(torch.isnan(log_w).any()) or bool((log_w == math.inf).any()):
        raise ValueError("log_w: contains NaN or +inf; expected log-weights < +inf (-inf: a sample outside the "
                         "support)")
    if bool((log_w == -math.inf).all()):
        raise ValueError("fit_lambdas: every sample has zero weight (no sample satisfies the pointwise constraints)")

    def moments(lam):
        w = torch.softmax(log_w + phi @ lam, 0)
        return w @ phi

    m = moments(lam)
    for _ in range(steps):
        g = m - mu
        if float(g.abs().max()) <= tol:
            break
        lam = lam - lr * g
        m = moments(lam)
    return lam, m, bool((m - mu).abs().max() <= tol)


def _part(spec: FeatureSpec, key: str, kind: str, tokenizer, vocab_size: int | None, search=()) -> Part:
    if spec.token_id is not None and vocab_size is not None and spec.token_id >= vocab_size:
        raise ConfigError(f"{key}.token_id", f"token id {spec.token_id} is outside the vocabulary [0, {vocab_size})")
    if spec.type == "contains_token":
        p = contains_token(spec.token_id, spec.negate)
        return p if kind == "bool" else _scaled(p, spec.weight)
    if spec.type == "token_count":
        return token_count(spec.token_id, spec.weight)
    if spec.type == "length":
        return length(spec.weight)
    if spec.type == "regex":
        if tokenizer is None:
            raise ConfigError(f"{key}.pattern", "a regex constraint matches decoded text and needs a tokenizer; the "
                                                "model has none (set tokenizer: PATH)")
        p = regex(spec.pattern, spec.negate)
        return p if kind == "bool" else _scaled(p, spec.weight)
    if spec.type == "callable":
        fn = resolve_callable(spec.function, f"{key}.function", search)
        return from_callable(fn, f"{key} ({spec.function})", kind, spec.negate,
                             spec.weight if kind == "float" else 1.0)
    raise ConfigError(f"{key}.type", f"unknown type {spec.type!r}")


def _scaled(p: Part, weight: float) -> Part:
    return Part(p.name, lambda b: weight * p(b).to(torch.float32), p.needs_tokenizer, p.token_id)


def build_target(cfg: TargetConfig, *, log_b_floor: float | None = None, tokenizer=None,
                 vocab_size: int | None = None, search=()) -> Target:
    """A :class:`Target` from the ``target:`` section (lambdas unset unless given in the config)."""
    t = Target(
        constraints=[_part(c, f"target.constraints[{i}]", "bool", tokenizer, vocab_size, search)
                     for i, c in enumerate(cfg.constraints)],
        features=[_part(f, f"target.features[{i}]", "float", tokenizer, vocab_size, search)
                  for i, f in enumerate(cfg.features)],
        mu_bar=[f.mu_bar for f in cfg.features],
        reward=None if cfg.reward is None else _part(cfg.reward, "target.reward", "float", tokenizer, vocab_size,
                                                     search),
        beta=cfg.beta, log_b_floor=log_b_floor)
    if cfg.lambdas is not None:
        t.set_lambdas(cfg.lambdas)
    return t
