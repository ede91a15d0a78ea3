"""Timing shared by the benchmark scripts: median milliseconds of a call."""
import time

import torch

_FLUSH = {}   # device -> a 256 MiB buffer written between timed calls (L2 cold, as triton's do_bench does)


def bench(fn, device, warmup=3, rep=20, budget_ms=3000.0) -> float:
    """Median milliseconds of ``fn()`` over ``rep`` calls after ``warmup``, fewer (at least 5) where ``rep`` calls
    would take more than ``budget_ms``. On a GPU: CUDA events around each call, L2 flushed before it (a count of
    calls, not triton's ``do_bench`` millisecond budget, which gives a 300 ms call a single timed run); wall clock
    on the CPU."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    est = (time.perf_counter() - t) * 1e3
    n = max(5, min(rep, int(budget_ms / max(est, 1e-3))))
    ts = []
    if cuda:
        flush = _FLUSH.setdefault(str(device), torch.empty(256 << 20, dtype=torch.int8, device=device))
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            flush.zero_()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        ts = [a.elapsed_time(b) for a, b in ev]
    else:
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]
