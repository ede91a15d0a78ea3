"""Argument checks shared by the public ops, and the choice of backend.

Shape, dtype and device checks are free (metadata only) and always run. Value checks (token ids in range,
NaN/inf) need a host synchronisation: they run when ``validate=True``, by default for tensors that are not on a
GPU, and never while ``torch.compile`` traces. ``FDPG_VALIDATE=1`` / ``=0`` forces them on / off everywhere, over
an explicit ``validate`` too (the trainer passes ``validate=False`` on its hot path: ``FDPG_VALIDATE=1`` finds
the first non-finite input of a diverging run).
"""
from __future__ import annotations

import math
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
BACKEND_NAMES = {"triton": "Triton", "cuda": "CUDA", "torch": "torch"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def should_validate(validate: bool | None, t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    env = os.environ.get("FDPG_VALIDATE")
    if env in ("0", "1"):
        return env == "1"
    if validate is not None:
        return bool(validate)
    return t.device.type not in ("cuda", "meta")


def tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def float_tensor(name: str, t) -> torch.Tensor:
    tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {t.dtype}")
    return t


def int_tensor(name: str, t) -> torch.Tensor:
    tensor(name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor of token ids (e.g. torch.long), got dtype {t.dtype}")
    return t


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{k}: expected a tensor on {dev} like {items[0][0]}, got one on {v.device}")
    return dev


def temperature(value) -> float:
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"temperature: expected a positive float, got {value!r}") from None
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature: expected a finite positive float, got {value!r}")
    return tau


def logits_and_targets(logits_name: str, logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Checks ``logits [..., V]`` against ``targets [...]``; returns V."""
    float_tensor(logits_name, logits)
    int_tensor("targets", targets)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{logits_name}: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (the leading dims of "
                         f"{logits_name} {tuple(logits.shape)}), got {tuple(targets.shape)}")
    return logits.shape[-1]


def target_range(targets: torch.Tensor, vocab_size: int, what: str = "the vocabulary size") -> None:
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets: token ids must lie in [0, {vocab_size}) ({what} is {vocab_size}); found {bad}")


def finite_lse(name: str, lse: torch.Tensor) -> None:
    """A row's logsumexp is finite unless the row holds NaN or +inf, or is all -inf."""
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: every row must be finite with at least one entry > -inf; the row at index {idx} "
                         f"holds NaN or +inf (or only -inf), logsumexp = {float(lse[idx])} (with a temperature: "
                         f"logits / temperature must stay finite in float32)")


def no_nan(name: str, t: torch.Tensor, what: str = "") -> None:
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name}: contains NaN{what}")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on a platform without wheels
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): Triton kernels accept CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_extension_ready() -> bool:
    from .. import _cuda

    return _cuda.ready()


def cuda_extension_available() -> bool:
    from .. import _cuda

    return _cuda.available()


def backend(name, device: torch.device, *, cuda_ok: bool = False) -> str:
    """Resolve ``backend`` ("auto" | "triton" | "cuda" | "torch") for tensors on ``device``.

    "auto" picks, for CUDA tensors, the CUDA C++ kernel where the op has one (``cuda_ok``) and the extension is
    built (the faster of the two on an H100: benchmarks/RESULTS.md), else Triton; the torch reference for any other
    device (Triton's CPU interpreter is for tests: ask for it with backend="triton").
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        if cuda_ok and cuda_extension_ready():
            return "cuda"
        return "triton" if triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' requested but triton is not installed (pip install triton), "
                             "or use backend='torch'")
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise ValueError(f"backend: 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                             f"before triton is imported; got tensors on {device}")
        return "triton"
    if name == "cuda":
        if not cuda_ok:
            raise ValueError("backend: this op has no 'cuda' kernel; use 'triton', 'torch' or 'auto'")
        if device.type != "cuda":
            raise ValueError(f"backend: 'cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_extension_available():
            raise ValueError("backend: 'cuda' requested but fdpg's CUDA extension is not built or failed to load "
                             "(see fdpg._cuda.load_error())")
        return "cuda"
    return "torch"
