"""fdpg's CUDA C++ backend (csrc/): loader and Python wrappers of its ops.

The extension is found, in order: prebuilt by setup.py next to this file (``fdpg/_fdpg_cuda*.so``), or at
``$FDPG_CUDA_LIB``; else compiled just in time from ``csrc/`` (source checkouts, on a machine with a CUDA device
and nvcc) with ``torch.utils.cpp_extension.load``, or with ``csrc/build.py`` when that fails (e.g. without ninja),
cached under ``$FDPG_CUDA_CACHE`` (default ``~/.cache/fdpg``). Nothing is loaded at ``import fdpg``: the first
:func:`available` call loads it, and never raises (:func:`load_error` says why not). ``FDPG_CUDA=0`` turns the
backend off; ``FDPG_CUDA_JIT=0`` skips the just-in-time build; ``FDPG_CUDA_VERBOSE=1`` shows the compile commands.

Ops: the C++ library defines ``torch.ops.fdpg_cuda.*_on_stream`` (the CUDA stream is an integer argument, as the
binding cannot include torch's CUDA headers); on top of them this module defines stream-free custom ops
``torch.ops.fdpg_cuda.{paired_logprobs_fwd, paired_logprobs_bwd, paired_logprobs_bwd_inplace, sequence_sums,
coefficients, estimates}`` that read the current stream at run time, with fake kernels, so that ``torch.compile``
traces them as opaque calls. The functions below wrap those ops with argument checks:

- :func:`token_stats_forward`, :func:`token_stats_backward`, :func:`masked_row_sums`: the interface of the
  Triton launch wrappers in ``fdpg.kernels.logprobs`` (same arguments, same outputs), so a backend switch is a
  module switch.
- :func:`paired_logprobs_fwd`, :func:`paired_logprobs_bwd`, :func:`sequence_sums`: the same ops as tuples.
- :func:`coefficients`, :func:`estimates`: ``fdpg.reference.fdpg_coefficients`` / ``divergence_estimates`` for a
  batch of sequences in one launch.
"""
import math
import os
import threading
from typing import Optional

import torch

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(os.path.dirname(_PKG_DIR), "csrc")
_JIT_NAME = "fdpg_cuda_jit"

_state: dict = {}
_lock = threading.RLock()
_ops: dict = {}  # keeps the Python custom ops alive

__all__ = [
    "available", "ready", "load_error", "load_library", "loaded_path",
    "paired_logprobs_fwd", "paired_logprobs_bwd", "sequence_sums", "coefficients", "estimates",
    "token_stats_forward", "token_stats_backward", "masked_row_sums", "divergence_params",
]


# ---- loading ---------------------------------------------------------------------------------------------------

def available() -> bool:
    """True when the compiled extension is loaded and a CUDA device is present (loads it on the first call)."""
    with _lock:
        if "ok" not in _state:
            try:
                _state["ok"], _state["error"] = _try_load()
            except Exception as e:  # never raise from here: the package falls back to Triton/torch
                _state["ok"], _state["error"] = False, f"{type(e).__name__}: {e}"
        return _state["ok"]


def ready() -> bool:
    """True when the extension is loaded, or loads from a prebuilt library now; never builds it (``backend="auto"``
    takes the CUDA kernels only then: a just-in-time build is for an explicit ``backend="cuda"``)."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
    if not _prebuilt() or not torch.cuda.is_available():
        return False
    return available()


def load_error() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    available()
    return _state.get("error")


def loaded_path() -> Optional[str]:
    """Path of the loaded extension library, or None."""
    return _state.get("path")


def load_library(path: str) -> None:
    """Load a built extension library (``csrc/build.py`` or setup.py output) and register the Python ops.

    Idempotent for the same file; loading a second, different build of the ops is refused (the C++ library
    registers the ``fdpg_cuda`` namespace once per process).
    """
    path = os.path.abspath(path)
    with _lock:
        if _state.get("path"):
            if os.path.realpath(path) != os.path.realpath(_state["path"]):
                raise RuntimeError(f"fdpg's CUDA extension is already loaded from {_state['path']}; "
                                   f"cannot also load {path}")
            return
        torch.ops.load_library(path)
        _state["path"] = path
        _register_python_ops()


def _prebuilt() -> list:
    env = os.environ.get("FDPG_CUDA_LIB")
    if env:
        return [env]
    import glob

    return sorted(glob.glob(os.path.join(_PKG_DIR, "_fdpg_cuda*.so")))


def _try_load():
    if os.environ.get("FDPG_CUDA", "1") == "0":
        return False, "the CUDA backend is turned off (FDPG_CUDA=0)"
    if not torch.cuda.is_available():
        why = "torch is a CPU build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        return False, f"no CUDA device ({why})"
    if _state.get("path"):
        return True, None
    errors = []
    for path in _prebuilt():
        try:
            load_library(path)
            return True, None
        except Exception as e:
            errors.append(f"loading {path} failed: {type(e).__name__}: {e}")
    if not errors:
        errors.append("no prebuilt extension (pip install builds it where nvcc and a CUDA build of torch are "
                      "present, or with FDPG_BUILD_CUDA=1)")
    if os.environ.get("FDPG_CUDA_JIT", "1") == "0":
        errors.append("just-in-time build skipped (FDPG_CUDA_JIT=0)")
        return False, "; ".join(errors)
    if not os.path.isfile(os.path.join(_CSRC, "binding.cpp")):
        errors.append(f"no sources for a just-in-time build ({_CSRC} is missing: not a source checkout)")
        return False, "; ".join(errors)
    try:
        _jit_torch()
        return True, None
    except Exception as e:
        errors.append(f"torch.utils.cpp_extension.load failed: {type(e).__name__}: {str(e)[-2000:]}")
    try:
        _jit_recipe()
        return True, None
    except Exception as e:
        errors.append(f"csrc/build.py failed: {type(e).__name__}: {str(e)[-2000:]}")
    return False, "; ".join(errors)


def _build_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fdpg_cuda_build", os.path.join(_CSRC, "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _device_archs() -> list:
    if os.environ.get("FDPG_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return _build_module().archs_from_env()
    major, minor = torch.cuda.get_device_capability()
    return [f"{major}{minor}"]


def _jit_torch() -> None:
    from torch.utils import cpp_extension

    b = _build_module()
    verbose = os.environ.get("FDPG_CUDA_VERBOSE", "0") == "1"
    path = cpp_extension.load(
        name=_JIT_NAME,
        sources=[os.path.join(_CSRC, b.BINDING)] + [os.path.join(_CSRC, k) for k in b.KERNELS],
        extra_include_paths=[_CSRC],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,
        verbose=verbose,
    )
    with _lock:  # cpp_extension.load has already loaded the library
        _state["path"] = os.path.abspath(path)
        _register_python_ops()


def _jit_recipe() -> None:
    b = _build_module()
    archs = _device_archs()
    cache = os.environ.get("FDPG_CUDA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fdpg")
    out = os.path.join(cache, f"cuda-{b.fingerprint(archs)}", b.LIB_NAME + ".so")
    if not os.path.isfile(out):
        b.build(out, archs=archs, jobs=os.cpu_count(), verbose=os.environ.get("FDPG_CUDA_VERBOSE", "0") == "1")
    load_library(out)


# ---- op registration: fake kernels of the C++ ops, stream-free Python custom ops ----------------------------------

def _vec(like: torch.Tensor, shape, want: bool, dtype=torch.float32) -> torch.Tensor:
    return like.new_empty(tuple(shape) if want else (0,), dtype=dtype)


def _fwd_fake(policy_logits, prior_logits, targets, temperature, with_entropy, with_kl, *_):
    lead, has_prior = policy_logits.shape[:-1], prior_logits is not None
    return tuple(_vec(policy_logits, lead, w) for w in (True, True, True, has_prior, has_prior, has_prior,
                                                        with_entropy, with_kl))


def _bwd_fake(policy_logits, *_):
    return torch.empty_like(policy_logits, memory_format=torch.contiguous_format)


def _bwd_inplace_fake(policy_logits, *_):
    return None


def _sums_fake(token_lp, token_lp2, mask, *_):
    lead = token_lp.shape[:-1]
    return token_lp.new_empty(lead), token_lp.new_empty(lead if token_lp2 is not None else (0,))


def _coef_fake(policy_logprob, *_):
    n = policy_logprob.shape[0]
    return (policy_logprob.new_empty((n,)), policy_logprob.new_empty(()), policy_logprob.new_empty((n,)),
            policy_logprob.new_empty(()), policy_logprob.new_empty(()))


def _est_fake(policy_logprob, *_):
    return policy_logprob.new_empty((7,))


_BWD_ARGS = ("Tensor? prior_logits, Tensor targets, Tensor policy_lse, Tensor? prior_lse, Tensor? grad_lp, "
             "Tensor? grad_lse, Tensor? grad_entropy, Tensor? grad_kl, Tensor? entropy, Tensor? kl, float temperature")
_SCHEMAS = {
    "paired_logprobs_fwd": ("(Tensor policy_logits, Tensor? prior_logits, Tensor targets, float temperature, "
                            "bool with_entropy, bool with_kl) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
                            "Tensor, Tensor)", (), _fwd_fake),
    "paired_logprobs_bwd": (f"(Tensor policy_logits, {_BWD_ARGS}) -> Tensor", (), _bwd_fake),
    "paired_logprobs_bwd_inplace": (f"(Tensor(a!) policy_logits, {_BWD_ARGS}) -> ()", ("policy_logits",),
                                    _bwd_inplace_fake),
    "sequence_sums": ("(Tensor token_lp, Tensor? token_lp2, Tensor mask) -> (Tensor, Tensor)", (), _sums_fake),
    "coefficients": ("(Tensor policy_logprob, Tensor proposal_logprob, Tensor target_logscore, Tensor? log_z, "
                     "float[] exp_coef, float[] exp_rate, float[] rest, int baseline_mode, float baseline_value) "
                     "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", (), _coef_fake),
    "estimates": ("(Tensor policy_logprob, Tensor proposal_logprob, Tensor target_logscore, Tensor? prior_logprob, "
                  "Tensor? log_z) -> Tensor", (), _est_fake),
}


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _make_impl(name: str):
    raw = getattr(torch.ops.fdpg_cuda, name + "_on_stream")

    def impl(*args):
        return raw(*args, _stream(args[0]))

    impl.__name__ = name
    return impl


def _register_python_ops() -> None:
    """Fake kernels of the C++ ops and the stream-free custom ops; once per process, after the library loads."""
    if _ops:
        return
    for name, (schema, mutates, fake) in _SCHEMAS.items():
        torch.library.register_fake(f"fdpg_cuda::{name}_on_stream", fake)
        op = torch.library.custom_op(f"fdpg_cuda::{name}", _make_impl(name), mutates_args=mutates,
                                     device_types="cuda", schema=schema)
        op.register_fake(fake)
        _ops[name] = op


# ---- wrappers ------------------------------------------------------------------------------------------------

def _require() -> None:
    if not _ops:
        if not available():
            raise RuntimeError(f"fdpg's CUDA extension is not available: {load_error()}")


def _on_device(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cuda", "meta"):
        raise ValueError(f"{name}: the CUDA backend needs CUDA tensors, got one on {t.device}")


_LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _logits(name: str, t: torch.Tensor) -> torch.Tensor:
    """Checks ``[..., V]`` logits; any strides (the op reads rows in place where the columns are contiguous)."""
    _on_device(name, t)
    if t.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"{name}: the CUDA backend takes float32, float16 or bfloat16 logits, got {t.dtype}")
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape [..., V] with V >= 1, got {tuple(t.shape)}")
    return t


def _rows(name: str, t: Optional[torch.Tensor], lead: tuple) -> Optional[torch.Tensor]:
    if t is None:
        return None
    _on_device(name, t)
    if t.numel() != math.prod(lead):
        raise ValueError(f"{name}: expected shape {lead} (one value per row of the logits), got {tuple(t.shape)}")
    return t.detach().reshape(lead).to(torch.float32)


def _targets(targets: torch.Tensor, lead: tuple) -> torch.Tensor:
    _on_device("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected integer token ids, got dtype {targets.dtype}")
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets: expected shape {lead} (the leading dims of the logits), got {tuple(targets.shape)}")
    return targets


def _temperature(value) -> float:
    tau = float(value)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature: expected a finite positive float, got {value!r}")
    return tau


def _prior(prior_logits, policy_logits) -> Optional[torch.Tensor]:
    if prior_logits is None:
        return None
    _logits("prior_logits", prior_logits)
    if tuple(prior_logits.shape) != tuple(policy_logits.shape):
        raise ValueError(f"prior_logits: expected shape {tuple(policy_logits.shape)} like policy_logits, "
                         f"got {tuple(prior_logits.shape)}")
    return prior_logits.detach()


def token_stats_forward(policy, prior, targets, temperature=1.0, entropy=False, kl=False) -> dict:
    """One pass over each row of policy (and prior) logits; the interface of ``fdpg.kernels.logprobs``.

    policy ``[..., V]``, prior ``[..., V]`` or None: float32, float16 or bfloat16 (dtypes may differ) on a CUDA
    device, any strides (rows are read in place when the columns are contiguous and the leading dims merge into
    two levels, e.g. ``logits[:, :-1]``; otherwise from a contiguous copy). targets ``[...]`` integer ids in
    ``[0, V)`` (an id out of range gives a NaN log-prob). Returns a dict of float32 ``[...]`` tensors: ``lp``,
    ``lse`` (logsumexp of logits / temperature), ``max`` (max of logits / temperature) and, as asked, ``entropy``
    (H(pi)), ``kl`` (exact KL(pi || prior)), ``prior_lp``, ``prior_lse``, ``prior_max``.
    """
    _require()
    _logits("policy_logits", policy)
    pri = _prior(prior, policy)
    if kl and pri is None:
        raise ValueError("kl: the KL to the prior needs prior logits")
    lead = tuple(policy.shape[:-1])
    outs = torch.ops.fdpg_cuda.paired_logprobs_fwd(policy.detach(), pri, _targets(targets, lead),
                                                   _temperature(temperature), bool(entropy), bool(kl))
    names = ("lp", "lse", "max", "prior_lp", "prior_lse", "prior_max", "entropy", "kl")
    want = (True, True, True, pri is not None, pri is not None, pri is not None, bool(entropy), bool(kl))
    return {k: o for k, o, w in zip(names, outs, want) if w}


def token_stats_backward(policy, prior, targets, lse, *, entropy=None, kl=None, prior_lse=None, grad_lp=None,
                         grad_lse=None, grad_entropy=None, grad_kl=None, grad_seq=None, mask=None, temperature=1.0,
                         out=None) -> torch.Tensor:
    """Gradient with respect to ``policy [..., V]`` in its dtype; the interface of ``fdpg.kernels.logprobs``.

    ``grad = [g_lp (onehot(y) - p) + g_lse p - g_H p (log p + H) + g_KL p (log p - log a - KL)] / temperature``
    with ``p = softmax(policy / temperature)``; ``grad_*`` are ``[...]`` (or None: zero); ``grad_seq``
    ``[...[:-1]]`` with ``mask [...]`` is the gradient of masked sums of the log-probs over the last dim (it adds
    ``grad_seq * mask`` to ``grad_lp``). ``grad_entropy`` needs the forward's ``entropy``; ``grad_kl`` needs
    ``prior``, ``prior_lse`` and ``kl``. Written into ``out`` (``policy`` itself: in place, no ``[..., V]``
    allocation; the logits must not overlap in memory) or a new contiguous tensor.
    """
    _require()
    _logits("policy_logits", policy)
    lead = tuple(policy.shape[:-1])
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy: the entropy gradient needs the forward's entropy")
    if grad_kl is not None and (prior is None or prior_lse is None or kl is None):
        raise ValueError("grad_kl: the KL gradient needs prior logits, prior_lse and the forward's kl")
    if grad_seq is not None:
        if mask is None:
            raise ValueError("grad_seq: needs the mask")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask: expected shape {lead} like targets, got {tuple(mask.shape)}")
        seq = grad_seq.detach().to(torch.float32).unsqueeze(-1) * (mask != 0)
        grad_lp = seq if grad_lp is None else grad_lp.detach().to(torch.float32) + seq
    if lse is None:
        raise ValueError("lse: required (the forward's logsumexp of the policy)")
    pri = _prior(prior, policy) if grad_kl is not None else None
    args = (pri, _targets(targets, lead), _rows("lse", lse, lead), _rows("prior_lse", prior_lse, lead),
            _rows("grad_lp", grad_lp, lead), _rows("grad_lse", grad_lse, lead),
            _rows("grad_entropy", grad_entropy, lead), _rows("grad_kl", grad_kl, lead),
            _rows("entropy", entropy, lead), _rows("kl", kl, lead), _temperature(temperature))
    if out is not None and out is policy:
        torch.ops.fdpg_cuda.paired_logprobs_bwd_inplace(policy.detach(), *args)
        return policy
    grad = torch.ops.fdpg_cuda.paired_logprobs_bwd(policy.detach(), *args)
    if out is not None:
        out.copy_(grad)
        return out
    return grad


def masked_row_sums(x, mask, prior_x=None):
    """Masked sums over the last dim of ``x [..., T]`` (and of ``prior_x``), float32 (float64 stays float64):
    masked positions add exactly 0, even where ``x`` is -inf or NaN. ``mask [..., T]`` bool or numbers (nonzero
    keeps). Returns ``(sums, prior_sums)``, ``[...]`` each (``prior_sums`` None without ``prior_x``)."""
    _require()
    _on_device("token_lp", x)
    _on_device("mask", mask)
    if x.dim() < 1:
        raise ValueError(f"token_lp: expected shape [..., T], got {tuple(x.shape)}")
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"mask: expected shape {tuple(x.shape)} like token_lp, got {tuple(mask.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"token_lp: expected a floating-point tensor, got dtype {x.dtype}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = None
    if prior_x is not None:
        _on_device("prior_token_lp", prior_x)
        if tuple(prior_x.shape) != tuple(x.shape):
            raise ValueError(f"prior_token_lp: expected shape {tuple(x.shape)}, got {tuple(prior_x.shape)}")
        x2 = prior_x.detach().to(dt)
    m = mask if mask.dtype == torch.bool else mask != 0
    s, s2 = torch.ops.fdpg_cuda.sequence_sums(x.detach().to(dt), x2, m)
    return s, (s2 if x2 is not None else None)


def paired_logprobs_fwd(policy_logits, prior_logits, targets, temperature=1.0, with_entropy=False, with_kl=False):
    """One pass over each row of policy (and prior) logits (see :func:`token_stats_forward` for the inputs).

    Returns ``(policy_lp, policy_lse, prior_lp, prior_lse, entropy, kl)``: float32 ``[...]`` (the leading shape
    of the logits); ``*_lse`` is ``logsumexp(logits / temperature)``; outputs not asked for, or of an absent
    prior, are None.
    """
    if with_kl and prior_logits is None:
        raise ValueError("with_kl: the KL to the prior needs prior_logits")
    o = token_stats_forward(policy_logits, prior_logits, targets, temperature, with_entropy, with_kl)
    return o["lp"], o["lse"], o.get("prior_lp"), o.get("prior_lse"), o.get("entropy"), o.get("kl")


def paired_logprobs_bwd(policy_logits, prior_logits, targets, policy_lse, prior_lse, grad_lp, grad_entropy=None,
                        grad_kl=None, entropy=None, kl=None, temperature=1.0, inplace=False, *, grad_lse=None):
    """Gradient of the forward's outputs with respect to the policy logits, in their dtype.

    ``grad = [g_lp (onehot(y) - p) + g_lse p - g_H p (log p + H) + g_KL p (log p - log a - KL)] / temperature``
    with ``p = softmax(policy_logits / temperature)``. ``grad_lp``, ``grad_lse``, ``grad_entropy`` and
    ``grad_kl`` (``[...]``) may be None (zero); ``grad_entropy`` needs the forward's ``entropy``, ``grad_kl``
    needs ``prior_logits``, ``prior_lse`` and ``kl``. With ``inplace=True`` the gradient overwrites
    ``policy_logits`` (which is returned): no ``[..., V]`` allocation.
    """
    return token_stats_backward(policy_logits, prior_logits, targets, policy_lse, entropy=entropy, kl=kl,
                                prior_lse=prior_lse, grad_lp=grad_lp, grad_lse=grad_lse, grad_entropy=grad_entropy,
                                grad_kl=grad_kl, temperature=temperature,
                                out=policy_logits if inplace else None)


def sequence_sums(token_lp, mask):
    """Masked per-sequence sums: ``token_lp [B, T]`` (float32 or float64; other floats as float32), ``mask [B, T]``
    (bool or numbers, nonzero = keep) -> ``[B]``. Masked positions count 0 even where ``token_lp`` is -inf or NaN."""
    return masked_row_sums(token_lp, mask)[0]


# f'(s) = sum_k c_k exp(a_k s) + r0 + r1 s + r2 sign(s) + r3 softplus(-s) (fdpg/divergences.py)
_LOG2 = math.log(2.0)
_BUILTIN = {
    "forward_kl": (((-1.0, -1.0),), None),
    "reverse_kl": ((), (1.0, 1.0, 0.0, 0.0)),
    "tv": ((), (0.0, 0.0, 0.5, 0.0)),
    "js": ((), (0.5 * _LOG2, 0.0, 0.0, -0.5)),
    "hellinger": (((-1.0, -0.5),), (1.0, 0.0, 0.0, 0.0)),
    "chi2": (((2.0, 1.0),), (-2.0, 0.0, 0.0, 0.0)),
}


def divergence_params(divergence, alpha=None):
    """``(exp_coef, exp_rate, rest)`` of a built-in divergence for the kernel; user divergences raise ValueError."""
    from . import divergences

    if isinstance(divergence, str) and divergence.strip().lower() == "alpha":
        if alpha is None:
            raise ValueError("alpha: the 'alpha' divergence needs its parameter (or name it 'alpha:<value>')")
        divergence = f"alpha:{float(alpha)!r}"
    d = divergences.get(divergence)
    if d.name.startswith("alpha:") and "alpha" in d.params:
        a = float(d.params["alpha"])
        terms, rest = ((1.0 / (a - 1.0), a - 1.0),), (-1.0 / (a - 1.0), 0.0, 0.0, 0.0)
    elif d.name in _BUILTIN:
        terms, rest = _BUILTIN[d.name]
    else:
        raise ValueError(f"divergence: the CUDA backend computes only the built-in divergences "
                         f"({', '.join(sorted(_BUILTIN))}, alpha:<value>); {d.name!r} is not one of them: use "
                         "backend='triton' or 'torch'")
    if tuple((float(c), float(r)) for c, r in d.exp_terms) != tuple(terms) or (d.rest is None) != (rest is None):
        raise ValueError(f"divergence: {d.name!r} does not have the built-in form the CUDA kernel computes")
    return [c for c, _ in terms], [r for _, r in terms], list(rest or ())


def _seq_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _seq(name: str, t: torch.Tensor, dtype, n=None) -> torch.Tensor:
    _on_device(name, t)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] == 0 or (n is not None and t.shape[0] != n):
        want = f"({n},)" if n is not None else "a non-empty [N]"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    return t.detach().to(dtype).contiguous()


def _log_z(log_z, like: torch.Tensor) -> Optional[torch.Tensor]:
    if log_z is None:
        return None
    if not isinstance(log_z, torch.Tensor):
        return torch.full((), float(log_z), dtype=like.dtype, device=like.device)
    _on_device("log_z", log_z)
    lz = log_z.detach().to(like.dtype)
    if lz.numel() != 1:
        raise ValueError(f"log_z: expected a scalar, got shape {tuple(lz.shape)}")
    return lz.reshape(())


def coefficients(policy_logprob, proposal_logprob, target_logscore, divergence_name="forward_kl", alpha=None,
                 log_z=None, baseline_mode="batch", baseline_value=0.0):
    """f-DPG coefficients of N sequences in one launch (fdpg.reference.fdpg_coefficients).

    Inputs ``[N]`` (float32, or float64 if any is float64). ``divergence_name``: a built-in name, ``"alpha"`` with
    ``alpha``, or ``"alpha:<value>"``. ``log_z``: scalar (tensor or number) or None (estimated from the batch).
    ``baseline_mode``: ``"batch"``, ``"none"`` or ``"value"`` (then ``baseline_value``; a number is taken as the
    value). Returns ``(coef [N], log_z [], weights [N], ess [], baseline [])``.
    """
    _require()
    dt = _seq_dtype(policy_logprob, proposal_logprob, target_logscore)
    lpi = _seq("policy_logprob", policy_logprob, dt)
    n = lpi.shape[0]
    lq = _seq("proposal_logprob", proposal_logprob, dt, n)
    lP = _seq("target_logscore", target_logscore, dt, n)
    exp_coef, exp_rate, rest = divergence_params(divergence_name, alpha)
    if isinstance(baseline_mode, (int, float)) and not isinstance(baseline_mode, bool):
        baseline_mode, baseline_value = "value", float(baseline_mode)
    modes = {"batch": 0, "none": 1, None: 1, "value": 2}
    if baseline_mode not in modes:
        raise ValueError(f"baseline_mode: expected 'batch', 'none' or 'value', got {baseline_mode!r}")
    value = float(baseline_value)
    if not math.isfinite(value):
        raise ValueError(f"baseline_value: expected a finite number, got {baseline_value!r}")
    return torch.ops.fdpg_cuda.coefficients(lpi, lq, lP, _log_z(log_z, lpi), exp_coef, exp_rate, rest,
                                            modes[baseline_mode], value)


def estimates(policy_logprob, proposal_logprob, target_logscore, prior_logprob=None, log_z=None):
    """Importance-sampling estimates (fdpg.reference.divergence_estimates) in one launch: a dict of scalars
    ``kl_p_pi, kl_pi_p, tv, js, [kl_pi_a,] ess, log_z``."""
    _require()
    dt = _seq_dtype(policy_logprob, proposal_logprob, target_logscore, prior_logprob)
    lpi = _seq("policy_logprob", policy_logprob, dt)
    n = lpi.shape[0]
    lq = _seq("proposal_logprob", proposal_logprob, dt, n)
    lP = _seq("target_logscore", target_logscore, dt, n)
    la = None if prior_logprob is None else _seq("prior_logprob", prior_logprob, dt, n)
    out = torch.ops.fdpg_cuda.estimates(lpi, lq, lP, la, _log_z(log_z, lpi))
    v = out.unbind(0)
    res = {"kl_p_pi": v[0], "kl_pi_p": v[1], "tv": v[2], "js": v[3]}
    if la is not None:
        res["kl_pi_a"] = v[6]
    res["ess"], res["log_z"] = v[4], v[5]
    return res
