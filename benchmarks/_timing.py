"""Timing shared by the benchmark scripts: median milliseconds of a call."""
import time

import torch


def bench(fn, device, warmup=3, rep=20) -> float:
    """Median milliseconds of ``fn()``: triton's ``do_bench`` on a GPU (L2 flushed between calls; warmup and rep
    scaled to its millisecond budgets), wall clock on the CPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup * 10, rep=rep * 5, return_mode="median"))
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]
