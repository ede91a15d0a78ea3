"""Build recipe of fdpg's CUDA extension (csrc/), shared by setup.py, the just-in-time loader and the tests.

Standard library only at import (torch is imported by :func:`torch_paths` when called). It follows the recipe
measured in BUILD-NOTES.md, which needs no CUDA header of torch and so also works against a CPU build of torch:
each ``.cu`` file is compiled by nvcc alone (no torch headers), ``binding.cpp`` by the host compiler with torch's
include paths, and the objects are linked against ``c10``, ``torch``, ``torch_cpu`` and ``cudart``. The result is
a shared library without a Python module init; load it with ``torch.ops.load_library``.

    python csrc/build.py OUT.so [--archs 80,90]
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CSRC = os.path.dirname(os.path.abspath(__file__))
KERNELS = ("logprobs.cu", "coefficients.cu")
BINDING = "binding.cpp"
HEADERS = ("common.cuh", "fdpg_cuda.h")
DEFAULT_ARCHS = ("80", "90")
LIB_NAME = "_fdpg_cuda"

# The same strict half/bfloat16 macros torch.utils.cpp_extension passes to nvcc: the kernels must not rely on
# implicit conversions, so that they also build under torch's JIT.
NVCC_FLAGS = [
    "-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def sources() -> list[str]:
    """Absolute paths of every source the extension is built from (kernels, binding, headers)."""
    return [os.path.join(CSRC, f) for f in (*KERNELS, BINDING, *HEADERS)]


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME / $CUDA_PATH, the PATH, or /usr/local/cuda; None when there is none."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def cuda_home(nvcc: str | None = None) -> str | None:
    """The CUDA toolkit directory (holding include/cuda_runtime.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = nvcc or find_nvcc()
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def cudart_dir(home: str) -> str | None:
    """The directory holding libcudart.so under the toolkit ``home``, or None (then nothing can be linked)."""
    subs = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib"))
    for sub in subs:
        d = os.path.join(home, sub)
        if os.path.exists(os.path.join(d, "libcudart.so")):
            return d
    return None


def archs_from_env() -> list[str]:
    """Target architectures: $FDPG_CUDA_ARCHS ("80,90"), else $TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX"), else 80, 90."""
    raw = os.environ.get("FDPG_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not raw:
        return list(DEFAULT_ARCHS)
    out = []
    for a in raw.replace(";", ",").replace(" ", ",").split(","):
        a = a.strip().replace("+PTX", "").replace(".", "")
        if a and a not in out:
            out.append(a)
    return out or list(DEFAULT_ARCHS)


def gencode_flags(archs) -> list[str]:
    """SASS for every arch, plus PTX of the newest one so that later GPUs can JIT it."""
    archs = list(archs)
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(archs, key=lambda a: int("".join(c for c in a if c.isdigit()) or 0))
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def nvcc_command(src: str, obj: str, archs, nvcc: str | None = None) -> list[str]:
    return [nvcc or find_nvcc() or "nvcc", *NVCC_FLAGS, *gencode_flags(archs), "-c", src, "-o", obj]


def torch_paths() -> dict:
    """Include and library directories of the installed torch, and its C++ ABI flag."""
    import torch

    root = os.path.dirname(torch.__file__)
    return {
        "include": [os.path.join(root, "include"), os.path.join(root, "include", "torch", "csrc", "api", "include")],
        "lib": os.path.join(root, "lib"),
        "abi": int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))),
        "version": torch.__version__,
    }


def host_compiler() -> str:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"


def binding_command(src: str, obj: str, tp: dict, home: str) -> list[str]:
    inc = [f"-I{d}" for d in tp["include"]] + [f"-I{os.path.join(home, 'include')}", f"-I{CSRC}"]
    # torch >= 2.10 headers use C++20 features; -w silences their warnings under older standards.
    return [host_compiler(), "-O2", "-std=c++20", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={tp['abi']}", *inc,
            "-c", src, "-o", obj]


def link_command(objs, out: str, tp: dict, libdir: str) -> list[str]:
    return [host_compiler(), "-shared", *objs, "-o", out, f"-L{tp['lib']}", "-lc10", "-ltorch", "-ltorch_cpu",
            f"-L{libdir}", "-lcudart", f"-Wl,-rpath,{libdir}", f"-Wl,-rpath,{tp['lib']}"]


def run(cmd: list[str], verbose: bool = False) -> None:
    if verbose:
        print("+", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-6000:]}")


def compile_objects(build_dir: str, archs=None, jobs: int | None = None, nvcc: str | None = None,
                    binding: bool = True, verbose: bool = False) -> list[str]:
    """Compile every .cu file (and binding.cpp) into ``build_dir`` in parallel; returns the object paths."""
    archs = list(archs or archs_from_env())
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on the PATH)")
    os.makedirs(build_dir, exist_ok=True)
    cmds = [nvcc_command(os.path.join(CSRC, k), os.path.join(build_dir, k + ".o"), archs, nvcc) for k in KERNELS]
    if binding:
        home = cuda_home(nvcc)
        if home is None:
            raise RuntimeError(f"CUDA toolkit headers not found next to {nvcc} (set CUDA_HOME)")
        cmds.append(binding_command(os.path.join(CSRC, BINDING), os.path.join(build_dir, BINDING + ".o"),
                                    torch_paths(), home))
    with ThreadPoolExecutor(max_workers=jobs or min(len(cmds), os.cpu_count() or 1)) as ex:
        for f in [ex.submit(run, c, verbose) for c in cmds]:
            f.result()
    return [c[c.index("-o") + 1] for c in cmds]


def link(objs, out: str, nvcc: str | None = None, verbose: bool = False) -> str:
    home = cuda_home(nvcc)
    libdir = cudart_dir(home) if home else None
    if libdir is None:
        raise RuntimeError("libcudart.so not found in the CUDA toolkit; cannot link the extension")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    run(link_command(objs, tmp, torch_paths(), libdir), verbose)
    os.replace(tmp, out)  # atomic: a concurrent loader never sees a half-written library
    return out


def build(out: str, build_dir: str | None = None, archs=None, jobs: int | None = None, verbose: bool = False) -> str:
    """Compile and link the extension to ``out``; returns ``out``."""
    build_dir = build_dir or os.path.join(os.path.dirname(os.path.abspath(out)), "build-fdpg-cuda")
    objs = compile_objects(build_dir, archs, jobs, verbose=verbose)
    return link(objs, out, verbose=verbose)


def fingerprint(archs=None) -> str:
    """Hash of the sources, flags, archs and torch version: the key of a just-in-time build cache."""
    h = hashlib.sha256()
    for p in sources():
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(repr((NVCC_FLAGS, list(archs or archs_from_env()), torch_paths()["version"])).encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--archs", default=None, help="comma-separated, e.g. 80,90 (default: $FDPG_CUDA_ARCHS or 80,90)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    print(build(a.out, archs=a.archs.split(",") if a.archs else None, verbose=a.verbose))
