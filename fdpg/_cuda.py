"""Loader of fdpg's CUDA C++ extension (csrc/): ``torch.ops.fdpg.*`` when it is built, nothing otherwise."""
from __future__ import annotations

_state: dict = {}


def available() -> bool:
    """True when the compiled extension is loaded and a CUDA device is present."""
    if "ok" not in _state:
        _state["ok"], _state["error"] = False, "the CUDA extension is not part of this build"
    return _state["ok"]


def load_error() -> str | None:
    available()
    return _state.get("error")
