"""The training configuration: YAML in, typed dataclasses out, with errors that name the key.

    >>> cfg = load_config("examples/tiny_js.yaml", overrides=["steps=100", "eval.every=10"])
    >>> cfg = from_dict({"prior": {"tiny": {"vocab_size": 6}}, "max_length": 4})

Every error is a :class:`ConfigError` whose message starts with the dotted key (``target.constraints[0].token_id:
...``). Numbers may be written as YAML numbers or strings (PyYAML reads ``1e-3`` as a string).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

__all__ = ["ConfigError", "Config", "TinyModel", "ModelSpec", "FeatureSpec", "TargetConfig", "LambdaFit",
           "ProposalConfig", "EvalConfig", "from_dict", "load_config", "resolve", "apply_overrides", "to_dict",
           "KLReward", "DistributedConfig", "ALGORITHMS", "Q_ALGORITHMS", "FEATURE_TYPES"]

ALGORITHMS = ("fdpg", "psi_learning", "q_learning")
Q_ALGORITHMS = ("psi_learning", "q_learning")   # token-level Q-learning from a fixed batch (fdpg.qtrainer)


class ConfigError(ValueError):
    """A configuration that cannot run; ``key`` is the dotted key at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


# ---- schema -------------------------------------------------------------------------------------------------

@dataclass
class TinyModel:
    """A randomly initialised GPT-2 built from a seed (see :func:`fdpg.models.build_tiny`)."""

    vocab_size: int
    n_layer: int = 2
    n_embd: int = 32
    seed: int = 0
    n_head: int | None = None
    eos_token_id: int | None = 0
    n_positions: int = 128
    initializer_range: float = 0.02
    dropout: float = 0.0


@dataclass
class ModelSpec:
    """``path`` of a local Hugging Face model, or ``tiny``. YAML: a string, or ``{tiny: {...}}``."""

    path: str | None = None
    tiny: TinyModel | None = None


# Keys each feature/constraint/reward type takes, beyond ``type``.
FEATURE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (required keys, optional keys)
    "contains_token": (("token_id",), ("negate", "mu_bar", "weight")),
    "token_count": (("token_id",), ("weight", "mu_bar")),
    "regex": (("pattern",), ("negate", "mu_bar", "weight")),
    "length": ((), ("weight", "mu_bar")),
    "callable": (("function",), ("negate", "mu_bar", "weight")),
}


@dataclass
class FeatureSpec:
    """A pointwise constraint, a feature of a distributional constraint, or a reward.

    type: contains_token | token_count | regex | length | callable. ``negate`` flips a boolean constraint;
    ``weight`` scales a numeric value (token_count, length, rewards); ``mu_bar`` is a feature's target moment.
    """

    type: str
    token_id: int | None = None
    pattern: str | None = None
    function: str | None = None
    negate: bool = False
    weight: float = 1.0
    mu_bar: float | None = None


@dataclass
class LambdaFit:
    """Fitting the distributional constraints' lambda on the convex dual (MATH.md), before training."""

    n_samples: int = 4096
    steps: int = 2000
    lr: float = 1.0
    tol: float = 1e-4


@dataclass
class TargetConfig:
    """``P(x) = a(x) b(x)``: the product of every part given."""

    constraints: list[FeatureSpec] = field(default_factory=list)
    features: list[FeatureSpec] = field(default_factory=list)
    lambdas: list[float] | None = None
    lambda_fit: LambdaFit = field(default_factory=LambdaFit)
    reward: FeatureSpec | None = None
    beta: float = 1.0


@dataclass
class ProposalConfig:
    """Where samples come from: ``on_policy`` (q = pi) or ``kl_adaptive`` (a frozen snapshot of pi, replaced by
    pi every ``every`` steps when pi is closer to p on ``n_samples`` fresh samples; default batch_size)."""

    update: str = "on_policy"
    every: int = 10
    n_samples: int | None = None


@dataclass
class EvalConfig:
    """Evaluation every ``every`` steps: exact (true | false | auto: exact when the space has at most
    ``max_space`` sequences) or IS estimates from ``n_samples`` samples of the policy."""

    exact: Union[bool, Literal["auto"]] = "auto"
    every: int = 50
    n_samples: int = 1024
    max_space: int = 1_000_000


@dataclass
class DistributedConfig:
    """Under ``torchrun``: ``strategy`` ddp (the policy replicated, gradients all-reduced: models that fit on one
    GPU) or fsdp (FSDP2: policy, prior and proposal sharded by transformer block: models that do not). Ignored in a
    single process. ``batch_size`` is per rank: W ranks train like one process with batch W x batch_size;
    ``eval.n_samples`` and ``proposal.n_samples`` count all ranks' samples."""

    strategy: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class KLReward:
    """q_learning's per-token KL-control reward ``c k_t`` (MATH.md): ``kind`` sampled (``log a - log pi``, pi
    detached) | exact (``-KL(pi || a)`` over the vocabulary) | none; ``weight`` c (default: target.beta)."""

    kind: Literal["sampled", "exact", "none"] = "sampled"
    weight: float | None = None


@dataclass
class Config:
    prior: ModelSpec
    algorithm: str = "fdpg"
    policy: ModelSpec | None = None
    tokenizer: str | None = None
    eos_token_id: int | None = None
    max_length: int = 32
    target: TargetConfig = field(default_factory=TargetConfig)
    log_b_floor: float | None = None
    divergence: str = "forward_kl"
    baseline: Union[Literal["batch", "none"], float] = "batch"
    z_estimate: Literal["running", "batch"] = "running"
    proposal: ProposalConfig = field(default_factory=ProposalConfig)
    offline: str | None = None
    prompts: Union[str, list, None] = None
    samples_per_context: int = 1
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    output_layer: Literal["auto", "fused", "logits"] = "auto"
    eval: EvalConfig = field(default_factory=EvalConfig)
    gamma: float = 1.0
    target_update: float = 0.01
    mc_dropout: int = 0
    kl_reward: KLReward | None = None
    loss: Literal["huber", "mse"] = "huber"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    output_dir: str = "runs/fdpg"
    progress: Union[bool, Literal["auto"]] = "auto"


# ---- dict -> dataclass --------------------------------------------------------------------------------------

def _tname(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_tname(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        args = typing.get_args(tp)
        return f"a list of {_tname(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", Any: "anything"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError:
                if dataclasses.is_dataclass(a) and isinstance(value, dict):
                    raise  # the mapping's own error is the informative one
        raise ConfigError(key, f"expected {_tname(tp)}, got {value!r}") from None
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(next(a for a in typing.get_args(tp) if a == value)):
            return value
        raise ConfigError(key, f"expected one of {_tname(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_tname(tp)}, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp in (list, dict):
        if isinstance(value, tp):
            return value
        raise ConfigError(key, f"expected {'a list' if tp is list else 'a mapping'}, got {value!r}")
    if tp is ModelSpec:
        return _model_spec(value, key)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML reads 1e6 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(key, f"expected {_tname(tp)}, got {value!r}")


def _dataclass(cls, value, key: str):
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in value.items():
        sub = f"{key}.{k}" if key else str(k)
        if k not in fields_:
            raise ConfigError(sub, f"unknown key; expected one of {', '.join(fields_)}")
        kw[k] = _convert(hints[k], v, sub)
    for name, f in fields_.items():
        if name not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}.{name}" if key else name, "missing (required)")
    return cls(**kw)


def _model_spec(value, key: str) -> ModelSpec:
    if isinstance(value, str):
        return ModelSpec(path=value)
    if isinstance(value, dict):
        if set(value) != {"tiny"}:
            extra = sorted(set(value) - {"tiny"})
            raise ConfigError(f"{key}.{extra[0]}" if extra else key,
                              "expected a path (string) or {tiny: {vocab_size: ..., n_layer: ..., n_embd: ..., "
                              "seed: ...}}")
        return ModelSpec(tiny=_dataclass(TinyModel, value["tiny"], f"{key}.tiny"))
    raise ConfigError(key, f"expected a path to a local Hugging Face model or {{tiny: {{...}}}}, got {value!r}")


# ---- semantic checks that need no model ---------------------------------------------------------------------

def _positive(cfg_obj, names, key_prefix="", allow_zero=False):
    for n in names:
        v = getattr(cfg_obj, n)
        if v is None:
            continue
        if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
            raise ConfigError(f"{key_prefix}{n}", f"expected a {'non-negative' if allow_zero else 'positive'} "
                                                  f"number, got {v!r}")


def _check_feature(spec: FeatureSpec, key: str, role: str) -> None:
    if spec.type not in FEATURE_TYPES:
        raise ConfigError(f"{key}.type", f"unknown type {spec.type!r}; expected one of {', '.join(FEATURE_TYPES)}")
    required, optional = FEATURE_TYPES[spec.type]
    defaults = FeatureSpec(type=spec.type)
    for f in dataclasses.fields(FeatureSpec):
        if f.name == "type":
            continue
        given = getattr(spec, f.name) != getattr(defaults, f.name)
        if f.name in required and getattr(spec, f.name) is None:
            raise ConfigError(f"{key}.{f.name}", f"missing (required by type {spec.type})")
        if given and f.name not in required and f.name not in optional:
            raise ConfigError(f"{key}.{f.name}", f"not a key of type {spec.type} (it takes "
                                                 f"{', '.join(required + optional) or 'no other key'})")
    if role == "constraint" and spec.type in ("token_count", "length"):
        raise ConfigError(f"{key}.type", f"{spec.type} is numeric; a pointwise constraint must be boolean "
                                         "(contains_token, regex, callable)")
    if role == "feature" and spec.mu_bar is None:
        raise ConfigError(f"{key}.mu_bar", "missing (a distributional constraint needs its target moment)")
    if role != "feature" and spec.mu_bar is not None:
        raise ConfigError(f"{key}.mu_bar", f"only features (target.features) take a target moment, not a {role}")
    if spec.token_id is not None and spec.token_id < 0:
        raise ConfigError(f"{key}.token_id", f"expected a token id >= 0, got {spec.token_id}")
    for name in ("weight", "mu_bar"):
        v = getattr(spec, name, None)
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{key}.{name}", f"expected a finite number, got {v}")
    if spec.pattern is not None:
        import re

        try:
            re.compile(spec.pattern)
        except re.error as e:
            raise ConfigError(f"{key}.pattern", f"not a valid regular expression: {e}") from None
    if spec.function is not None and (":" not in spec.function or spec.function.startswith(":")):
        raise ConfigError(f"{key}.function", f"expected 'module:function', got {spec.function!r}")


def validate(cfg: Config, *, for_sampling: bool = False) -> Config:
    """Checks that need no model: value ranges, names, and combinations (``for_sampling``: see :func:`resolve`)."""
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError("algorithm", f"unknown algorithm {cfg.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if cfg.prior.path is None and cfg.prior.tiny is None:
        raise ConfigError("prior", "missing (a path or {tiny: {...}})")
    for n in ("max_length", "steps", "batch_size", "grad_accum", "samples_per_context", "keep_checkpoints"):
        if getattr(cfg, n) < 1:
            raise ConfigError(n, f"expected an integer >= 1, got {getattr(cfg, n)}")
    if cfg.eos_token_id is not None and cfg.eos_token_id < 0:
        raise ConfigError("eos_token_id", f"expected a token id >= 0 or null, got {cfg.eos_token_id}")
    if cfg.warmup_steps < 0:
        raise ConfigError("warmup_steps", f"expected an integer >= 0, got {cfg.warmup_steps}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError("threads", f"expected an integer >= 1 or null, got {cfg.threads}")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
        raise ConfigError("checkpoint_every", f"expected an integer >= 1 or null, got {cfg.checkpoint_every}")
    _positive(cfg, ("lr", "adam_eps", "grad_clip"))
    _positive(cfg, ("weight_decay",), allow_zero=True)
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        raise ConfigError("adam_betas", f"expected two numbers in [0, 1), got {cfg.adam_betas}")
    if cfg.log_b_floor is not None and not (math.isfinite(cfg.log_b_floor) and cfg.log_b_floor <= 0):
        raise ConfigError("log_b_floor", f"expected a finite number <= 0 (e.g. {math.log(1e-3):.3f} = log 1e-3), "
                                         f"got {cfg.log_b_floor}")
    if isinstance(cfg.baseline, float) and not math.isfinite(cfg.baseline):
        raise ConfigError("baseline", f"expected 'batch', 'none' or a finite number, got {cfg.baseline}")
    from . import divergences

    try:
        divergences.get(cfg.divergence)
    except (ValueError, TypeError) as e:
        raise ConfigError("divergence", str(e).split(": ", 1)[-1]) from None
    if cfg.proposal.update not in ("on_policy", "kl_adaptive"):
        raise ConfigError("proposal.update", f"expected 'on_policy' or 'kl_adaptive', got {cfg.proposal.update!r}")
    if cfg.proposal.every < 1:
        raise ConfigError("proposal.every", f"expected an integer >= 1, got {cfg.proposal.every}")
    if cfg.proposal.n_samples is not None and cfg.proposal.n_samples < 1:
        raise ConfigError("proposal.n_samples", f"expected an integer >= 1, got {cfg.proposal.n_samples}")
    if cfg.eval.every < 1 or cfg.eval.n_samples < 1 or cfg.eval.max_space < 1:
        bad = next(n for n in ("every", "n_samples", "max_space") if getattr(cfg.eval, n) < 1)
        raise ConfigError(f"eval.{bad}", f"expected an integer >= 1, got {getattr(cfg.eval, bad)}")
    if cfg.batch_size % cfg.samples_per_context:
        raise ConfigError("samples_per_context", f"batch_size ({cfg.batch_size}) must be a multiple of "
                                                 f"samples_per_context ({cfg.samples_per_context})")
    if cfg.samples_per_context > 1 and cfg.prompts is None:
        raise ConfigError("samples_per_context", "only meaningful with prompts (a conditional target)")
    if cfg.offline is not None and cfg.prompts is not None:
        raise ConfigError("prompts", "offline training takes its contexts from the offline file's 'context' field")
    if cfg.offline is not None and cfg.proposal.update != "on_policy":
        raise ConfigError("proposal.update", "offline training keeps q fixed (the model that wrote the batch); "
                                             "leave proposal.update at its default")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ConfigError("device", f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    t = cfg.target
    for i, c in enumerate(t.constraints):
        _check_feature(c, f"target.constraints[{i}]", "constraint")
    for i, c in enumerate(t.features):
        _check_feature(c, f"target.features[{i}]", "feature")
    if t.reward is not None:
        _check_feature(t.reward, "target.reward", "reward")
        if t.reward.negate:
            raise ConfigError("target.reward.negate", "a reward is numeric; use weight: -1 to flip its sign")
    if not (math.isfinite(t.beta) and t.beta > 0):
        raise ConfigError("target.beta", f"expected a positive number, got {t.beta}")
    if t.lambdas is not None and not all(math.isfinite(v) for v in t.lambdas):
        raise ConfigError("target.lambdas", f"expected finite numbers, got {t.lambdas}")
    if t.lambdas is not None and len(t.lambdas) != len(t.features):
        raise ConfigError("target.lambdas", f"expected {len(t.features)} numbers (one per feature), got "
                                            f"{len(t.lambdas)}")
    for n in ("n_samples", "steps"):
        if getattr(t.lambda_fit, n) < 1:
            raise ConfigError(f"target.lambda_fit.{n}", f"expected an integer >= 1, got {getattr(t.lambda_fit, n)}")
    _positive(t.lambda_fit, ("lr", "tol"), "target.lambda_fit.")
    _check_q_learning(cfg, need_offline=not for_sampling)
    div = divergences.get(cfg.divergence)
    if t.constraints and not div.is_bounded_at_inf() and cfg.log_b_floor is None:
        raise ConfigError("log_b_floor", f"the divergence {div.name!r} is unbounded where P(x) = 0 (a sample "
                                         "breaking a pointwise constraint gives f' = inf): set log_b_floor (e.g. "
                                         f"{math.log(1e-3):.4f}, log 1e-3) or use a bounded divergence "
                                         "(forward_kl, tv, js, hellinger, alpha < 1)")
    return cfg


Q_KEYS = ("gamma", "target_update", "mc_dropout", "kl_reward", "loss")   # psi_learning / q_learning only


def _check_q_learning(cfg: Config, need_offline: bool = True) -> None:
    """psi_learning / q_learning: their keys, a fixed batch, a reward-tilt target (the rest is checked when the
    offline file is read); for fdpg, their keys must be left at their defaults."""
    if cfg.algorithm not in Q_ALGORITHMS:
        defaults = Config(prior=cfg.prior)
        for k in Q_KEYS:
            if getattr(cfg, k) != getattr(defaults, k):
                raise ConfigError(k, f"only algorithm psi_learning or q_learning takes {k} (algorithm is "
                                     f"{cfg.algorithm!r})")
        return
    algo, t = cfg.algorithm, cfg.target
    if not (math.isfinite(cfg.gamma) and 0 < cfg.gamma <= 1):
        raise ConfigError("gamma", f"expected a discount in (0, 1], got {cfg.gamma}")
    if not (math.isfinite(cfg.target_update) and 0 < cfg.target_update <= 1):
        raise ConfigError("target_update", f"expected the Polyak rate tau in (0, 1], got {cfg.target_update}")
    if cfg.mc_dropout < 0:
        raise ConfigError("mc_dropout", f"expected an integer >= 0 (0 or 1: off), got {cfg.mc_dropout}")
    if cfg.kl_reward is not None:
        if algo != "q_learning":
            raise ConfigError("kl_reward", "only q_learning takes a KL reward (psi_learning has the prior's "
                                           "log-probability in its targets already)")
        w = cfg.kl_reward.weight
        if w is not None and not (math.isfinite(w) and w >= 0):
            raise ConfigError("kl_reward.weight", f"expected a number >= 0, got {w}")
    if need_offline and cfg.offline is None:
        raise ConfigError("offline", f"missing: {algo} learns from a fixed batch of sequences with rewards; write "
                                     "one with `fdpg sample CONFIG.yaml --n N --out FILE.jsonl`")
    if t.constraints or t.features:
        which = "target.constraints" if t.constraints else "target.features"
        raise ConfigError(which, f"{algo} reaches a reward tilt p_beta(x) ∝ a(x) exp(R(x)/beta) only; give "
                                 "target.reward (and target.beta) instead")
    if not (math.isfinite(t.beta) and t.beta > 0):
        raise ConfigError("target.beta", f"{algo} needs beta > 0 (the targets divide the reward by it), got {t.beta}")


# ---- entry points -------------------------------------------------------------------------------------------

def from_dict(data: dict, *, check: bool = True, for_sampling: bool = False) -> Config:
    """A :class:`Config` from a plain mapping (as read from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError("", f"the configuration must be a mapping of keys to values, got {type(data).__name__}")
    if "prior" not in data:
        raise ConfigError("prior", "missing (required): a path to a local Hugging Face model or {tiny: {...}}")
    cfg = _dataclass(Config, data, "")
    return validate(cfg, for_sampling=for_sampling) if check else cfg


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(item, "expected key=value (dotted keys for nesting, e.g. eval.every=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(key or item, "expected a dotted key such as eval.every")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot parse the value {raw!r} as YAML: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides) -> dict:
    """``key=value`` strings applied to a mapping (values parsed as YAML; dotted keys create nested mappings)."""
    data = dict(data)
    for item in overrides or ():
        parts, value = _parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[:i + 1]), f"is {nxt!r}, not a mapping, so "
                                                           f"{'.'.join(parts)} cannot be set")
            else:
                nxt = dict(nxt)
            node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return data


def _read_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError("", f"no configuration file at {str(path)!r}") from None
    except IsADirectoryError:
        raise ConfigError("", f"{str(path)!r} is a directory; expected a YAML configuration file") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping of keys to values at the top level")
    return data


def load_config(path: str | os.PathLike, overrides=()) -> Config:
    """Read a YAML file, apply ``key=value`` overrides, and validate."""
    return from_dict(apply_overrides(_read_yaml(path), overrides))


def resolve(config, overrides=(), *, for_sampling: bool = False) -> Config:
    """A :class:`Config`, a mapping, or a YAML path, with ``key=value`` overrides applied, validated.

    ``for_sampling``: the configuration of ``fdpg sample`` (its prior, prompts, reward): its ``offline`` file is
    dropped, and a psi_learning / q_learning configuration needs none."""
    if isinstance(config, Config):
        if not (overrides or for_sampling):
            return config
        data = to_dict(config)
    elif isinstance(config, dict):
        data = config
    else:
        data = _read_yaml(config)
    data = apply_overrides(data, overrides)
    return from_dict({**data, "offline": None}, for_sampling=True) if for_sampling else from_dict(data)


def to_dict(cfg) -> dict:
    """The plain mapping of a config (round-trips through :func:`from_dict`)."""
    if isinstance(cfg, ModelSpec):
        return cfg.path if cfg.path is not None else {"tiny": to_dict(cfg.tiny)}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg
