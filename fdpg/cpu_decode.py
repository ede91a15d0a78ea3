"""The CPU sampling loop in C (fdpg/cpu_decode.c): a whole GPT-2 or Llama (float32) sampling pass after the prefill
in one native call; the no-grad scoring forward of either (the prior's pass, :func:`forward`) in another; causal
attention with autograd (:func:`attention`: the policy's scoring pass and replay, a native forward and backward);
and the GEMM the loops use (:func:`gemm`).

On the CPU a decoding step of a small model is mostly framework time (a few hundred small ops, each dispatched from
Python); this loop runs every step and every draw in C, with the batch split into one block of rows per thread
(each thread runs its rows through the whole pass: sequences decode independently), GEMMs included (the C file's
own register-tiled kernel, :func:`gemm`: MKL's sgemm ran these small-M GEMMs at a third of its rate on AMD's
AVX-512 cores). It computes what the Python loop of :func:`fdpg.sampling.sample` computes over
:class:`fdpg.decode._GPT2`'s (or ``_Llama``'s) slab: the same cache, the same recording (so ``Samples.replay``
works alike), the same draws from the same uniforms (the generator consumed alike), to float rounding.

The library is compiled at first use with the C compiler (``$CC``, else ``cc``/``gcc``; about a second, no torch
headers) into ``$FDPG_CACHE_DIR`` (default ``~/.cache/fdpg``), keyed by the source, the flags and the CPU; with
OpenMP (its threads those of the libgomp torch loaded), else single-threaded.
``FDPG_CPU_DECODE=0`` turns it off; without a compiler sampling takes the Python loop (:func:`unavailable_reason`
says why).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from typing import Callable, NamedTuple

import torch

__all__ = ["run", "unavailable_reason", "forward", "activation", "attention", "gemm", "retain_heap"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_decode.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
_ACT = {"NewGELUActivation": 0, "GELUTanh": 0, "PytorchGELUTanh": 0, "FastGELUActivation": 0,
        "GELUActivation": 1, "ReLU": 2}
_N_DIMS, _N_PTRS, _W_PER_LAYER = 17, 27, 12       # as D_N, P_LAYERS and W_N in cpu_decode.c
_W_PER_LLAMA_LAYER = 16                           # as LW_N
_SILU = 3                                         # ACT_SILU
_N_FDIMS, _N_FPTRS = 12, 9                        # as F_N and Q_LAYERS (fdpg_forward)
# the native forward's working buffers per chunk of rows, at most (about): rows go through in chunks of about a
# quarter of a thread's share, taken by the threads as they come free, and smaller where a chunk would pass this
# (at the tiny benchmark config 16 rows of 32 positions, 3.7 MB, ran 20% faster than 64 rows, 14.7 MB, on one thread)
FORWARD_CHUNK_BYTES = 4 << 20
_lock = threading.Lock()
_libs: dict = {}                                  # dtype -> the loaded function, or the reason there is none


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("flags", "model name")))[:4096]
    except OSError:
        return ""


def _compile(cc: str, double: bool) -> str:
    """The library's path, built for ``double`` or float reals; with OpenMP (the threads of the libgomp torch
    loaded), else, where the compiler has none, single-threaded (``-DFDPG_NO_OPENMP``)."""
    try:
        return _compile_with(cc, _FLAGS + (["-DFDPG_DOUBLE"] if double else []), double)
    except OSError:
        flags = [f for f in _FLAGS if f != "-fopenmp"] + ["-fopenmp-simd", "-DFDPG_NO_OPENMP"]
        return _compile_with(cc, flags + (["-DFDPG_DOUBLE"] if double else []), double)


def _compile_with(cc: str, flags: list, double: bool) -> str:
    with open(_SRC, "rb") as f:
        src = f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(src + repr((flags, version, _cpu_key())).encode()).hexdigest()[:16]
    cache = os.environ.get("FDPG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fdpg")
    out = os.path.join(cache, f"cpu_decode_{'f64' if double else 'f32'}_{key}.so")
    if not os.path.isfile(out):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, "-o", tmp, _SRC, "-lm"], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise OSError(f"{cc} failed: {r.stderr.strip()[-1500:]}")
            os.replace(tmp, out)                  # atomic: concurrent processes may build the same file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return out


class _Lib(NamedTuple):
    """The library's entry points for one dtype."""
    sample: Callable[..., int]
    activation: Callable[..., int]
    forward: Callable[..., int]
    attention: Callable[..., int]
    gemm: Callable[..., int]


def _load(dtype):
    """The native library (:class:`_Lib`) for ``dtype`` weights, or the reason (a str) there is none."""
    with _lock:
        if dtype not in _libs:
            try:
                cc = next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)
                if cc is None:
                    raise OSError("no C compiler ($CC, cc or gcc) on the PATH")
                lib = ctypes.CDLL(_compile(cc, dtype == torch.float64))
                fns = [lib.fdpg_sample, lib.fdpg_activation, lib.fdpg_forward, lib.fdpg_attention, lib.fdpg_gemm]
                for fn in fns:
                    fn.restype = ctypes.c_int64
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                _libs[dtype] = _Lib(*fns)
            except (OSError, AttributeError, subprocess.SubprocessError) as e:
                _libs[dtype] = f"{type(e).__name__}: {e}"
                import warnings

                warnings.warn(f"fdpg.cpu_decode: the native CPU loop is unavailable ({_libs[dtype]}); sampling "
                              "takes the Python loop", stacklevel=3)
        return _libs[dtype]


def _library_reason(dtype) -> str | None:
    """Why the native library cannot serve ``dtype`` (turned off, or not loadable), or None."""
    if os.environ.get("FDPG_CPU_DECODE", "1") == "0":
        return "FDPG_CPU_DECODE=0"
    lib = _load(dtype)
    return lib if isinstance(lib, str) else None


def library_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the native CPU library is not in use for ``dtype`` (float32 or float64): ``FDPG_CPU_DECODE=0``, or why
    it could not be compiled or loaded (no C compiler, ...); None where it is."""
    return _library_reason(dtype)


def unavailable_reason(dec, all_done=None) -> str | None:
    """Why the native loop cannot run the sampling pass of decoder ``dec`` (after its prefill), or None."""
    family = type(dec).__name__
    if family not in ("_GPT2", "_Llama"):
        return "the native loop knows GPT-2 and Llama only"
    if not dec.slab or dec.cast:
        return "the decoder is not on the CPU slab path (GPU, autocast or half precision)"
    if all_done is not None:
        return "all_done: the ranks' agreement at each stop check runs in Python"
    reason = _model_reason(dec, [dec.head_w]) if family == "_GPT2" else _llama_reason(dec)
    return reason or _library_reason(dec.wdtype)


# Llama's Linear weights transposed for the native GEMM, kept while the weight is unchanged: the prior's once, the
# policy's once per optimizer step. Unchanged means the same storage, version counter and norm: fused optimizers
# (torch.optim's fused AdamW, the trainer's on the CPU) and writes through ``.data`` update a weight in place without
# bumping its version counter (fdpg.decode's replay check reads the norms for the same reason). The native Llama path
# takes models whose Linear weights fit in LLAMA_MAX_BYTES (the copies double them).
LLAMA_MAX_BYTES = 1 << 30
_transposed_cache: dict = {}      # id(weight) -> (weakref to it, (data_ptr, version, norm), the copy); gone with it


def _transposed(w: torch.Tensor, norm: float) -> torch.Tensor:
    """``w.t()`` as a contiguous copy, cached for ``w`` until it changes (``norm``: its norm now)."""
    key = (w.data_ptr(), w._version, norm)
    hit = _transposed_cache.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    if hit is None or hit[0]() is not w:                   # a new weight: its entry goes when it does
        weakref.finalize(w, _transposed_cache.pop, id(w), None)
    copy = w.detach().t().contiguous()
    _transposed_cache[id(w)] = (weakref.ref(w), key, copy)
    return copy


def _llama_weights(blk) -> list:
    """A Llama block's tensors in cpu_decode.c's LW_ order: norm weights, each Linear's weight transposed
    (``[in, out]``, contiguous: the native GEMM reads its right factor row-major) and its bias or None."""
    n1, qp, kp, vp, op, n2, gp, up, _, dp = blk
    lins = (qp, kp, vp, op, gp, up, dp)
    with torch.no_grad():
        norms = torch.stack(torch._foreach_norm([lin.weight for lin in lins])).tolist()
    t = [_transposed(lin.weight, nm) for lin, nm in zip(lins, norms)]
    out = [n1.weight]
    for lin, w in zip(lins[:4], t[:4]):
        out += [w, lin.bias]
    out.append(n2.weight)
    for lin, w in zip(lins[4:], t[4:]):
        out += [w, lin.bias]
    return out


_LLAMA_LINEARS = (1, 2, 3, 4, 6, 7, 9)            # q, k, v, o, gate, up, down in a block of fdpg.decode._Llama


def _llama_tensors(dec) -> list:
    """Llama decoder ``dec``'s own tensors the native code reads: embedding, final norm, and every layer's norms,
    Linear weights and biases (present ones)."""
    ts = [dec.emb, dec.final_norm.weight]
    for blk in dec.blocks:
        ts += [blk[0].weight, blk[5].weight] + [t for j in _LLAMA_LINEARS for t in (blk[j].weight, blk[j].bias)
                                                if t is not None]
    return ts


def _llama_reason(dec, tables=("cos_t", "sin_t")) -> str | None:
    """Why the native code cannot take Llama decoder ``dec``'s weights (and its RoPE ``tables``), or None."""
    act = type(dec.blocks[0][8]).__name__
    if act not in ("SiLU", "SiLUActivation"):
        return f"the activation {act} (native, for Llama: SiLU)"
    if dec.wdtype != torch.float32:
        return "Llama in float64 (its RMSNorm rounds through float32 in the Python loop)"
    linear_bytes = sum(blk[j].weight.numel() for blk in dec.blocks for j in _LLAMA_LINEARS) * 4
    if linear_bytes > LLAMA_MAX_BYTES:
        return f"Llama's Linear weights past LLAMA_MAX_BYTES ({linear_bytes >> 20} MiB; transposed copies double them)"
    tensors = _llama_tensors(dec) + [dec.head_w] + [getattr(dec, t) for t in tables]
    if any(not t.is_contiguous() or t.dtype != dec.wdtype for t in tensors):
        return "a weight that is not contiguous, or weights of mixed dtypes"
    return None


def _layer_weights(blk) -> list:
    """A GPT-2 block's tensors in cpu_decode.c's W_ order."""
    ln1, c_attn, c_proj, ln2, c_fc, _, m_proj = blk
    return [ln1.weight, ln1.bias, c_attn.weight, c_attn.bias, c_proj.weight, c_proj.bias, ln2.weight, ln2.bias,
            c_fc.weight, c_fc.bias, m_proj.weight, m_proj.bias]


def _model_reason(dec, extra: list) -> str | None:
    """Why the native code cannot take GPT-2 decoder ``dec``'s activation and weights (and ``extra``), or None."""
    act = type(dec.blocks[0][5]).__name__
    if act not in _ACT:
        return f"the activation {act} (native: GELU, tanh-GELU, ReLU)"
    tensors = [dec.wte, dec.pe, dec.final_norm.weight, dec.final_norm.bias, *extra]
    for blk in dec.blocks:
        tensors += _layer_weights(blk)
    if any(t is None or not t.is_contiguous() for t in tensors):
        return "a weight that is missing (no bias or affine norm) or not contiguous"
    if any(t.dtype != dec.wdtype for t in tensors):
        return "weights of mixed dtypes"
    return None


def _norms_and_scales(dec) -> list:
    """cpu_decode.c's fp: the final norm's eps, then each layer's two norms' eps and attention scale."""
    if type(dec).__name__ == "_Llama":
        fp = [dec.final_norm.variance_epsilon]
        for i, blk in enumerate(dec.blocks):
            fp += [blk[0].variance_epsilon, blk[5].variance_epsilon, dec.scales[i]]
        return fp
    fp = [dec.final_norm.eps]
    for i, blk in enumerate(dec.blocks):
        fp += [blk[0].eps, blk[3].eps, dec.scales[i]]
    return fp


def run(dec, logits: torch.Tensor, max_length: int, eos_token_id: int | None, pad: int, stop_check_every: int,
        generator: torch.Generator | None):
    """The sampling pass of ``dec`` after its prefill (``logits [B, V]``: the prefill's), as the Python loop of
    :func:`fdpg.sampling.sample` runs it: ``(tokens [B, T] long, token_logprob [B, T] float32)``, with ``dec``
    left as the loop leaves it (``T - 1`` steps fed). None when the native loop cannot run it (the caller loops)."""
    if unavailable_reason(dec) is not None:
        return None
    lib = _load(dec.wdtype)
    B, S, L = dec.B, dec.S, dec.n_layer
    llama = type(dec).__name__ == "_Llama"
    V = dec.head_w.shape[0]
    F = dec.blocks[0][6].weight.shape[0] if llama else dec.blocks[0][4].weight.shape[1]
    gen = generator if generator is not None else torch.default_generator
    state = gen.get_state()
    u = torch.rand(max_length, B, dtype=torch.float64, generator=gen)   # the stream of max_length draws of [B, 1]
    tokens = torch.empty(B, max_length, dtype=torch.long)
    lps = torch.empty(B, max_length, dtype=torch.float32)
    logits = logits.contiguous()
    rec = dec._rec if dec.recording else {}
    valid = None if dec.valid is None else dec.valid.to(torch.uint8).contiguous()
    keep = [u, tokens, lps, logits, valid]                              # alive during the call
    act = _SILU if llama else _ACT[type(dec.blocks[0][5]).__name__]
    hd = dec.hd if llama else dec.d // dec.n_head
    dims = [L, B, S, dec.d, dec.n_head, F, V, act, dec.n, max_length, -1 if eos_token_id is None else eos_token_id,
            pad, stop_check_every, torch.get_num_threads(), int(llama), dec.n_kv if llama else dec.n_head, hd]
    fp = _norms_and_scales(dec)

    def ptr(t):
        return None if t is None else t.data_ptr()

    ln_f = dec.final_norm
    ptrs = [dec.emb if llama else dec.wte, None if llama else dec.pe, dec.kv, ln_f.weight,
            None if llama else ln_f.bias, dec.head_w, dec.head_b, valid, u, logits, tokens, lps,
            rec.get("proj"), rec.get("fc"), rec.get("act"), rec.get("dact"), rec.get("mlp"),
            dec._rec_logits if dec.recording else None, dec._rec_ids if dec.recording else None,
            rec.get("q"), rec.get("k"), rec.get("o"), rec.get("gate"), rec.get("up"), rec.get("down"),
            dec.cos_t if llama else None, dec.sin_t if llama else None]
    ptrs = [ptr(t) for t in ptrs]
    for blk in dec.blocks:
        ws = _llama_weights(blk) if llama else _layer_weights(blk)
        keep += ws                                                      # (the transposed copies)
        ptrs += [ptr(t) for t in ws]
    per_layer = _W_PER_LLAMA_LAYER if llama else _W_PER_LAYER
    assert len(dims) == _N_DIMS and len(ptrs) == _N_PTRS + per_layer * L
    T = _call(lib.sample, dims, fp, ptrs)
    del keep
    if T < 1:
        raise MemoryError("fdpg.cpu_decode: the sampling loop could not allocate its buffers")
    if T < max_length:      # the Python loop draws [B, 1] uniforms per token drawn: consume exactly as many
        gen.set_state(state)
        torch.rand(T, B, dtype=torch.float64, generator=gen)
    dec.n += T - 1
    return tokens[:, :T], lps[:, :T]


def forward(dec, ids: torch.Tensor) -> torch.Tensor | None:
    """The final-norm hidden states ``[B, s, d]`` of ``ids [B, s]`` through GPT-2 or (float32) Llama decoder
    ``dec``'s layers in one native call (``dec`` set up by its scoring forward: ``dec.pe`` or ``dec.cos`` and
    ``dec.sin_s``, ``dec.valid``), as that forward computes them to float rounding, the rows in chunks of at most
    about ``FORWARD_CHUNK_BYTES`` of working memory; None where the native code cannot take it: autograd wanted,
    autocast, another device or dtype, a token id out of the vocabulary, the library unavailable or its buffers not
    allocatable (the caller runs the torch forward)."""
    family = type(dec).__name__
    if family not in ("_GPT2", "_Llama") or dec.dev.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return None
    llama = family == "_Llama"
    if llama:
        tracked = _llama_tensors(dec)
    else:
        tracked = [w for blk in dec.blocks for w in _layer_weights(blk)] + [dec.wte, dec.pe, dec.final_norm.weight]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked):
        return None
    if llama:
        reason = _llama_reason(dec, ())
    else:
        reason = (dec.wdtype not in (torch.float32, torch.float64)) or _model_reason(dec, [])
    if reason or _library_reason(dec.wdtype):
        return None
    lib = _load(dec.wdtype)
    B, s = ids.shape
    ids = ids.contiguous()
    emb = dec.emb if llama else dec.wte
    if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < emb.shape[0]):
        return None                         # a token id out of the vocabulary: the torch forward raises on it
    valid = None if dec.valid is None else dec.valid.to(torch.uint8).contiguous()
    out = torch.empty(B, s, dec.d, dtype=dec.wdtype)
    if llama:
        F, act, hkv, hd = dec.blocks[0][6].weight.shape[0], _SILU, dec.n_kv, dec.hd
        cos, sin = dec.cos.contiguous(), dec.sin_s.contiguous()
        weights = [t for blk in dec.blocks for t in _llama_weights(blk)]
    else:
        F, act = dec.blocks[0][4].weight.shape[1], _ACT[type(dec.blocks[0][5]).__name__]
        hkv, hd, cos, sin = dec.n_head, dec.d // dec.n_head, None, None
        weights = [w for blk in dec.blocks for w in _layer_weights(blk)]
    dims = [dec.n_layer, B, s, dec.d, dec.n_head, F, act, torch.get_num_threads(), FORWARD_CHUNK_BYTES, int(llama),
            hkv, hd]
    fp = _norms_and_scales(dec)
    keep = [ids, valid, out, cos, sin, weights]                           # alive during the call
    ptrs = [t if t is None else t.data_ptr() for t in (ids, None if llama else dec.pe, emb, valid, out,
                                                        dec.final_norm.weight, None if llama else dec.final_norm.bias,
                                                        cos, sin)]
    ptrs += [None if t is None else t.data_ptr() for t in weights]
    per_layer = _W_PER_LLAMA_LAYER if llama else _W_PER_LAYER
    assert len(dims) == _N_FDIMS and len(ptrs) == _N_FPTRS + per_layer * dec.n_layer
    failed = _call(lib.forward, dims, fp, ptrs) != 0     # its buffers could not be allocated: the torch forward runs
    del keep
    return None if failed else out


def _call(fn, dims, fp, ptrs) -> int:
    return fn((ctypes.c_int64 * len(dims))(*dims), (ctypes.c_double * len(fp))(*fp),
              (ctypes.c_void_p * len(ptrs))(*ptrs))


def _native_ok(*ts, autograd: bool = False) -> bool:
    """Tensors the helpers below can take: CPU, float32/64 alike, the native library loaded, and (unless
    ``autograd``: the helper has a backward) no autograd wanted."""
    t = ts[0]
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and all(x.dtype == t.dtype and x.device == t.device for x in ts)
            and (autograd or not (torch.is_grad_enabled() and any(x.requires_grad for x in ts)))
            and _library_reason(t.dtype) is None)


_ACT_MIN = 1 << 17   # elements: below, starting the threads costs more than ATen's kernel (a prefill's [B, F])


def activation(x: torch.Tensor, act) -> torch.Tensor | None:
    """``act(x)`` for GPT-2's activation modules (GELU, tanh-GELU, ReLU) without autograd, on the CPU threads;
    None where the native library cannot take it, or where ``x`` is too small to be worth it."""
    kind = _ACT.get(type(act).__name__)
    if kind is None or x.numel() < _ACT_MIN or not x.is_contiguous() or not _native_ok(x):
        return None
    y = torch.empty_like(x)
    n = x.shape[-1]
    dims = [x.numel() // n, kind, n, torch.get_num_threads()]                  # as Job.dims in cpu_decode.c
    _call(_load(x.dtype).activation, dims, [], [x.data_ptr(), y.data_ptr()])
    return y


def gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, threads: int | None = None
         ) -> torch.Tensor | None:
    """``a @ w`` (``+ out`` when given, written there) by the library's GEMM, as the sampling loop and the forward
    run it, on ``threads`` of the CPU threads (default torch's count): ``a [M, K]`` row-major or a transposed view
    of a contiguous ``[K, M]``, ``w [K, N]`` contiguous, ``out [M, N]`` contiguous, one float dtype (float32/64).
    None where the library or the layouts cannot take it."""
    if not _native_ok(a, w) or not w.is_contiguous() or a.dim() != 2 or w.dim() != 2:
        return None
    if a.stride(1) == 1 or a.shape[1] == 1:
        am, ak = a.stride(0), 1
    elif a.stride(0) == 1 or a.shape[0] == 1:
        am, ak = 1, a.stride(1)
    else:
        return None
    (M, K), N = a.shape, w.shape[1]
    beta = out is not None
    out = torch.empty(M, N, dtype=a.dtype) if out is None else out
    if w.shape[0] != K or out.shape != (M, N) or not out.is_contiguous() or out.dtype != a.dtype:
        raise ValueError(f"gemm: a {tuple(a.shape)}, w {tuple(w.shape)}, out {tuple(out.shape)}")
    dims = [M, N, K, am, ak, N, N, int(beta), threads or torch.get_num_threads()]
    _call(_load(a.dtype).gemm, dims, [], [a.data_ptr(), w.data_ptr(), out.data_ptr()])
    return out


def attention(qkv, valid: torch.Tensor | None, scale: float, n_head: int, n_kv: int) -> torch.Tensor | None:
    """Causal attention with autograd under fdpg.decode's scoring mask (``valid [B, s]`` bool or None: a query
    attends to the valid keys at or before it, a padding query to itself only), scores scaled by ``scale``:
    ``[B, s, n_head * hd]``, a new contiguous tensor. ``qkv``: the tuple ``(q [B, s, n_head, hd], k, v [B, s,
    n_kv, hd])``, or one tensor ``[B, s, n_head + 2 * n_kv, hd]`` holding them side by side (a fused QKV GEMM's
    output: its gradient is then one tensor, not three stacked), at any strides. Forward and backward are each one
    native call over (KV head, row) items on the CPU threads (flash attention's backward: the softmax recomputed
    from each query's saved log-sum-exp). None where the native library cannot take it (another device, dtypes
    other than float32/64, autocast; the caller runs its torch attention)."""
    ts = qkv if isinstance(qkv, tuple) else (qkv,)
    if torch.is_autocast_enabled("cpu") or not _native_ok(*ts, autograd=True):
        return None
    if valid is not None:
        valid = valid.to(torch.uint8).contiguous()
    return _Attention.apply(float(scale), n_head, n_kv, valid, *ts, *([None, None] if len(ts) == 1 else []))


def _attention_views(q, k, v, n_head: int, n_kv: int) -> list:
    """``[(tensor, element offset, strides (b, t, head, e))]`` of q, k, v (``k is None``: ``q`` packed)."""
    if k is None:
        st = q.stride()
        return [(q, 0, st), (q, n_head * st[2], st), (q, (n_head + n_kv) * st[2], st)]
    return [(t, 0, t.stride()) for t in (q, k, v)]


def _attention_call(mode: int, views: list, valid, scale: float, n_head: int, n_kv: int):
    """One ``fdpg_attention`` call; ``views``: (tensor, offset, strides) of q, k, v, o, do, dq, dk, dv (None: not
    used), then the lse tensor."""
    q = views[0][0]
    B, s, _, hd = q.shape
    dims = [mode, B, s, n_head, n_kv, hd, torch.get_num_threads()]
    ptrs = []
    for view in views[:-1]:
        t, off, st = view if view is not None else (None, 0, (0, 0, 0, 0))
        dims += list(st)
        ptrs.append(None if t is None else t.data_ptr() + off * t.element_size())
    ptrs += [views[-1].data_ptr(), None if valid is None else valid.data_ptr()]
    if _call(_load(q.dtype).attention, dims, [scale], ptrs) != 0:
        raise MemoryError("fdpg.cpu_decode.attention: could not allocate its per-thread buffers")


class _Attention(torch.autograd.Function):
    """:func:`attention`'s forward and backward (``k = v = None``: ``q`` is the packed QKV tensor)."""

    @staticmethod
    def forward(ctx, scale, n_head, n_kv, valid, q, k, v):
        B, s, _, hd = q.shape
        o = torch.empty(B, s, n_head, hd, dtype=q.dtype)
        lse = torch.empty(B, n_head, s, dtype=q.dtype)
        views = _attention_views(q, k, v, n_head, n_kv)
        _attention_call(0, views + [(o, 0, o.stride()), None, None, None, None, lse], valid, scale, n_head, n_kv)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = scale, n_head, n_kv, valid
        return o.view(B, s, n_head * hd)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        scale, n_head, n_kv, valid = ctx.args
        B, s, _, hd = q.shape
        do = do.reshape(o.shape)                                 # (read at its strides)
        if k is None:
            dqkv = torch.empty(B, s, n_head + 2 * n_kv, hd, dtype=q.dtype)
            grads = _attention_views(dqkv, None, None, n_head, n_kv)
            out = (dqkv, None, None)
        else:
            out = (torch.empty(B, s, n_head, hd, dtype=q.dtype), torch.empty(B, s, n_kv, hd, dtype=q.dtype),
                   torch.empty(B, s, n_kv, hd, dtype=q.dtype))
            grads = _attention_views(*out, n_head, n_kv)
        views = _attention_views(q, k, v, n_head, n_kv) + [(o, 0, o.stride()), (do, 0, do.stride())]
        _attention_call(1, views + grads + [lse], valid, scale, n_head, n_kv)
        return None, None, None, None, *out


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters
_heap: dict = {}


def retain_heap() -> str | None:
    """Keep the process's freed memory mapped for reuse (glibc only): allocations below 32 MiB from the heap
    (``M_MMAP_THRESHOLD``, glibc's ceiling) and no trimming of its top (``M_TRIM_THRESHOLD`` 1 GiB). A CPU training
    step allocates the same large tensors every step (the sampling pass's recordings, activations, gradients:
    tens of MB at the tiny benchmark config); glibc otherwise maps them afresh from the kernel, and the first write
    to each page is a page fault plus a zeroing, about 10 ms a step there. The process's resident memory stays at
    its high-water mark. Once per process; skipped where ``FDPG_MALLOC=0``, where ``GLIBC_TUNABLES`` or
    ``MALLOC_*_`` already set malloc, or off glibc. Returns why it was skipped (None when applied)."""
    with _lock:
        if "why" not in _heap:
            _heap["why"] = _tune_heap()
        return _heap["why"]


def _tune_heap() -> str | None:
    if os.environ.get("FDPG_MALLOC", "1") == "0":
        return "FDPG_MALLOC=0"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ):
        return "malloc is tuned by the environment (GLIBC_TUNABLES or MALLOC_*)"
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "no mallopt (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)):
        return "mallopt refused the settings"
    return None
