"""pytest-benchmark twin of ``benchmarks/e2e.py``: one training step of each peer, same shapes and peers.

Not part of the test suite (pyproject's testpaths is tests/); run it explicitly:

    python -m pytest benchmarks/test_bench_e2e.py                                   # tiny-cpu, 1 thread
    PYTHONPATH=/work/disco-src python -m pytest benchmarks/test_bench_e2e.py        # with the disco peer
    FDPG_E2E_CONFIG=gpt2-small FDPG_E2E_ROUNDS=10 python -m pytest benchmarks/test_bench_e2e.py   # on a GPU

Environment: FDPG_E2E_CONFIG (default tiny-cpu), FDPG_E2E_THREADS (CPU threads, default 1), FDPG_E2E_ROUNDS (timed
steps, default 5), FDPG_E2E_DEVICE (default auto). All peers run in this one process, disco last (it switches on
autograd anomaly detection, restored when it is done). Each benchmark's extra_info holds samples/s, tokens/s, the
phase split (ms per step), the thread count and the load average.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
import peers as P  # noqa: E402

CONFIG = os.environ.get("FDPG_E2E_CONFIG", "tiny-cpu")
ROUNDS = int(os.environ.get("FDPG_E2E_ROUNDS", "5"))
THREADS = int(os.environ.get("FDPG_E2E_THREADS", "1"))
DEVICE = os.environ.get("FDPG_E2E_DEVICE", "auto")


@pytest.fixture(scope="module")
def setting():
    sh = P.SHAPES[CONFIG]
    if sh.gpu_only and not torch.cuda.is_available():
        pytest.skip(f"{CONFIG} needs a GPU")
    dev = e2e.resolve_device(sh, DEVICE)
    before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(THREADS)
    yield sh, dev
    torch.set_num_threads(before)


def _make(name, sh, dev):
    if name == "fdpg":
        try:
            return e2e.FdpgPeer(sh, dev, threads=torch.get_num_threads() if dev.type == "cpu" else None)
        except ImportError as e:
            pytest.skip(f"fdpg's trainer not importable: {e}")
    try:
        return P.PEERS[name](sh, dev)
    except P.PeerUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", ["straightforward", "fdpg", "disco"])  # disco last: see the module docstring
def test_e2e_step(benchmark, setting, name):
    sh, dev = setting
    peer = _make(name, sh, dev)
    try:
        peer.step(P.Phases(enabled=False))  # warm-up
        ph = P.Phases(sync=dev.type == "cuda")
        times, tokens = [], []

        def one_step():
            e2e._sync(dev)
            t0 = time.perf_counter()
            tokens.append(int(peer.step(ph)))
            e2e._sync(dev)
            times.append(time.perf_counter() - t0)

        benchmark.pedantic(one_step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        med = statistics.median(times)
        benchmark.extra_info.update(
            config=CONFIG, peer=name, device=str(dev), threads=torch.get_num_threads(), batch=sh.batch,
            length=sh.length, samples_per_s=sh.batch / med, tokens_per_s=sum(tokens) / sum(times),
            phases_ms={k: 1e3 * v / len(times) for k, v in ph.t.items()}, load_average=list(os.getloadavg()))
    finally:
        if hasattr(peer, "close"):
            peer.close()
