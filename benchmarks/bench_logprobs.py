"""Paired per-token log-probs from logits: forward and in-place backward, against the copy bandwidth and peers.

One command on a GPU prints the whole table (bf16, N = 16384 tokens, V = 128256 and 50257):

    python benchmarks/bench_logprobs.py               # the issue's shapes
    python benchmarks/bench_logprobs.py --stats       # also the forward with entropy and exact KL (issue 9)
    python benchmarks/bench_logprobs.py --sweep       # also the Triton kernels under a grid of launch configs
    python benchmarks/bench_logprobs.py --cpu-smoke   # tiny sizes on CPU (torch paths): checks the script itself
    python -m pytest benchmarks/bench_logprobs.py     # pytest-benchmark functions (GPU only; skipped without CUDA)

Every method computes ``lp = log_softmax(x / T)[y]`` for the policy logits ``x`` and the prior logits ``x'``
(``[N, V]`` each). Passes: ``fwd`` (both models, no autograd), ``bwd in place`` (the gradient
``g (onehot - softmax(x))`` written over the policy logits; methods without an in-place backward say n/a) and
``step`` (policy forward with autograd + prior forward + ``lp.backward(g)``). Bytes counted: ``fwd`` reads both
logits once, 2·N·V·s; ``bwd`` reads and writes the policy logits, 2·N·V·s; ``step`` the sum, 4·N·V·s (s = bytes
per element). GB/s is those bytes over the median time, and "% of copy" that rate against the device-to-device
copy bandwidth measured in the same run (``dst.copy_(src)``, bytes read + written). Peak extra: memory beyond the
inputs at the peak of one call. Max err: |lp - float64 reference| over the first ``--check-rows`` rows.

Methods (each skipped with its reason where it cannot run): fdpg's CUDA backend (``fdpg._cuda``), fdpg's Triton
backend (``fdpg.paired_token_logprobs(..., backend="triton")``, in-place backward via
``inplace_backward=True``), eager and ``torch.compile``d ``log_softmax(x.float()).gather``, eager
``F.cross_entropy(reduction="none")``, and Liger-Kernel's ``LigerCrossEntropyLoss(reduction="none")`` when
importable.
"""
from __future__ import annotations

import argparse
import sys

import torch

from _timing import bench  # noqa: E402  (benchmarks/ is the script directory)

import fdpg


# ---- timing and ceilings -------------------------------------------------------------------------------------

def copy_bandwidth(device, nbytes: int) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


# ---- methods: name -> Method or a string saying why it does not run ------------------------------------------

class Method:
    """fwd(x, xp, y) -> policy lp (no autograd); step(x, xp, y, g) -> lp with backward done; bwd(x, y, lse, g)
    writes the policy gradient over x (None when the method has no in-place backward); lse(x) -> the logsumexp
    that bwd needs."""

    def __init__(self, fwd, step, bwd=None, lse=None):
        self.fwd, self.step, self.bwd, self.lse = fwd, step, bwd, lse


def _ref(x, y, tau):
    return torch.log_softmax(x.float() / tau, -1).gather(-1, y[:, None]).squeeze(-1)


def methods(device, tau: float, smoke: bool) -> dict:
    out = {}

    # fdpg, CUDA C++ backend
    from fdpg import _cuda

    if device.type != "cuda":
        out["fdpg cuda"] = "n/a: needs a CUDA device"
    elif not _cuda.available():
        out["fdpg cuda"] = f"n/a: {_cuda.load_error()}"
    else:
        def cuda_fwd(x, xp, y):
            return _cuda.paired_logprobs_fwd(x, xp, y, tau)[0]

        def cuda_lse(x):
            return _cuda.paired_logprobs_fwd(x, None, torch.zeros(x.shape[0], dtype=torch.long,
                                                                  device=x.device), tau)[1]

        def cuda_bwd(x, y, lse, g):
            _cuda.paired_logprobs_bwd(x, None, y, lse, None, g, temperature=tau, inplace=True)

        def cuda_step(x, xp, y, g):
            lp, lse, *_ = _cuda.paired_logprobs_fwd(x, xp, y, tau)
            _cuda.paired_logprobs_bwd(x, None, y, lse, None, g, temperature=tau, inplace=True)
            return lp

        out["fdpg cuda"] = Method(cuda_fwd, cuda_step, cuda_bwd, cuda_lse)

    # fdpg, Triton backend (public API)
    if device.type != "cuda":
        out["fdpg triton"] = "n/a: needs a CUDA device"
    else:
        def tri_fwd(x, xp, y):
            return fdpg.paired_token_logprobs(x, xp, y, temperature=tau, backend="triton")[0]

        def tri_step(x, xp, y, g):
            xr = x.requires_grad_(True)
            lp, _ = fdpg.paired_token_logprobs(xr, xp, y, temperature=tau, backend="triton", inplace_backward=True)
            lp.backward(g)
            x.requires_grad_(False)
            x.grad = None
            return lp

        bwd = lse = None
        try:
            from fdpg.kernels import logprobs as K

            def lse(x):
                return K.token_stats_forward(x, None, torch.zeros(x.shape[0], dtype=torch.long, device=x.device),
                                             tau)["lse"]

            def bwd(x, y, lse_, g):
                K.token_stats_backward(x, None, y, lse_, grad_lp=g, temperature=tau, out=x)
        except Exception:
            pass
        out["fdpg triton"] = Method(tri_fwd, tri_step, bwd, lse)

    # torch: eager and compiled log_softmax + gather; F.cross_entropy
    def torch_method(f):
        def fwd(x, xp, y):
            with torch.no_grad():
                lp = f(x, y, tau)
                f(xp, y, tau)
            return lp

        def step(x, xp, y, g):
            x.requires_grad_(True)
            lp = f(x, y, tau)
            with torch.no_grad():
                f(xp, y, tau)
            lp.backward(g)
            x.requires_grad_(False)
            x.grad = None
            return lp
        return Method(fwd, step)

    out["eager log_softmax.gather"] = torch_method(_ref)
    if smoke:
        out["torch.compile log_softmax.gather"] = "n/a: skipped by --cpu-smoke (compiles for minutes on CPU)"
    else:
        out["torch.compile log_softmax.gather"] = torch_method(torch.compile(_ref, dynamic=False))

    def ce(x, y, tau_):
        return -torch.nn.functional.cross_entropy(x.float() / tau_, y, reduction="none")

    out["eager F.cross_entropy"] = torch_method(ce)

    # Liger-Kernel's cross entropy on logits (writes its gradient into the logits during the forward)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        if device.type != "cuda":
            raise RuntimeError("needs a CUDA device")
        liger = LigerCrossEntropyLoss(reduction="none")

        def liger_lp(x, y, tau_):
            return -liger(x / tau_ if tau_ != 1.0 else x, y)

        out["Liger CrossEntropy (reduction=none)"] = torch_method(liger_lp)
    except Exception as e:
        out["Liger CrossEntropy (reduction=none)"] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return out


# ---- one shape -----------------------------------------------------------------------------------------------

def inputs(N, V, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(N, V, generator=gen, device=device) * 3).to(dtype)
    xp = (torch.randn(N, V, generator=gen, device=device) * 3).to(dtype)
    y = torch.randint(0, V, (N,), generator=gen, device=device)
    g = torch.randn(N, generator=gen, device=device)
    return x, xp, y, g


def peak_extra(fn, device):
    """Bytes allocated beyond what was live before fn(), at fn()'s peak (None off-GPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_shape(N, V, dtype, device, tau, copy_gbs, check_rows, smoke, only=None):
    s = torch.finfo(dtype).bits // 8
    nbytes = {"fwd": 2 * N * V * s, "bwd in place": 2 * N * V * s, "step": 4 * N * V * s}
    rows = []
    for name, m in methods(device, tau, smoke).items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        if isinstance(m, str):
            rows.append((name, "", m))
            continue
        try:
            x, xp, y, g = inputs(N, V, dtype, device)
            # accuracy on a slice, against float64
            c = min(check_rows, N)
            lp = m.fwd(x[:c].contiguous(), xp[:c].contiguous(), y[:c])
            err = (lp.double() - torch.log_softmax(x[:c].double() / tau, -1).gather(-1, y[:c, None])[:, 0]).abs().max()
            err = float(err)
            res = {}
            res["fwd"] = (bench(lambda: m.fwd(x, xp, y), device), peak_extra(lambda: m.fwd(x, xp, y), device))
            if m.bwd is not None:
                lse = m.lse(x)
                work = x.clone()  # values drift as the gradient overwrites them; the traffic does not
                res["bwd in place"] = (bench(lambda: m.bwd(work, y, lse, g), device),
                                       peak_extra(lambda: m.bwd(work, y, lse, g), device))
                del work
            else:
                res["bwd in place"] = "n/a: no in-place backward"
            work = x.clone()
            res["step"] = (bench(lambda: m.step(work, xp, y, g), device),
                           peak_extra(lambda: m.step(work, xp, y, g), device))
            del work, x, xp, y, g
            for p, r in res.items():
                if isinstance(r, str):
                    rows.append((name, p, r))
                else:
                    ms, peak = r
                    rows.append((name, p, ms, nbytes[p] / ms / 1e6, peak, err))
        except Exception as e:  # a method that fails at this shape: report it, keep going
            rows.append((name, "", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dt = str(dtype).replace("torch.", "")
    print(f"\n### N = {N}, V = {V}, {dt}, temperature {tau}: fwd and bwd move {nbytes['fwd'] / 1e9:.3g} GB each; "
          f"floor {nbytes['fwd'] / copy_gbs / 1e6:.3g} ms at the measured copy rate {copy_gbs:.0f} GB/s\n")
    print("| method | pass | ms | GB/s | % of copy | peak extra GiB | max err lp |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if len(r) == 3:
            print(f"| {r[0]} | {r[1]} | {r[2]} | | | | |")
            continue
        name, p, ms, gbs, peak, err = r
        peak_s = "n/a" if peak is None else f"{peak / 2**30:.2f}"
        print(f"| {name} | {p} | {ms:.4g} | {gbs:.4g} | {100 * gbs / copy_gbs:.1f}% | {peak_s} | {err:.1e} |")
    return rows


SWEEP = [(1, 4096, 16), (1, 4096, 8), (1, 4096, 4), (1, 8192, 16), (1, 8192, 8), (1, 2048, 8), (1, 2048, 4),
         (2, 2048, 8), (1, 16384, 16)]


def run_sweep(N, V, dtype, device, tau, copy_gbs):
    """fdpg's Triton kernels under a grid of launch configurations (ROWS, BLOCK_V, num_warps): forward, forward with
    entropy + KL, in-place backward, each as a fraction of the copy bandwidth. The first row is the heuristic's."""
    from fdpg.kernels import logprobs as K

    x, xp, y, g = inputs(N, V, dtype, device)
    nbytes = 2 * N * V * (torch.finfo(dtype).bits // 8)
    lse = K.token_stats_forward(x, None, y, tau)["lse"]
    print(f"\n### Triton launch configurations, N = {N}, V = {V}, {str(dtype).replace('torch.', '')}\n")
    print("| ROWS, BLOCK_V, warps | fwd ms | fwd % of copy | + entropy + KL ms | % | bwd in place ms | % |\n"
          "|---|---|---|---|---|---|---|")
    heuristic = K._config(N, V)
    for rows, block, warps in [heuristic] + [c for c in SWEEP if c != heuristic]:
        K.CONFIG_OVERRIDE = {"ROWS": rows, "BLOCK_V": block, "num_warps": warps}
        try:
            fwd = bench(lambda: fdpg.paired_token_stats(x, xp, y, temperature=tau, backend="triton"), device)
            st = bench(lambda: fdpg.paired_token_stats(x, xp, y, entropy=True, kl=True, temperature=tau,
                                                       backend="triton"), device)
            work = x.clone()
            bwd = bench(lambda: K.token_stats_backward(work, None, y, lse, grad_lp=g, temperature=tau, out=work),
                        device)
            pct = [100 * nbytes / t / 1e6 / copy_gbs for t in (fwd, st, bwd)]
            print(f"| {rows}, {block}, {warps} | {fwd:.3f} | {pct[0]:.1f}% | {st:.3f} | {pct[1]:.1f}% | {bwd:.3f} | "
                  f"{pct[2]:.1f}% |")
        except Exception as e:
            print(f"| {rows}, {block}, {warps} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | | |")
    K.CONFIG_OVERRIDE = {}


def run_stats(N, V, dtype, device, tau, copy_gbs):
    """fdpg's forward with and without entropy + exact KL (issue 9: at most 10% more time)."""
    print(f"\n### forward with entropy and exact KL(pi || a), N = {N}, V = {V}\n")
    print("| backend | plain ms | + entropy + KL ms | overhead | % of copy (with stats) |\n|---|---|---|---|---|")
    x, xp, y, _ = inputs(N, V, dtype, device)
    nbytes = 2 * N * V * (torch.finfo(dtype).bits // 8)
    from fdpg import _cuda

    cases = []
    if _cuda.available():
        cases.append(("fdpg cuda", lambda st: _cuda.paired_logprobs_fwd(x, xp, y, tau, st, st)))
    cases.append(("fdpg triton", lambda st: fdpg.paired_token_stats(x, xp, y, entropy=st, kl=st, temperature=tau,
                                                                     backend="triton")))
    for name, f in cases:
        try:
            a, b = bench(lambda: f(False), device), bench(lambda: f(True), device)
            frac = 100 * nbytes / b / 1e6 / copy_gbs
            print(f"| {name} | {a:.3f} | {b:.3f} | {100 * (b / a - 1):+.1f}% | {frac:.1f}% |")
        except Exception as e:
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:90]} | | | |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (torch paths)")
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--V", type=int, nargs="+", default=[128256, 50257])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--check-rows", type=int, default=256, help="rows of the float64 accuracy check")
    ap.add_argument("--only", nargs="*", help="run only methods whose name contains one of these")
    ap.add_argument("--stats", action="store_true", help="also time the forward with entropy and exact KL")
    ap.add_argument("--sweep", action="store_true", help="also time the Triton kernels under a grid of launch "
                                                         "configurations")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.cpu_smoke:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        shapes = [(64, V) for V in (97, 1000)]
        copy_bytes = 64 << 20
        args.check_rows = 16
    else:
        if not torch.cuda.is_available():
            print("bench_logprobs.py: no CUDA device here; this benchmark needs a GPU (H100/H200). "
                  "Run `python benchmarks/bench_logprobs.py --cpu-smoke` to check the script on CPU.",
                  file=sys.stderr)
            return 1
        device = torch.device("cuda")
        shapes = [(args.N, V) for V in args.V]
        copy_bytes = 2 << 30
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (1 thread)"
    print(f"# bench_logprobs: {name}, torch {torch.__version__}, fdpg {fdpg.__version__}")
    copy_gbs = copy_bandwidth(device, copy_bytes)
    print(f"measured device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written)")
    for N, V in shapes:
        run_shape(N, V, dtype, device, args.temperature, copy_gbs, args.check_rows, args.cpu_smoke, args.only)
        if args.stats and device.type == "cuda":
            run_stats(N, V, dtype, device, args.temperature, copy_gbs)
        if args.sweep and device.type == "cuda":
            run_sweep(N, V, dtype, device, args.temperature, copy_gbs)
    return 0


# ---- pytest-benchmark (GPU only) -----------------------------------------------------------------------------

try:
    import pytest

    _gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @_gpu
    @pytest.mark.parametrize("method", ["fdpg cuda", "fdpg triton", "eager log_softmax.gather"])
    @pytest.mark.parametrize("which", ["fwd", "step"])
    def test_bench_logprobs(benchmark, method, which):
        N, V = 4096, 128256
        m = methods(torch.device("cuda"), 1.0, False)[method]
        if isinstance(m, str):
            pytest.skip(m)
        x, xp, y, g = inputs(N, V, torch.bfloat16, torch.device("cuda"))

        def fn():
            m.fwd(x, xp, y) if which == "fwd" else m.step(x, xp, y, g)
            torch.cuda.synchronize()

        benchmark(fn)
except ImportError:  # pytest is only needed for the benchmark functions
    pass


if __name__ == "__main__":
    sys.exit(main())
