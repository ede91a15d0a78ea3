"""Compile every Triton kernel of :mod:`fdpg.kernels` for real GPUs on any machine, a GPU or none (static checks
that ``TRITON_INTERPRET=1`` cannot make: ``tl.dot`` type/shape rules, constexpr misuse, unsupported ops, spills).

How: the launch wrappers of each kernel module are called on ``meta`` tensors of representative shapes, with every
``kernel[grid](...)`` replaced by a recorder, so the specialisations compiled are exactly those the wrappers choose
(their block sizes, warps, stages, flags, dtypes). Triton's own launch binder turns each recorded launch into the
signature, constexprs, alignment attributes and options that a real launch would compile; each distinct one is
compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (TTIR -> PTX -> cubin through the ptxas that
ships in the triton wheel) and ptxas' ``-v`` report (registers, spills, stack) is kept.

Device heuristics see the target GPU: functions listed in :data:`DEVICE_FUNCS` get ``torch.device("cuda")`` in place
of the meta device, and ``torch.cuda.get_device_properties``/``get_device_capability`` answer as an H100 (sm_90) or
an A100 (sm_80). Needs ``TRITON_INTERPRET`` unset (the interpreter replaces ``triton.jit`` at import)::

    env -u TRITON_INTERPRET python -m fdpg.kernels._compile_check --arch 90 --arch 80:primary --markdown

Works with triton 3.6 to 3.9 (it uses ``triton.runtime.jit.create_function_from_signature`` and
``JITFunction._pack_args``, present with the same signatures across them); :func:`unsupported` says why not otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings

import torch

# Functions of a kernel module that take the device and decide launch parameters from it: called with a CUDA device.
DEVICE_FUNCS = {"linear": ("config",)}

# Device properties the heuristics see, per target arch (H100 SXM, A100 SXM).
_PROPS = {
    90: dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, total_memory=80 * 2**30,
             L2_cache_size=50 * 2**20, warp_size=32, max_threads_per_multi_processor=2048,
             shared_memory_per_block_optin=232448, regs_per_multiprocessor=65536),
    80: dict(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, multi_processor_count=108, total_memory=80 * 2**30,
             L2_cache_size=40 * 2**20, warp_size=32, max_threads_per_multi_processor=2048,
             shared_memory_per_block_optin=166912, regs_per_multiprocessor=65536),
}


def unsupported() -> str | None:
    """Why kernels cannot be compiled here (None when they can)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: triton.jit gives interpreted functions; unset it"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.compiler.compiler import make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton's compile API is not importable: {type(e).__name__}: {e}"
    if not hasattr(triton, "compile"):
        return f"triton {triton.__version__} has no triton.compile"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__}: JITFunction has no _pack_args (launch binder API changed)"
    try:
        _ptxas(90)
    except Exception as e:  # noqa: BLE001
        return f"no ptxas in this triton install: {type(e).__name__}: {e}"
    try:
        _probe()
    except Exception as e:  # noqa: BLE001
        return (f"triton {triton.__version__}: the capture-and-compile path fails on a trivial kernel "
                f"(API change?): {type(e).__name__}: {str(e)[:500]}")
    return None


_PROBE_SRC = """import triton
import triton.language as tl


@triton.jit
def _probe_kernel(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1.0, mask=offs < n)
"""


def _probe() -> None:
    """Bind and compile a trivial kernel for sm_90 the way :func:`check` does (raises if this triton differs)."""
    import importlib.util

    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "_fdpg_compile_probe.py")
        with open(path, "w") as f:
            f.write(_PROBE_SRC)
        spec = importlib.util.spec_from_file_location("_fdpg_compile_probe", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        launch = Launch("probe", mod._probe_kernel, (1,), [_Ptr(meta(16))], dict(n=16, BLOCK=16, num_warps=1),
                        {})
        res = _compile(_Spec(launch, 90, make_backend(GPUTarget("cuda", 90, 32)), {}))
    if not res["ok"]:
        raise RuntimeError(res["error"])
    if res.get("registers") is None:
        raise RuntimeError(f"no register count in ptxas' report: {res.get('ptxas_log')!r}")


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(arch).path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"ptxas for sm_{arch} at {path!r}")
    return path


# ---- meta tensors and launch capture ----------------------------------------------------------------------------

def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    """An uninitialised ``meta`` tensor (no memory): wrappers compute layouts and allocate outputs on it."""
    return torch.empty(shape, dtype=dtype, device="meta")


class _Ptr:
    """Stands for a tensor argument: triton's binder reads ``dtype`` and ``data_ptr()`` (alignment). Real
    allocations are 256-byte aligned, so the address is the tensor's byte offset into its storage."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._off = t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._off


class Launch:
    def __init__(self, module, kernel, grid, args, kwargs, case):
        self.module, self.kernel, self.grid, self.args, self.kwargs, self.case = (module, kernel, grid, args,
                                                                                  kwargs, case)


class _Recorder:
    """Replaces a kernel in its module while a case runs: ``kernel[grid](*args, **kwargs)`` records, runs nothing."""

    def __init__(self, fn, sink: list, module: str, case: dict):
        self._fn, self._sink, self._module, self._case = fn, sink, module, case

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            conv = lambda a: _Ptr(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
            self._sink.append(Launch(self._module, self._fn, grid, [conv(a) for a in args],
                                     {k: conv(v) for k, v in kwargs.items()}, self._case))
        return launch

    def __getattr__(self, name):
        return getattr(self._fn, name)


def _jit_functions(mod) -> dict:
    from triton.runtime.jit import JITFunction

    return {k: v for k, v in vars(mod).items() if isinstance(v, JITFunction) and getattr(v, "module", None)
            == mod.__name__}


def launched_kernels(mod) -> list[str]:
    """Names of the module's jitted functions that its own code launches (``name[grid](...)``)."""
    src = inspect.getsource(mod)
    return sorted(k for k in _jit_functions(mod) if re.search(rf"\b{re.escape(k)}\s*\[", src))


def _to_cuda(fn):
    def wrapped(*args, **kwargs):
        fix = lambda a: torch.device("cuda", 0) if isinstance(a, torch.device) and a.type == "meta" else a  # noqa
        return fn(*[fix(a) for a in args], **{k: fix(v) for k, v in kwargs.items()})
    return wrapped


@contextlib.contextmanager
def _capturing(mod, arch: int, sink: list, case: dict):
    short = mod.__name__.rsplit(".", 1)[-1]
    saved = {}
    props = types.SimpleNamespace(**_PROPS.get(arch, _PROPS[90]))
    try:
        for name, fn in _jit_functions(mod).items():
            saved[name] = fn
            setattr(mod, name, _Recorder(fn, sink, short, case))
        for name in DEVICE_FUNCS.get(short, ()):
            if not callable(getattr(mod, name, None)):
                raise AttributeError(f"{mod.__name__}.{name} (a device heuristic named in DEVICE_FUNCS) is missing")
            saved[name] = getattr(mod, name)
            setattr(mod, name, _to_cuda(saved[name]))
        saved_cuda = (torch.cuda.get_device_properties, torch.cuda.get_device_capability)
        torch.cuda.get_device_properties = lambda *a, **k: props
        torch.cuda.get_device_capability = lambda *a, **k: (props.major, props.minor)
        try:
            yield
        finally:
            torch.cuda.get_device_properties, torch.cuda.get_device_capability = saved_cuda
    finally:
        for name, fn in saved.items():
            setattr(mod, name, fn)


# ---- representative calls of the launch wrappers ----------------------------------------------------------------
# Each case calls a wrapper the way fdpg.ops does. "primary" cases (one per kernel, the common bf16 path) are the
# ones compiled for secondary targets such as "80:primary".

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_DT = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}


def _cases_logprobs(K):
    # logits [B, T+1, V][:, :-1] as a causal LM's logits are used: rows of T positions, strides T+1 rows apart
    shapes = {128256: (4, 1024), 50257: (8, 512), 512: (64, 32)}

    def logits(B, T, V, dt):
        return meta(B, T + 1, V, dtype=dt)[:, :-1]

    def fwd(B, T, V, dt, prior, ent, kl, mask):
        def run():
            z = logits(B, T, V, dt)
            zp = logits(B, T, V, dt) if prior else None
            y = meta(B, T, dtype=torch.int64)
            o = K.token_stats_forward(z, zp, y, 1.0, entropy=ent, kl=kl)
            if mask:
                K.masked_row_sums(o["lp"], meta(B, T, dtype=torch.bool), o.get("prior_lp"))
        return run

    def bwd(B, T, V, dt, grads, inplace):
        def run():
            z = logits(B, T, V, dt)
            lead = (B, T)
            f = lambda on: meta(*lead) if on else None  # noqa: E731
            kl = "kl" in grads
            K.token_stats_backward(
                z, logits(B, T, V, dt) if kl else None, meta(*lead, dtype=torch.int64), meta(*lead),
                entropy=f("ent" in grads), kl=f(kl), prior_lse=f(kl), grad_lp=f("lp" in grads),
                grad_lse=f("lse" in grads), grad_entropy=f("ent" in grads), grad_kl=f(kl),
                grad_seq=meta(B) if "seq" in grads else None,
                mask=meta(*lead, dtype=torch.bool) if "seq" in grads else None, temperature=1.0,
                out=z if inplace else None)
        return run

    fwd_flags = [(False, False, False), (False, True, False), (True, False, False), (True, True, False),
                 (True, False, True), (True, True, True)]
    bwd_flags = [("seq",), ("lp",), ("lp", "ent"), ("seq", "kl"), ("seq", "ent", "kl"),
                 ("lp", "lse", "ent", "kl", "seq")]
    cases = []
    for V, (B, T) in shapes.items():
        for dt in (BF16, FP16, FP32):
            # every flag combination on the primary shape and dtype; the corners on other dtypes and shapes
            full = V == 128256 and dt == BF16
            side = V == 128256 or dt == BF16
            for prior, ent, kl in fwd_flags:
                if full or (side and prior == ent == kl):
                    tag = "+".join(n for n, on in (("prior", prior), ("entropy", ent), ("kl", kl)) if on) or "plain"
                    cases.append(dict(label=f"fwd {_DT[dt]} V={V} N={B}x{T} {tag}",
                                      run=fwd(B, T, V, dt, prior, ent, kl, mask=True),
                                      primary=full and prior and ent and kl))
            for grads in bwd_flags:
                for inplace in (False, True):
                    corner = grads in (("seq",), ("lp", "lse", "ent", "kl", "seq"))
                    if (full and (inplace or corner)) or (side and corner and inplace):
                        cases.append(dict(label=f"bwd {_DT[dt]} V={V} N={B}x{T} grads={'+'.join(grads)}"
                                                f"{' in-place' if inplace else ''}",
                                          run=bwd(B, T, V, dt, grads, inplace),
                                          primary=full and inplace and len(grads) == 5))
    return cases


def _cases_coefficients(K):
    from fdpg.ops import coefficients as opsc   # the built-in divergences' f' parameters the op passes

    specs = dict(opsc._SPECS)
    specs["alpha:0.5"] = opsc.divergence_spec(opsc.get_divergence("alpha:0.5"))

    def coef(n, dt, spec, mode, lz):
        return lambda: K.coefficients(meta(n, dtype=dt), meta(n, dtype=dt), meta(n, dtype=dt),
                                      meta(1) if lz else None, spec, mode, 0.5 if mode == 2 else 0.0)

    def est(n, dt, prior, lz):
        return lambda: K.estimates(meta(n, dtype=dt), meta(n, dtype=dt), meta(n, dtype=dt),
                                   meta(n, dtype=dt) if prior else None, meta(1) if lz else None)

    cases = []
    for name, spec in specs.items():
        cases.append(dict(label=f"coefficients fp32 N=256 {name} batch-baseline", run=coef(256, FP32, spec, 1, False),
                          primary=name == "forward_kl"))
    for mode, lz in ((0, True), (2, False)):
        cases.append(dict(label=f"coefficients fp32 N=256 forward_kl baseline={mode} log_z={'given' if lz else 'est'}",
                          run=coef(256, FP32, specs["forward_kl"], mode, lz)))
    for prior, lz in ((True, False), (False, True)):
        cases.append(dict(label=f"estimates fp32 N=256 prior={prior} log_z={'given' if lz else 'est'}",
                          run=est(256, FP32, prior, lz), primary=prior))
    cases.append(dict(label="coefficients fp32 N=4096 forward_kl batch-baseline",
                      run=coef(4096, FP32, specs["forward_kl"], 1, False)))
    cases.append(dict(label="estimates bf16 N=256 prior", run=est(256, BF16, True, False)))
    return cases


def _cases_linear(K):
    # (N tokens, d, V): a Llama-3-8B-like layer, a GPT-2 layer, a short batch, and d not a multiple of BLOCK_D
    shapes = [(4096, 4096, 128256), (2048, 768, 50257), (64, 4096, 128256), (1024, 1000, 32000)]

    def fwd(N, D, V, dt, bias):
        return lambda: K.linear_logprobs_fwd(meta(N, D, dtype=dt), meta(V, D, dtype=dt),
                                             meta(V, dtype=dt) if bias else None,
                                             meta(N, dtype=torch.int64), 1.0)

    def bwd(N, D, V, dt, bias, glse, eps, need=(True, True, True)):
        return lambda: K.linear_logprobs_bwd(meta(N, D, dtype=dt), meta(V, D, dtype=dt),
                                             meta(V, dtype=dt) if bias else None, meta(N, dtype=torch.int64),
                                             meta(N), meta(N), meta(N) if glse else None, 1.0, *need, eps)

    cases = []
    for i, (N, D, V) in enumerate(shapes):
        for dt in ((BF16, FP16, FP32) if i == 0 else (BF16,)):
            main = i == 0 and dt == BF16            # the primary shape and dtype: every flag
            cases.append(dict(label=f"fwd {_DT[dt]} N={N} d={D} V={V}", run=fwd(N, D, V, dt, False), primary=main))
            cases.append(dict(label=f"bwd exact {_DT[dt]} N={N} d={D} V={V}", run=bwd(N, D, V, dt, False, False, 0.0),
                              primary=main))
            if main or (i == 0 and dt == FP32):
                cases.append(dict(label=f"bwd fast(eps=1e-5) {_DT[dt]} N={N} d={D} V={V}",
                                  run=bwd(N, D, V, dt, False, False, 1e-5), primary=main))
            if main:
                cases.append(dict(label=f"fwd {_DT[dt]} N={N} d={D} V={V} bias", run=fwd(N, D, V, dt, True)))
                for eps in (0.0, 1e-5):
                    cases.append(dict(label=f"bwd {'fast(eps=1e-5)' if eps else 'exact'} {_DT[dt]} N={N} d={D} V={V} "
                                            f"bias grad_lse", run=bwd(N, D, V, dt, True, True, eps)))

    def chunked(fn):                          # the "chunked" implementation: cuBLAS logits, Triton epilogues
        def run():
            old = K.CONFIG_OVERRIDE
            K.CONFIG_OVERRIDE = dict(impl="chunked")
            try:
                fn()
            finally:
                K.CONFIG_OVERRIDE = old
        return run

    for N, D, V in shapes[:2]:
        for bias in (False, True):
            tag = f"bf16 N={N} d={D} V={V}{' bias grad_lse' if bias else ''}"
            cases.append(dict(label=f"fwd chunked {tag}", run=chunked(fwd(N, D, V, BF16, bias)), primary=not bias))
            cases.append(dict(label=f"bwd chunked exact {tag}", run=chunked(bwd(N, D, V, BF16, bias, bias, 0.0)),
                              primary=not bias))
    return cases


def _cases_norms(K):
    # a decoding step's rows: GPT-2 small (LayerNorm, d = 768) and a Llama (RMSNorm, d = 2048 and 4096), under
    # autocast (float32 residual, bf16 out) and in bf16
    cases = []
    for d, rms in ((768, False), (2048, True), (4096, True)):
        for xdt, odt in ((FP32, BF16), (BF16, BF16)):
            def run(d=d, rms=rms, xdt=xdt, odt=odt):
                for delta in (True, False):
                    K.add_norm(meta(64, d, dtype=xdt), meta(64, d, dtype=odt) if delta else None, meta(d, dtype=xdt),
                               None if rms else meta(d, dtype=xdt), 1e-5, rms=rms, out_dtype=odt, inplace=True)
            cases.append(dict(label=f"add_norm {'rms' if rms else 'layer'} d={d} x {_DT[xdt]} out {_DT[odt]}",
                              run=run, primary=xdt == FP32))
    return cases


def _cases_sampling(K):
    # a decoding step's draw: GPT-2's vocabulary in float32 and bf16 logits, Llama-3's in bf16; with and without EOS
    cases = []
    for V, dt in ((50257, FP32), (50257, BF16), (128256, BF16)):
        for eos in (True, False):
            def run(V=V, dt=dt, eos=eos):
                K.draw(meta(64, V, dtype=dt), meta(64, 1, dtype=torch.float64),
                       meta(64, 1, dtype=torch.bool) if eos else None, pad=0, eos=0 if eos else None)
            cases.append(dict(label=f"draw V={V} {_DT[dt]}{' eos' if eos else ''}", run=run,
                              primary=V == 50257 and eos))
    return cases


CASES = {"logprobs": _cases_logprobs, "coefficients": _cases_coefficients, "linear": _cases_linear,
         "norms": _cases_norms, "sampling": _cases_sampling}


def kernel_modules() -> list[str]:
    """Short names of the kernel modules (``kernels/*.py`` but private ones)."""
    import fdpg.kernels as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


# ---- specialisation and compilation -----------------------------------------------------------------------------

def _run_kwargs(fn, kwargs: dict) -> dict:
    """The options JITFunction.run adds before binding (debug, and the knobs this triton version passes)."""
    from triton import knobs

    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", getattr(fn, "debug", None)) or knobs.runtime.debug
    run_src = inspect.getsource(type(fn).run)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if f'kwargs["{name}"]' in run_src and hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    return kw


class _Spec:
    def __init__(self, launch: Launch, arch: int, backend, binders: dict):
        from triton.runtime.jit import create_function_from_signature

        fn = launch.kernel
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        kw = _run_kwargs(fn, launch.kwargs)
        bound, specialization, options = binders[fn](*launch.args, **kw)
        self.options, self.signature, self.constexprs, self.attrs = fn._pack_args(backend, kw, bound,
                                                                                    specialization, options)
        self.fn, self.arch, self.module = fn, arch, launch.module
        self.names = list(fn.arg_names)
        self.key = (fn.__name__, arch, repr(specialization), repr(sorted(self.options.__dict__.items(), key=str)))

    def describe(self) -> dict:
        cx = {}
        for path, v in self.constexprs.items():
            name = self.names[path[0]] if isinstance(path, tuple) and len(path) == 1 else str(path)
            cx[name] = getattr(v, "name", None) or (v if isinstance(v, (bool, int, float, str)) else repr(v))
        ptrs = [t for t in self.signature.values() if isinstance(t, str) and t.startswith("*")]
        return dict(module=self.module, kernel=self.fn.__name__, arch=self.arch, constexprs=cx,
                    pointer_dtypes=sorted(set(ptrs)), num_warps=self.options.num_warps,
                    num_stages=self.options.num_stages)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes and stack frame from a ``ptxas -v`` log (None for a figure it does not state)."""
    out = {}
    for k, rx in _PTXAS_RE.items():
        vals = [int(v) for v in rx.findall(log)]
        out[k] = max(vals) if vals else None
    return out


def _compile(spec: _Spec) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = spec.describe()
    target = GPUTarget("cuda", spec.arch, 32)
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs), target=target,
                                options=spec.options.__dict__)
    except Exception as e:  # noqa: BLE001  (the compiler's own error text is the result)
        res.update(ok=False, error=f"{type(e).__name__}: {e}".strip()[-6000:],
                   traceback=traceback.format_exc()[-4000:], compile_s=round(time.perf_counter() - t0, 2))
        return res
    res.update(ok=True, compile_s=round(time.perf_counter() - t0, 2), shared=getattr(ck.metadata, "shared", None))
    log = buf.getvalue()
    if "Used" not in log:      # no ptxas log through the knob: run ptxas -v on the PTX ourselves
        log = _ptxas_log(ck.asm["ptx"], spec.arch)
    res.update(parse_ptxas(log))
    res["ptxas_log"] = log.strip()[-2000:]
    return res


def _ptxas_log(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        p = subprocess.run([_ptxas(arch), "-v", "-lineinfo", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                            "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
        return p.stdout + p.stderr


_TODO: list = []


def _compile_index(i: int):
    return i, _compile(_TODO[i])


def _compile_all(specs: list, jobs: int) -> list[dict]:
    """Compile in ``jobs`` forked processes (each compile is single-threaded Python, MLIR, LLVM and ptxas)."""
    import multiprocessing as mp

    if jobs <= 1 or len(specs) < 2 or "fork" not in mp.get_all_start_methods():
        return [_compile(s) for s in specs]
    _TODO[:] = specs
    out = [None] * len(specs)
    try:
        with mp.get_context("fork").Pool(min(jobs, len(specs))) as pool:
            for i, res in pool.imap_unordered(_compile_index, range(len(specs))):
                out[i] = res
    finally:
        _TODO.clear()
    return out


def check(archs=((90, False),), modules=None, jobs: int = 1) -> dict:
    """Capture and compile. ``archs``: ``(arch, primary_only)`` pairs; ``jobs``: parallel compiles. Returns the
    report (see :func:`main`)."""
    import triton

    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    report = dict(triton=triton.__version__, torch=torch.__version__, modules={}, variants=[], errors=[])
    t_start = time.perf_counter()
    mods = modules or kernel_modules()
    seen = {}
    for short in mods:
        info = report["modules"][short] = dict(launched=[], captured=[], cases=0, capture_errors=[])
        try:
            mod = importlib.import_module(f"fdpg.kernels.{short}")
            info["launched"] = launched_kernels(mod)
            if short not in CASES:
                raise LookupError(f"no launch cases for module {short!r}: add them to CASES in {__name__}")
            cases = CASES[short](mod)
        except Exception:  # noqa: BLE001
            info["capture_errors"].append(dict(case="(module)", error=traceback.format_exc()[-3000:]))
            continue
        for arch, primary_only in archs:
            backend = make_backend(GPUTarget("cuda", arch, 32))
            binders = {}
            for case in cases:
                if primary_only and not case.get("primary"):
                    continue
                info["cases"] += 1
                sink: list[Launch] = []
                try:
                    with _capturing(mod, arch, sink, case):
                        case["run"]()
                    specs = [_Spec(launch, arch, backend, binders) for launch in sink]
                except Exception:  # noqa: BLE001
                    info["capture_errors"].append(dict(case=case["label"], arch=arch,
                                                       error=traceback.format_exc()[-3000:]))
                    continue
                for spec in specs:
                    if spec.key not in seen:
                        seen[spec.key] = dict(spec=spec, cases=[])
                    if case["label"] not in seen[spec.key]["cases"]:
                        seen[spec.key]["cases"].append(case["label"])
                    seen[spec.key]["primary"] = seen[spec.key].get("primary", False) or bool(case.get("primary"))
                    if spec.fn.__name__ not in info["captured"]:
                        info["captured"].append(spec.fn.__name__)
        info["captured"].sort()
    entries = list(seen.values())
    for entry, res in zip(entries, _compile_all([e["spec"] for e in entries], jobs)):
        res["cases"], res["primary"] = entry["cases"], entry["primary"]
        report["variants"].append(res)
        if not res["ok"]:
            report["errors"].append(res)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def markdown(report: dict) -> str:
    """One table row per kernel and target: variants compiled, registers and spills (min-max over variants)."""
    rows = {}
    for v in report["variants"]:
        r = rows.setdefault((v["module"], v["kernel"], v["arch"]), [])
        r.append(v)
    lines = [f"Static compile facts (triton {report['triton']}, ptxas -v; not timings)", "",
             "| kernel | target | variants | warps | registers | spill stores/loads (B) | stack (B) |",
             "| --- | --- | ---: | --- | --- | --- | --- |"]

    def rng(vals):
        vals = [x for x in vals if x is not None]
        if not vals:
            return "?"
        return f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}"

    for (mod, kern, arch), vs in sorted(rows.items()):
        ok = [v for v in vs if v["ok"]]
        err = len(vs) - len(ok)
        warps = sorted({v["num_warps"] for v in vs})
        lines.append(f"| {mod}.{kern} | sm_{arch} | {len(vs)}{f' ({err} failed)' if err else ''} | "
                     f"{','.join(map(str, warps))} | {rng(v['registers'] for v in ok)} | "
                     f"{rng(v['spill_stores'] for v in ok)}/{rng(v['spill_loads'] for v in ok)} | "
                     f"{rng(v['stack'] for v in ok)} |")
    lines += ["", "Primary (main-path) variants, and every variant that spills:", "",
              "| kernel | target | launch (first case) | config | warps/stages | registers | spills st/ld (B) |",
              "| --- | --- | --- | --- | --- | ---: | --- |"]
    for v in sorted(report["variants"], key=lambda v: (v["module"], v["kernel"], -v["arch"])):
        if not v["ok"] or not (v.get("primary") or v.get("spill_stores") or v.get("spill_loads")):
            continue
        cfg = " ".join(k if x is True else f"{k}={x}" for k, x in v["constexprs"].items()
                       if k.isupper() and x is not False and k not in ("PRECISION", "GROUP_N"))
        lines.append(f"| {v['module']}.{v['kernel']}{'' if v.get('primary') else ' (not primary)'} | "
                     f"sm_{v['arch']} | {v['cases'][0]} | {cfg} | {v['num_warps']}/{v['num_stages']} | "
                     f"{v['registers']} | {v['spill_stores']}/{v['spill_loads']} |")
    return "\n".join(lines)


def _parse_arch(s: str):
    arch, _, sub = s.partition(":")
    if sub not in ("", "primary"):
        raise argparse.ArgumentTypeError(f"--arch: expected N or N:primary, got {s!r}")
    return int(arch), sub == "primary"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", type=_parse_arch,
                   help="target compute capability, e.g. 90 (all cases) or 80:primary (primary cases); repeatable")
    p.add_argument("--module", action="append", help="kernel module (default: all of fdpg.kernels)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--markdown", action="store_true", help="print a table of registers and spills")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles (default 2)")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")   # triton 3.9: the launch default
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"     # read when ptxas runs: its -v report comes out on stdout
    # a fresh cache: every variant really compiles (a cached kernel would come back without ptxas' report)
    cache = os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdpg-compile-check-")
    try:
        why = unsupported()
        report = dict(unsupported=why) if why else check(a.arch or [(90, False)], a.module, a.jobs)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if why:
        print(f"unsupported: {why}")
        return 0
    if a.markdown:
        print(markdown(report))
    n_err = len(report["errors"]) + sum(len(m["capture_errors"]) for m in report["modules"].values())
    print(f"{len(report['variants'])} variants compiled in {report['seconds']} s, {n_err} errors")
    for e in report["errors"]:
        print(f"\nFAILED {e['module']}.{e['kernel']} sm_{e['arch']} {e['constexprs']}\n  cases: {e['cases'][:3]}\n"
              f"  {e['error']}")
    for m, info in report["modules"].items():
        for e in info["capture_errors"]:
            print(f"\nCAPTURE FAILED {m}: {e['case']}\n{e['error']}")
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
