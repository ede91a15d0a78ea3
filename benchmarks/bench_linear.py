"""Fused output layer benchmark: policy forward + backward plus the prior's forward, against peers.

One command on a GPU prints the whole table (bf16, N = 16384 tokens, d = 4096, V = 128256 and 50257):

    python benchmarks/bench_linear.py            # the issue's shapes
    python benchmarks/bench_linear.py --small    # a quick run (N = 4096, d = 2048, V = 50257)
    python benchmarks/bench_linear.py --sweep    # also time Triton launch configurations and chunked widths
    python benchmarks/bench_linear.py --cpu-smoke   # tiny sizes on CPU (torch backend): checks the script itself
    python -m pytest benchmarks/bench_linear.py  # pytest-benchmark functions (GPU only; skipped without CUDA)

Each method does the same work: ``lp = log_softmax(h @ W.T)[y]`` for the policy with backward ``lp.backward(g)``
(``g`` a random per-token upstream gradient, as f-DPG's coefficients), plus the prior's ``lp`` without autograd.
Columns: median time; TFLOP/s at the nominal 10·N·d·V FLOPs (policy forward 2, backward with one recompute 6, prior
forward 2); that rate as a fraction of the bf16 matmul rate measured in the same run; peak memory beyond the inputs,
and beyond the unavoidable gradients (grad_hidden and grad_weight in the inputs' dtype); max abs error against
float64 of lp, grad_hidden and grad_weight, measured on the first ``--check-rows`` rows as a problem of their own.
Peers run when importable: Liger-Kernel (``LigerFusedLinearCrossEntropyLoss(reduction="none")``), Cut
Cross-Entropy (``linear_cross_entropy(..., reduction="none")``), torch's chunked ``F.linear_cross_entropy``.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from _timing import bench  # noqa: E402  (benchmarks/ is the script directory)

import fdpg


def nominal_flops(N: int, d: int, V: int) -> float:
    return 10.0 * N * d * V


# ---- the methods: each builds a step() doing policy fwd + bwd and prior fwd ---------------------------------

def _ref_lp(h, W, y):
    return torch.log_softmax((h @ W.t()).float(), -1).gather(-1, y[:, None]).squeeze(-1)


def methods(backend: str, smoke: bool) -> dict:
    """name -> factory(h, W, hp, Wp, y) -> step() returning policy lp; None where a peer is not importable."""
    out = {}

    def fdpg_method(fast, impl=None):
        def make(h, W, hp, Wp, y):
            from fdpg.kernels import linear as K

            def step(g):
                old = K.CONFIG_OVERRIDE
                K.CONFIG_OVERRIDE = {"impl": impl} if impl else old
                try:
                    lp, _ = fdpg.paired_linear_token_logprobs(h, W, hp, Wp, y, backend=backend, fast=fast)
                    lp.backward(g)
                finally:
                    K.CONFIG_OVERRIDE = old
                return lp
            return step
        return make

    out["fdpg exact"] = fdpg_method(False)
    out["fdpg fast"] = fdpg_method(True) if backend != "torch" else "n/a: the torch backend has no fast mode"
    # the other implementation of the Triton backend: cuBLAS GEMMs into L2-sized fp32 chunks, Triton epilogues
    out["fdpg exact, chunked"] = (fdpg_method(False, "chunked") if backend != "torch"
                                  else "n/a: the torch backend has one implementation")

    def eager_method(compiled):
        def make(h, W, hp, Wp, y):
            f = torch.compile(_ref_lp, backend="aot_eager" if smoke else "inductor", dynamic=False) if compiled \
                else _ref_lp

            def step(g):
                lp = f(h, W, y)
                with torch.no_grad():
                    f(hp, Wp, y)
                lp.backward(g)
                return lp
            return step
        return make

    out["eager log_softmax.gather"] = eager_method(False)
    out["torch.compile log_softmax.gather"] = eager_method(True)

    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        def liger(h, W, hp, Wp, y):
            loss = LigerFusedLinearCrossEntropyLoss(reduction="none")

            def step(g):
                lp = -loss(W, h, y)
                with torch.no_grad():
                    loss(Wp, hp, y)
                lp.backward(g)
                return lp
            return step
        out["Liger FLCE (reduction=none)"] = liger
    except Exception:  # not installed, or no GPU build
        out["Liger FLCE (reduction=none)"] = None

    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, W, hp, Wp, y):
            def step(g):
                lp = -linear_cross_entropy(h, W, y, reduction="none")
                with torch.no_grad():
                    linear_cross_entropy(hp, Wp, y, reduction="none")
                lp.backward(g)
                return lp
            return step
        out["Cut Cross-Entropy (reduction=none)"] = cce
    except Exception:
        out["Cut Cross-Entropy (reduction=none)"] = None

    opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if opts is not None and hasattr(torch.nn.functional, "linear_cross_entropy"):
        def chunked(h, W, hp, Wp, y):
            def step(g):
                lp = -torch.nn.functional.linear_cross_entropy(h, W, y, reduction="none", options=opts())
                with torch.no_grad():
                    torch.nn.functional.linear_cross_entropy(hp, Wp, y, reduction="none", options=opts())
                lp.backward(g)
                return lp
            return step
        out["torch chunked linear_cross_entropy"] = chunked
    else:
        out["torch chunked linear_cross_entropy"] = None
    return out


# ---- measurement -------------------------------------------------------------------------------------------

def inputs(N, d, V, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    h = rnd(N, d).requires_grad_(True)
    W = rnd(V, d, scale=3.0 / math.sqrt(d)).requires_grad_(True)      # logits of std about 3
    hp, Wp = rnd(N, d), rnd(V, d, scale=3.0 / math.sqrt(d))
    y = torch.randint(0, V, (N,), generator=gen, device=device)
    g = torch.randn(N, generator=gen, device=device)
    return h, W, hp, Wp, y, g


def matmul_rate(device, dtype) -> float:
    """Measured matmul TFLOP/s (max over a few large shapes) in the benchmark's dtype: the ceiling."""
    shapes = [(8192, 8192, 8192), (16384, 4096, 16384)] if device.type == "cuda" else [(256, 256, 256)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        ms = bench(lambda: a @ b, device)
        best = max(best, 2 * m * k * n / ms / 1e9)
        del a, b
    return best


def errors(make, N, d, V, dtype, device):
    """max |error| against float64 of (lp, grad_hidden, grad_weight) on an N-row problem."""
    h, W, hp, Wp, y, g = inputs(N, d, V, dtype, device, seed=1)
    lp = make(h, W, hp, Wp, y)(g)
    h64 = h.detach().double().requires_grad_(True)
    W64 = W.detach().double().requires_grad_(True)
    lp64 = torch.log_softmax(h64 @ W64.t(), -1).gather(-1, y[:, None]).squeeze(-1)
    gh64, gW64 = torch.autograd.grad(lp64, [h64, W64], g.double())
    return ((lp.detach().double() - lp64).abs().max().item(), (h.grad.double() - gh64).abs().max().item(),
            (W.grad.double() - gW64).abs().max().item())


def run_shape(N, d, V, dtype, device, backend, rate, check_rows, smoke, only=None):
    flops = nominal_flops(N, d, V)
    esize = torch.finfo(dtype).bits // 8
    grads_bytes = (N * d + V * d) * esize
    rows = []
    for name, make in methods(backend, smoke).items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        if make is None or isinstance(make, str):
            rows.append((name, make or "not installed"))
            continue
        try:
            h, W, hp, Wp, y, g = inputs(N, d, V, dtype, device)
            step = make(h, W, hp, Wp, y)

            def fn():
                h.grad = W.grad = None
                step(g)

            fn()                                   # compile / autotune / warm caches
            peak = extra = None
            if device.type == "cuda":
                h.grad = W.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step(g)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                extra = peak - grads_bytes
            ms = bench(fn, device)
            del h, W, hp, Wp, y, g, step
            errs = errors(make, min(check_rows, N), d, V, dtype, device)
            rows.append((name, ms, flops / ms / 1e9, peak, extra, errs))
        except Exception as e:  # a peer that fails at this shape: report, keep going
            rows.append((name, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n### N = {N}, d = {d}, V = {V}, {str(dtype).replace('torch.', '')}: nominal {flops:.3e} FLOPs, "
          f"floor {flops / rate / 1e9:.3g} ms at the measured {rate:.3g} TFLOP/s\n")
    print("| method | ms | TFLOP/s | % of matmul | peak extra GiB | beyond grads GiB | max err lp | max err grad_h "
          "| max err grad_W |")
    print("|---|---|---|---|---|---|---|---|---|")
    gib = (lambda b: "n/a" if b is None else f"{b / 2**30:.2f}")
    for r in rows:
        if len(r) == 2:
            print(f"| {r[0]} | {r[1]} | | | | | | | |")
            continue
        name, ms, tf, peak, extra, (e_lp, e_h, e_w) = r
        print(f"| {name} | {ms:.3g} | {tf:.3g} | {100 * tf / rate:.0f}% | {gib(peak)} | {gib(extra)} | {e_lp:.2e} "
              f"| {e_h:.2e} | {e_w:.2e} |")
    return rows


def sweep(N, d, V, dtype, device):
    """Times fdpg's forward (2NdV) and backward (6NdV) under a few launch configurations."""
    from fdpg.kernels import linear as K

    h, W, hp, Wp, y, g = inputs(N, d, V, dtype, device)
    cfgs = [dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=nw, num_stages=ns)
            for bn, bv, bd, nw, ns in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                       (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (256, 128, 64, 8, 3)]]
    cfgs += [dict(impl="chunked", cols=c) for c in (256, 512, 1024, 2048, 4096)]   # cuBLAS chunk widths
    print("\n| config | forward ms | fwd TFLOP/s | backward ms | bwd TFLOP/s |\n|---|---|---|---|---|")
    for cfg in cfgs:
        K.CONFIG_OVERRIDE = cfg
        try:
            fwd = bench(lambda: fdpg.linear_token_logprobs(hp, Wp, y), device)
            lp = fdpg.linear_token_logprobs(h, W, y)
            bwd = bench(lambda: torch.autograd.grad(lp, [h, W], g, retain_graph=True), device)
            print(f"| {cfg} | {fwd:.2f} | {2 * N * d * V / fwd / 1e9:.0f} | {bwd:.2f} | "
                  f"{6 * N * d * V / bwd / 1e9:.0f} |")
        except Exception as e:
            print(f"| {cfg} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | |")
    K.CONFIG_OVERRIDE = {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="N = 4096, d = 2048, V = 50257")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, fdpg's torch backend")
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--V", type=int, nargs="+", default=[128256, 50257])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--check-rows", type=int, default=512, help="rows of the float64 error check")
    ap.add_argument("--only", nargs="*", help="run only methods whose name contains one of these")
    ap.add_argument("--sweep", action="store_true", help="also time fdpg launch configurations")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.cpu_smoke:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "torch"
        shapes = [(64, 32, V) for V in (97, 300)]
        dtype = torch.float32
        args.check_rows = 16
    else:
        if not torch.cuda.is_available():
            print("bench_linear.py: no CUDA device here; this benchmark needs a GPU (H100/H200). "
                  "Run `python benchmarks/bench_linear.py --cpu-smoke` to check the script on CPU.", file=sys.stderr)
            return 1
        device, backend = torch.device("cuda"), "auto"
        N, d = (4096, 2048) if args.small else (args.N, args.d)
        Vs = [50257] if args.small else args.V
        shapes = [(N, d, V) for V in Vs]
    print(f"# bench_linear: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (1 thread)'}, "
          f"torch {torch.__version__}, fdpg {fdpg.__version__}, backend {backend}")
    rate = matmul_rate(device, dtype)
    print(f"measured {str(dtype).replace('torch.', '')} matmul: {rate:.1f} TFLOP/s")
    for N, d, V in shapes:
        run_shape(N, d, V, dtype, device, backend, rate, args.check_rows, args.cpu_smoke, args.only)
        if args.sweep and device.type == "cuda":
            sweep(N, d, V, dtype, device)
    return 0


# ---- pytest-benchmark (GPU only) -----------------------------------------------------------------------------

try:
    import pytest

    _gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @_gpu
    @pytest.mark.parametrize("method", ["fdpg exact", "fdpg fast", "eager log_softmax.gather"])
    def test_bench_linear(benchmark, method):
        N, d, V = 4096, 2048, 50257
        make = methods("auto", False)[method]
        h, W, hp, Wp, y, g = inputs(N, d, V, torch.bfloat16, torch.device("cuda"))
        step = make(h, W, hp, Wp, y)

        def fn():
            h.grad = W.grad = None
            step(g)
            torch.cuda.synchronize()

        benchmark(fn)
except ImportError:  # pytest is only needed for the benchmark functions
    pass


if __name__ == "__main__":
    sys.exit(main())
