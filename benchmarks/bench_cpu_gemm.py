"""CPU float32 GEMMs at a model's shapes: torch.mm (MKL), oneDNN (fdpg.cpu_gemm) and the native library's kernel.

    python benchmarks/bench_cpu_gemm.py                        # tiny-cpu shapes, 1 and 2 threads
    python benchmarks/bench_cpu_gemm.py --config gpt2-small --threads 2

For every weight GEMM of one forward pass (x [M, K] @ W [K, N]) at M = batch (one decoding step) and at M = batch x
length (a scoring pass), and the weight gradient's form (x^T [K, M] @ dy [M, N], K = batch x length): GFLOP/s of
each library. The native kernel also on one thread alone (as the sampling loop and the prior's forward run it:
each thread its own rows).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers as P  # noqa: E402
from _timing import bench  # noqa: E402
from e2e import gemm_shapes  # noqa: E402

from fdpg import cpu_decode, cpu_gemm  # noqa: E402


def rates(M: int, K: int, N: int, transposed: bool) -> dict:
    """GFLOP/s of ``a @ w`` (``a [M, K]``, or a transposed view of ``[K, M]``) by each library."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(K, M, generator=g).t() if transposed else torch.randn(M, K, generator=g)
    w = torch.randn(K, N, generator=g)
    flop = 2.0 * M * K * N
    out = {"torch.mm": flop / bench(lambda: torch.mm(a, w), "cpu") / 1e6}
    if cpu_gemm.onednn_reason() is None:
        saved, cpu_gemm.MIN_FLOPS = cpu_gemm.MIN_FLOPS, 0
        try:
            out["oneDNN"] = flop / bench(lambda: cpu_gemm.mm(a, w), "cpu") / 1e6
        finally:
            cpu_gemm.MIN_FLOPS = saved
    if cpu_decode.gemm(a[:1], w[:, :1].contiguous()) is not None:
        c = torch.empty(M, N)
        out["native, 1 thread"] = flop / bench(lambda: cpu_decode.gemm(a, w, c, threads=1), "cpu") / 1e6
        out["native"] = flop / bench(lambda: cpu_decode.gemm(a, w, c), "cpu") / 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny-cpu", choices=sorted(P.SHAPES))
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args()
    sh = P.SHAPES[args.config]
    native = cpu_decode._library_reason(torch.float32) or "used"
    print(f"{args.config}: CPU float32, torch {torch.__version__}, {os.cpu_count()} cores; "
          f"oneDNN: {cpu_gemm.onednn_reason() or 'used'}; native: {native}")
    cases = [(sh.batch, K, N, False) for K, N, _ in gemm_shapes(sh)]
    cases += [(sh.batch * sh.length, K, N, False) for K, N, _ in gemm_shapes(sh)]
    cases += [(K, sh.batch * sh.length, N, True) for K, N, _ in gemm_shapes(sh)]     # dW = x^T dy
    for th in args.threads:
        torch.set_num_threads(th)
        print(f"\nthreads {th} (GFLOP/s)\n")
        rows = [(f"{'x^T dy' if t else 'x W'} M={M} K={K} N={N}", rates(M, K, N, t)) for M, K, N, t in cases]
        libs = list(rows[0][1])
        print("| GEMM | " + " | ".join(libs) + " |")
        print("|---" * (len(libs) + 1) + "|")
        for name, r in rows:
            print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in libs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
