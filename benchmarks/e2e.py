"""End-to-end throughput of one f-DPG training step (issue 7): fdpg's trainer against the loop users write today
and NAVER disco, on the same model and batch, with every phase set against its floor.

    python benchmarks/e2e.py --config tiny-cpu --steps 10 --threads 1
    PYTHONPATH=/work/disco-src python benchmarks/e2e.py --config tiny-cpu --steps 4 --repeat 6 --threads 2 \\
        --peers straightforward,disco,fdpg
    python benchmarks/e2e.py --config gpt2-small --length 128 --steps 10         # GPU (or a patient CPU)
    python benchmarks/e2e.py --config llama-1b --steps 10                         # GPU only, bf16
    python -m pytest benchmarks/test_bench_e2e.py                                 # the pytest-benchmark twin

Configs: tiny-cpu (GPT-2 shape, vocab 512, d 128, 4 layers, length 32, batch 64), tiny-cpu-llama (the same
size in Llama's form: RMSNorm, RoPE, SwiGLU, 2 KV heads of 8), gpt2-small (124M, random
weights, vocab 50257, length 64 by default, 64 to 256 with --length), llama-1b (~1.2B Llama-3.2-1B shape, bf16
weights, GPU only). Target: one pointwise constraint ("contains token 3"; "does not contain token 3" for the large
vocabularies, where a random model almost never emits a given token); divergence forward KL; on-policy.

Each peer runs in a subprocess of its own (disco switches on autograd anomaly detection for its whole process, and
peak memory is per process): ``--warmup`` steps, then ``--steps`` timed steps. With ``--repeat R`` on the CPU
(``--interleave``, the default there) every peer's process is started and warmed up first, then the peers take
turns, ``--steps`` timed steps each, for R rounds: a shared machine's load drifts over seconds, and a round that
alternates peers within it hits them alike (the ratios are printed round by round). On a GPU each run is a fresh
process, one peer's memory at a time (``--no-interleave`` does that on the CPU too). The parent measures, in the same
run and with the same thread count, the matmul rate at the model's GEMM shapes (fp32 on CPU, bf16 on GPU) and the
memory copy bandwidth, and prints one table:

- samples/s, tokens/s (generated tokens up to and including each EOS), step time;
- the step split into sampling, policy scoring (its log-probs with grad), prior scoring (the prior's log-probs, the
  target's b(x), and for fdpg the paired op that takes both models' log-probs), coefficients (log Z, weights, f',
  baseline, surrogate), backward, optimizer (clipping + AdamW) and other (the rest of the step);
- peak memory: on CPU the peak RSS above the RSS after imports (``/proc/self/status`` VmHWM, reset after the
  models are built), on GPU ``torch.cuda.max_memory_allocated``;
- the floor of each phase and each figure as a multiple of it: forward/backward FLOPs at the measured matmul rate;
  sampling = max(its FLOPs at the matmul rate, the weights and KV cache read once per generated token at the
  measured bandwidth, in the compute dtype: bf16 on GPU, fp32 on CPU); optimizer = AdamW's 7 reads/writes per
  parameter at the bandwidth; coefficients have none;
- every figure as a ratio against the straightforward loop.

CPU figures name ``torch.get_num_threads()`` (on the 2-core CI machines one thread is often faster for tiny
models) and the load average before and after the run: the machine may be shared.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as P  # noqa: E402

RESULT_TAG = "E2E-RESULT "
READY_TAG = "E2E-READY"


# ---- floors ---------------------------------------------------------------------------------------------------

def _linear_params_per_layer(sh: P.Shape) -> int:
    d, kv = sh.d, sh.kv_heads * sh.head_dim
    if sh.family == "gpt2":
        return d * 3 * d + d * d + 2 * d * sh.ff
    return 2 * d * d + 2 * d * kv + 3 * d * sh.ff


def gemm_shapes(sh: P.Shape) -> list[tuple[int, int, int]]:
    """``(K, N, count)``: every weight GEMM of one forward pass (x [M, K] @ W [K, N]), with its multiplicity."""
    d, kv, L = sh.d, sh.kv_heads * sh.head_dim, sh.n_layer
    if sh.family == "gpt2":
        layer = [(d, 3 * d, L), (d, d, L), (d, sh.ff, L), (sh.ff, d, L)]
    else:
        layer = [(d, d, 2 * L), (d, kv, 2 * L), (d, sh.ff, 2 * L), (sh.ff, d, L)]
    return layer + [(d, sh.vocab, 1)]


def n_params(sh: P.Shape) -> int:
    """Trainable parameters (weights and embeddings; biases and norms left out)."""
    pos = sh.n_positions * sh.d if sh.family == "gpt2" else 0
    return sh.n_layer * _linear_params_per_layer(sh) + sh.vocab * sh.d + pos


def forward_flops(sh: P.Shape) -> float:
    """One forward pass of the batch over the T positions that predict the T tokens (causal attention counted
    over the positions each query sees)."""
    B, T, L, d = sh.batch, sh.length, sh.n_layer, sh.d
    per_pos = 2 * L * _linear_params_per_layer(sh) + 2 * d * sh.vocab
    attn = 4 * L * d * T * (T + 1) / 2
    return B * (T * per_pos + attn)


def floors(sh: P.Shape, matmul_rate: float, bandwidth: float, compute_bytes: int, param_bytes: int) -> dict:
    """Seconds per step for each phase at the measured rates, and what they are made of."""
    F = forward_flops(sh)
    B, T, L = sh.batch, sh.length, sh.n_layer
    weight_bytes = (L * _linear_params_per_layer(sh) + sh.vocab * sh.d) * compute_bytes
    kv_bytes = 2 * L * B * sh.kv_heads * sh.head_dim * compute_bytes * T * (T + 1) / 2
    sample_bytes = T * weight_bytes + kv_bytes
    opt_bytes = 7 * n_params(sh) * param_bytes
    out = {
        "sampling": max(F / matmul_rate, sample_bytes / bandwidth),
        "policy scoring": F / matmul_rate,
        "prior scoring": F / matmul_rate,
        "coefficients": None,
        "backward": 2 * F / matmul_rate,
        "optimizer": opt_bytes / bandwidth,
        "other": None,
        "_forward_flops": F, "_sampling_bytes": sample_bytes, "_sampling_flop_s": F / matmul_rate,
        "_sampling_byte_s": sample_bytes / bandwidth, "_optimizer_bytes": opt_bytes,
    }
    out["step"] = sum(v for k, v in out.items() if k in P.PHASES and v is not None)
    return out


# ---- hardware rates, measured in the same run -------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, min_s=0.05, rounds=3) -> float:
    """Best over ``rounds`` of the mean time of ``fn`` repeated for at least ``min_s`` seconds."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            _sync(device)
            el = time.perf_counter() - t0
            if el >= min_s:
                break
        best = min(best, el / n)
    return best


def measure_matmul(sh: P.Shape, device: torch.device, dtype: torch.dtype, M: int | None = None,
                   library: str = "torch") -> float:
    """FLOP/s of the forward pass's weight GEMMs at M rows (default batch x length, the scoring passes; M = batch
    is one decoding step), weighted by how often each occurs. library: "torch" (torch.mm: MKL on the CPU) or
    "onednn" (oneDNN through fdpg.cpu_gemm, float32 on the CPU; 0 where it is not available)."""
    M = M or sh.batch * sh.length
    if library == "onednn":
        from fdpg import cpu_gemm
        if device.type != "cpu" or dtype != torch.float32 or cpu_gemm.onednn_reason() is not None:
            return 0.0
    flops = secs = 0.0
    for K, N, count in gemm_shapes(sh):
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = torch.randn(K, N, device=device, dtype=dtype)
        out = torch.empty(M, N, device=device, dtype=dtype)
        if library == "onednn":
            wt = w.t().contiguous()            # a Linear's weight [out, in], as fdpg passes it
            f = lambda x=x, wt=wt: cpu_gemm._lin(x, wt)   # noqa: E731
        else:
            f = lambda x=x, w=w, out=out: torch.mm(x, w, out=out)   # noqa: E731
        t = _time(f, device)
        flops += count * 2.0 * M * K * N
        secs += count * t
    return flops / secs


def measure_matmuls(sh: P.Shape, device: torch.device, dtype: torch.dtype, M: int | None = None) -> dict:
    """``{library: FLOP/s}`` of :func:`measure_matmul` for torch.mm and, on the CPU, oneDNN."""
    return {lib: measure_matmul(sh, device, dtype, M, lib) for lib in ("torch", "onednn")}


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    n = (2**28 if device.type == "cuda" else 2**26)  # 1 GiB / 256 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, min_s=0.1)
    return 2 * src.numel() * src.element_size() / t


# ---- measuring one peer ---------------------------------------------------------------------------------------

def _rss_kb(field: str = "VmRSS") -> int | None:
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    hwm = _rss_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measure(peer, sh: P.Shape, device: torch.device, steps: int, warmup: int, *, rss_baseline: int | None,
            throughput_pass: bool = False, phase_note: str = "") -> dict:
    """Warm up, reset the peak-memory counters, run ``steps`` steps with phase timers (synchronising CUDA at phase
    boundaries), and, when ``throughput_pass``, ``steps`` more without timers for samples/s and tokens/s."""
    warm_up(peer, device, warmup)
    res = dict(timed_steps(peer, sh, device, steps), warmup=warmup, phase_note=phase_note)
    if throughput_pass:
        off = P.Phases(enabled=False)
        _sync(device)
        t0 = time.perf_counter()
        toks = [peer.step(off) for _ in range(steps)]
        _sync(device)
        el = time.perf_counter() - t0
        tokens = sum(int(t) for t in toks)
        res.update(samples_per_s=sh.batch * steps / el, tokens_per_s=tokens / el, step_s_untimed=el / steps,
                   throughput_from="a second pass without phase timers (no host syncs added)")
    return dict(res, **peak_memory(device, rss_baseline))


def warm_up(peer, device: torch.device, warmup: int):
    """``warmup`` untimed steps, then the peak-memory counters reset."""
    off = P.Phases(enabled=False)
    for _ in range(warmup):
        peer.step(off)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()


def timed_steps(peer, sh: P.Shape, device: torch.device, steps: int) -> dict:
    """``steps`` steps with phase timers: mean step time, phases, samples/s and tokens/s."""
    ph = P.Phases(sync=device.type == "cuda")
    total, tokens = 0.0, 0
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        tok = peer.step(ph)
        _sync(device)
        total += time.perf_counter() - t0
        tokens += int(tok)
    phases = {k: ph.t.get(k, 0.0) / steps for k in P.PHASES if k != "other"}
    phases["other"] = max(0.0, total / steps - sum(phases.values()))
    return {"steps": steps, "step_s": total / steps, "phases": phases, "samples_per_s": sh.batch * steps / total,
            "tokens_per_s": tokens / total, "throughput_from": "the timed steps (phase timers on)"}


def peak_memory(device: torch.device, rss_baseline: int | None) -> dict:
    if device.type == "cuda":
        return {"peak_mem_bytes": torch.cuda.max_memory_allocated(), "mem_kind": "torch.cuda.max_memory_allocated"}
    peak = _peak_rss_bytes()
    return {"peak_mem_bytes": peak - (rss_baseline or 0), "mem_kind": "peak RSS above the RSS after imports",
            "peak_rss_bytes": peak}


# ==================================================================================================================
# fdpg row: FdpgPeer (and run_fdpg) drive fdpg.trainer.Trainer (Trainer(config), train_step()). Written against
# the trainer as it stood on 2026-11-23; adjust here if its API changes. The trainer exposes no per-phase timings,
# so the phases are taken by wrapping its methods: sampling = Trainer.next_batch, prior scoring = Trainer.score
# (prior, target, the paired op) less what is nested in it as policy scoring = the policy's forward
# (fdpg.models._logits/_hidden of the policy) or the replay of its sampling pass (fdpg.decode's replay_logits),
# coefficients = the rest of Trainer.batch_loss (log Z, fdpg_coefficients, surrogate), backward = Tensor.backward,
# optimizer = clip_grad_norm_ + optimizer.step (step hooks); other = the rest of train_step (zero_grad, scheduler,
# bookkeeping).
# ==================================================================================================================

def fdpg_config(sh: P.Shape, device: torch.device, *, threads: int | None, output_dir: str,
                model_path: str | None = None, seed: int = 0) -> dict:
    """The trainer configuration (a plain mapping for ``fdpg.config.from_dict``) of shape ``sh``."""
    if model_path is not None:
        prior = model_path
    else:
        prior = {"tiny": {"vocab_size": sh.vocab, "n_layer": sh.n_layer, "n_embd": sh.d, "n_head": sh.n_head,
                          "seed": seed, "eos_token_id": sh.eos, "n_positions": sh.n_positions}}
    return {"prior": prior, "max_length": sh.length, "batch_size": sh.batch, "divergence": "forward_kl",
            "baseline": "batch", "target": {"constraints": [{"type": "contains_token", "token_id":
                                                            sh.constraint_token, "negate": sh.negate}]},
            "lr": 1e-4, "grad_clip": 1.0, "steps": 2**30, "seed": seed, "threads": threads,
            "device": str(device), "dtype": "auto", "eval": {"exact": False}, "output_dir": output_dir,
            "progress": False}


class FdpgPeer:
    """fdpg's :class:`~fdpg.trainer.Trainer`, one ``train_step()`` per step, phases taken by wrapping its methods."""

    name = "fdpg"

    def __init__(self, sh: P.Shape, device: torch.device, *, threads: int | None = None, seed: int = 0):
        from fdpg.config import from_dict
        from fdpg.trainer import Trainer

        self._tmp = tempfile.TemporaryDirectory(prefix="fdpg-e2e-")
        path = None
        if sh.family != "gpt2":  # the trainer builds GPT-2 shapes itself; others are saved as local HF models
            path = os.path.join(self._tmp.name, "prior")
            P.build_model(sh, seed).save_pretrained(path)
        cfg = from_dict(fdpg_config(sh, device, threads=threads, output_dir=os.path.join(self._tmp.name, "run"),
                                    model_path=path, seed=seed))
        self.trainer = tr = Trainer(cfg, log=lambda msg: print(f"[fdpg] {msg}", file=sys.stderr))
        self._ph = P.Phases(enabled=False)
        self._tokens = []
        me = self

        def timed(obj, attr, name, count=False):
            orig = getattr(obj, attr)

            def f(*a, **k):
                with me._ph(name):
                    out = orig(*a, **k)
                if count:
                    me._tokens.append(out.mask.sum())
                return out
            setattr(obj, attr, f)

        timed(tr, "next_batch", "sampling", count=True)
        timed(tr, "score", "prior scoring")
        self._time_policy_scoring()
        timed(tr, "batch_loss", "coefficients")
        self._ph.time_optimizer(tr.optimizer, current=lambda: me._ph)

    def _time_policy_scoring(self):
        """Nest the policy's share of Trainer.score in "policy scoring": its forward pass, or the replay."""
        import fdpg.models as M
        from fdpg.decode import _FastDecoder

        me, policy = self, self.trainer.policy
        for name in ("_logits", "_hidden"):
            orig = getattr(M, name)

            def f(model, *a, _orig=orig, **k):
                if model is not policy:
                    return _orig(model, *a, **k)
                with me._ph("policy scoring"):
                    return _orig(model, *a, **k)
            setattr(M, name, f)
        replay = _FastDecoder.replay_logits

        def timed_replay(dec, *a, **k):
            with me._ph("policy scoring"):
                return replay(dec, *a, **k)
        _FastDecoder.replay_logits = timed_replay

    @contextlib.contextmanager
    def _global_timers(self):
        """Time Tensor.backward and clip_grad_norm_ (module-level functions the trainer calls) for one step."""
        ph = self._ph
        backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_

        def timed_backward(*a, **k):
            with ph("backward"):
                return backward(*a, **k)

        def timed_clip(*a, **k):
            with ph("optimizer"):
                return clip(*a, **k)

        torch.Tensor.backward, torch.nn.utils.clip_grad_norm_ = timed_backward, timed_clip
        try:
            yield
        finally:
            torch.Tensor.backward, torch.nn.utils.clip_grad_norm_ = backward, clip

    def step(self, ph: P.Phases):
        self._ph = ph
        self._tokens = []
        if ph.enabled:
            with self._global_timers():
                self.trainer.train_step()
        else:
            self.trainer.train_step()
        return sum(self._tokens) if self._tokens else 0

    def close(self):
        self._tmp.cleanup()


def run_fdpg(config: str | P.Shape, steps: int, *, warmup: int = 2, threads: int | None = None,
             device: str = "auto", length: int | None = None, batch: int | None = None, seed: int = 0,
             rss_baseline: int | None = None) -> dict:
    """Measure fdpg's trainer on ``config`` (a name of :data:`peers.SHAPES` or a Shape) for ``steps`` steps after
    ``warmup``; returns the same record as the peers (see :func:`measure`). On a GPU samples/s comes from a second
    pass without phase timers, since the timers synchronise the device at every phase boundary."""
    sh = P.with_overrides(P.SHAPES[config] if isinstance(config, str) else config, length=length, batch=batch)
    dev = resolve_device(sh, device)
    peer = FdpgPeer(sh, dev, threads=threads, seed=seed)
    try:
        return measure(peer, sh, dev, steps, warmup, rss_baseline=rss_baseline, throughput_pass=_throughput_pass(dev),
                       phase_note="phases by wrapping Trainer methods (the trainer exposes no phase timings)")
    finally:
        peer.close()

# ==================================================================================================================


def resolve_device(sh: P.Shape, name: str) -> torch.device:
    if name == "auto":
        name = sh.default_device if sh.default_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available")
    if sh.gpu_only and dev.type != "cuda":
        raise SystemExit(f"--config {sh.name} runs on a GPU only (bf16, ~1B parameters); no GPU here")
    return dev


# ---- worker (one peer per process) ------------------------------------------------------------------------

def worker(args) -> dict:
    sh = P.with_overrides(P.SHAPES[args.config], length=args.length, batch=args.batch)
    dev = resolve_device(sh, args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # import everything a peer needs before taking the RSS baseline
    import transformers  # noqa: F401
    from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401
    if args.worker == "disco":
        with contextlib.suppress(ImportError):
            import disco.tuners  # noqa: F401
            import disco.distributions  # noqa: F401
    if args.worker == "fdpg":
        with contextlib.suppress(ImportError):
            import fdpg.trainer  # noqa: F401
    base = _rss_kb()
    base = None if base is None else base * 1024
    info = {"peer": args.worker, "threads": torch.get_num_threads(), "device": str(dev), "torch": torch.__version__}
    try:
        peer, note = make_peer(args.worker, sh, dev, args)
        try:
            if args.serve:
                return serve(peer, sh, dev, args, base, dict(info, phase_note=note))
            res = measure(peer, sh, dev, args.steps, args.warmup, rss_baseline=base,
                          throughput_pass=_throughput_pass(dev), phase_note=note)
        finally:
            if hasattr(peer, "close"):
                peer.close()
        res.update(info, ok=True)
    except P.PeerUnavailable as e:
        res = dict(info, ok=False, error=str(e))
    except Exception as e:  # a row that failed still prints, with the reason
        import traceback

        traceback.print_exc()
        res = dict(info, ok=False, error=f"{type(e).__name__}: {e}")
    res["threads"] = torch.get_num_threads()
    return res


def make_peer(name: str, sh: P.Shape, dev: torch.device, args):
    """``(peer, phase note)`` of peer ``name``."""
    if name == "fdpg":
        return (FdpgPeer(sh, dev, threads=args.threads, seed=args.seed),
                "phases by wrapping Trainer methods (the trainer exposes no phase timings)")
    kw = {"divergence": "forward_kl"} if name == "straightforward" else {}
    return (P.PEERS[name](sh, dev, seed=args.seed, **kw),
            "phases by explicit timers" if name == "straightforward" else
            "phases by wrapping disco's methods; other = disco's bookkeeping")


def serve(peer, sh: P.Shape, dev: torch.device, args, base: int | None, info: dict) -> dict:
    """Interleaved mode's worker: warm up, say READY, then run ``args.steps`` timed steps at each ``run`` read from
    stdin (answering with their figures) until ``quit``; returns the peak memory."""
    warm_up(peer, dev, args.warmup)
    print(READY_TAG, flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        res = dict(timed_steps(peer, sh, dev, args.steps), **info, warmup=args.warmup, ok=True)
        print(RESULT_TAG + json.dumps(res), flush=True)
    return dict(info, ok=True, **peak_memory(dev, base))


def _throughput_pass(dev: torch.device) -> bool:
    """A second pass without phase timers for samples/s on a GPU (the timers synchronise), except in a batch-size
    search, which wants the peak memory alone."""
    return dev.type == "cuda" and not os.environ.get("FDPG_E2E_SEARCH")


def _summary(r: dict) -> str:
    """One line of a peer's record, printed as soon as it is in (a run killed later keeps it in the log)."""
    if not r.get("ok"):
        return f"{r.get('peer')}: failed: {r.get('error', '')[-200:]}"
    keys = ("samples_per_s", "tokens_per_s", "step_s", "peak_mem_bytes")
    return f"{r.get('peer')}: " + json.dumps({k: r.get(k) for k in keys if k in r})


def _worker_command(name: str, args) -> tuple[list, dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--config", args.config,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--seed", str(args.seed)]
    for k in ("threads", "length", "batch"):
        if getattr(args, k) is not None:
            cmd += [f"--{k}", str(getattr(args, k))]
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    if getattr(args, "max_batch", False):
        env["FDPG_E2E_SEARCH"] = "1"       # a batch-size search: no throughput pass (measure)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return cmd, env


def run_interleaved(names: list, args) -> dict:
    """Every peer in its own process, all started and warmed up first, then ``args.repeat`` rounds in which each
    runs ``args.steps`` timed steps in turn (only one runs at a time): a change of the machine's load within a
    round hits every peer alike, and no round pays a process start. ``{name: [record per round]}``; each record
    carries the process's peak memory."""
    procs, logs, runs = {}, {}, {n: [] for n in names}
    try:
        for n in names:              # one at a time: a starting process would load the others' warm-up
            cmd, env = _worker_command(n, args)
            logs[n] = tempfile.TemporaryFile("w+")                 # (a pipe would fill and stall the worker)
            p = procs[n] = subprocess.Popen(cmd + ["--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=logs[n], text=True, env=env)
            line = _tagged_line(p)
            if not line.startswith(READY_TAG):
                runs[n].append(_failed(n, p, line, logs[n]))
                del procs[n]
        for rep in range(args.repeat):
            for n in list(procs):
                print(f"[e2e] round {rep + 1}/{args.repeat}: {n} ...", file=sys.stderr, flush=True)
                time.sleep(0.2)          # the last peer's idle OpenMP threads stop spinning (libgomp: a few ms)
                p = procs[n]
                p.stdin.write("run\n")
                p.stdin.flush()
                line = _tagged_line(p)
                res = json.loads(line[len(RESULT_TAG):]) if line.startswith(RESULT_TAG) else None
                if res is None or not res.get("ok"):
                    runs[n].append(_failed(n, p, line, logs[n]))
                    del procs[n]
                    continue
                runs[n].append(res)
        for n, p in procs.items():
            p.stdin.write("quit\n")
            p.stdin.flush()
            line = _tagged_line(p)
            final = json.loads(line[len(RESULT_TAG):]) if line.startswith(RESULT_TAG) else {}
            p.wait(timeout=600)
            for r in runs[n]:
                r.update({k: v for k, v in final.items() if k in ("peak_mem_bytes", "mem_kind", "peak_rss_bytes")})
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()
    return runs


def _tagged_line(p) -> str:
    """The worker's next line that starts with a tag ("" once its output ends)."""
    while True:
        line = p.stdout.readline()
        if not line or line.startswith((READY_TAG, RESULT_TAG)):
            return line


def _failed(name: str, p, line: str, log) -> dict:
    """The record of a worker that did not answer: its own failure record, else the end of its stderr."""
    if line.startswith(RESULT_TAG):
        res = json.loads(line[len(RESULT_TAG):])
        if "error" in res:
            return res
    if p.poll() is None:
        p.kill()
    p.wait()
    log.seek(0)
    tail = "\n".join(log.read().strip().splitlines()[-15:])
    return {"peer": name, "ok": False, "error": f"worker exited with {p.returncode}: {tail}"}


def run_peer_subprocess(name: str, args) -> dict:
    cmd, env = _worker_command(name, args)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
    return {"peer": name, "ok": False, "error": f"worker exited with {p.returncode}: {tail}"}


def largest_batch(name: str, args, start: int, limit: int) -> dict:
    """The largest batch for which peer ``name`` runs a training step (one warm-up and one timed step in a fresh
    process): doubling from ``start`` up to ``limit``, then bisecting to within 1/16. Returns ``{"batch", "peak",
    "error"}``: the batch (0: not even ``start``), its peak memory, and why the first larger batch failed."""
    def attempt(b):
        a = argparse.Namespace(**{**vars(args), "batch": b, "steps": 1, "warmup": 1})
        print(f"[e2e] {name}: batch {b} ...", file=sys.stderr, flush=True)
        r = run_peer_subprocess(name, a)
        print(f"[e2e] batch {b}: {_summary(r)}", file=sys.stderr, flush=True)
        return r

    good, bad, b = None, None, start
    while b <= limit:
        r = attempt(b)
        if not r.get("ok"):
            bad = (b, r)
            break
        good, b = (b, r), b * 2
    while good is not None and bad is not None and bad[0] - good[0] > max(1, good[0] // 16):
        mid = (good[0] + bad[0]) // 2
        r = attempt(mid)
        if r.get("ok"):
            good = (mid, r)
        else:
            bad = (mid, r)
    return {"batch": good[0] if good else 0, "peak": good[1].get("peak_mem_bytes") if good else None,
            "samples_per_s": good[1].get("samples_per_s") if good else None,
            "error": bad[1].get("error", "")[-300:] if bad else f"none up to --max-batch-limit {limit}"}


# ---- the table ---------------------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def table(results: list[dict], fl: dict, sh: P.Shape) -> str:
    ok = [r for r in results if r.get("ok")]
    ref = next((r for r in ok if r["peer"] == "straightforward"), None)

    def ms(x):
        return None if x is None else 1e3 * x

    rows = [("samples/s", lambda r: r["samples_per_s"], sh.batch / fl["step"], True),
            ("tokens/s", lambda r: r["tokens_per_s"], sh.batch * sh.length / fl["step"], True),
            ("step ms", lambda r: ms(r.get("step_s_untimed", r["step_s"])), ms(fl["step"]), False)]
    rows += [(f"{k} ms", (lambda k: lambda r: ms(r["phases"][k]))(k), ms(fl[k]), False) for k in P.PHASES]
    rows += [("peak memory MiB", lambda r: r["peak_mem_bytes"] / 2**20, None, False),
             ("threads", lambda r: r["threads"], None, None)]
    cols = ["metric", "floor"] + [r["peer"] for r in ok]
    body = []
    for label, get, floor, higher in rows:
        cells = [label, _fmt(floor)]
        for r in ok:
            v = get(r)
            if higher is None:
                cells.append(str(v))
                continue
            c = _fmt(v)
            if floor:
                c += f"  {floor / v:.2f}xF" if higher else f"  {v / floor:.1f}xF"
            if ref is not None and get(ref):
                c += f"  {v / get(ref):.2f}xS"
            cells.append(c)
        body.append(cells)
    widths = [max(len(str(row[i])) for row in [cols] + body) for i in range(len(cols))]
    line = lambda row: "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]
    for r in results:
        if not r.get("ok"):
            out.append(f"{r['peer']}: not measured: {r.get('error')}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(P.SHAPES), default="tiny-cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per peer (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--peers", default=None,
                    help="comma-separated: straightforward,disco,fdpg (default: all three for the tiny-cpu configs, "
                         "straightforward,fdpg otherwise)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cpu for tiny-cpu, else cuda if any)")
    ap.add_argument("--length", type=int, default=None, help="override the config's length (gpt2-small: 64..256)")
    ap.add_argument("--batch", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every peer this many times, round-robin, and report each peer's best run (a shared "
                         "machine's load changes under a benchmark)")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--max-batch", action="store_true",
                    help="instead of timing: find every peer's largest batch that fits (GPU; from --batch, doubling "
                         "then bisecting, each try in a fresh process)")
    ap.add_argument("--max-batch-limit", type=int, default=1 << 14, help="the largest batch tried (default 16384)")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="keep every peer's process alive and alternate rounds of --steps steps between them "
                         "(default: on the CPU; a GPU holds one peer's memory at a time)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        ap.error("--steps and --repeat must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")

    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0

    sh = P.with_overrides(P.SHAPES[args.config], length=args.length, batch=args.batch)
    dev = resolve_device(sh, args.device)
    names = (args.peers or ("straightforward,disco,fdpg" if sh.name.startswith("tiny-cpu") else "straightforward,fdpg"))
    names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if n not in (*P.PEERS, "fdpg")]
    if bad:
        ap.error(f"--peers: unknown {', '.join(bad)}; expected some of straightforward, disco, fdpg")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.max_batch:
        if dev.type != "cuda":
            ap.error("--max-batch: runs on a GPU (out-of-memory on the CPU is the kernel killing the process)")
        print(f"largest batch, {sh.name}: {sh.describe()}, {torch.cuda.get_device_name(dev)} "
              f"({torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
        print("| peer | largest batch | peak memory GiB | samples/s there | the next batch tried failed with |")
        print("|---|---|---|---|---|")
        for n in names:
            r = largest_batch(n, args, sh.batch, args.max_batch_limit)
            peak = "-" if r["peak"] is None else f"{r['peak'] / 2**30:.1f}"
            sps = "-" if r["samples_per_s"] is None else _fmt(r["samples_per_s"])
            err = r["error"].strip().splitlines()[-1] if r["error"].strip() else ""
            print(f"| {n} | {r['batch']} | {peak} | {sps} | {err[:120]} |", flush=True)
        return 0
    load0 = os.getloadavg()
    t_start = datetime.datetime.now().isoformat(timespec="seconds")

    cdtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rates = measure_matmuls(sh, dev, cdtype)
    bw = measure_bandwidth(dev)
    pbytes = torch.empty((), dtype=sh.torch_dtype).element_size()

    interleave = args.interleave if args.interleave is not None else dev.type == "cpu"
    if interleave:
        runs = run_interleaved(names, args)
    else:
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeat):  # round-robin, so that a change of load hits every peer alike
            for n in names:
                print(f"[e2e] run {rep + 1}/{args.repeat}: {n} ...", file=sys.stderr, flush=True)
                runs[n].append(run_peer_subprocess(n, args))
                print(f"[e2e] {_summary(runs[n][-1])}", file=sys.stderr, flush=True)
    results = []
    for n in names:
        good = [r for r in runs[n] if r.get("ok")]
        best = max(good, key=lambda r: r["samples_per_s"]) if good else runs[n][-1]
        best["all_samples_per_s"] = [r["samples_per_s"] for r in good]
        results.append(best)
    load1 = os.getloadavg()
    rates2 = measure_matmuls(sh, dev, cdtype)  # the machine may be shared: how much did the rate move?
    rates_decode = measure_matmuls(sh, dev, cdtype, M=sh.batch)
    # the ceiling: the faster library (oneDNN outruns MKL's sgemm on AMD's AVX-512 processors: fdpg/cpu_gemm.py)
    rate, rate2, rate_decode = (max(r.values()) for r in (rates, rates2, rates_decode))
    fl = floors(sh, max(rate, rate2), bw, torch.empty((), dtype=cdtype).element_size(), pbytes)

    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    threads = torch.get_num_threads()
    print(f"\ne2e {sh.name}: {sh.describe()}")
    print(f"device {dev_name} | torch {torch.__version__} | threads {threads} (torch.get_num_threads) | "
          f"{t_start} | load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} before, "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} after")
    libs = "; ".join(f"{lib} {r / 1e9:.1f}, {r2 / 1e9:.1f} after, {rd / 1e9:.1f} at M = {sh.batch}"
                     for lib, r, r2, rd in zip(rates, rates.values(), rates2.values(), rates_decode.values()) if r)
    print(f"measured in this run: {'bf16' if cdtype == torch.bfloat16 else 'fp32'} matmul {rate / 1e9:.1f} GFLOP/s "
          f"at the model's GEMM shapes (M = {sh.batch * sh.length}; {rate2 / 1e9:.1f} after the peers; floors use "
          f"the higher; {rate_decode / 1e9:.1f} at M = {sh.batch}, one decoding step; the faster library of: "
          f"{libs}), copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    print(f"floors per step: forward pass {fl['_forward_flops'] / 1e9:.2f} GFLOP; sampling max("
          f"{1e3 * fl['_sampling_flop_s']:.1f} ms FLOPs, {1e3 * fl['_sampling_byte_s']:.1f} ms for "
          f"{fl['_sampling_bytes'] / 1e9:.3f} GB of weights + KV cache); policy and prior scoring 1 forward each; "
          f"backward 2 forwards; "
          f"optimizer {fl['_optimizer_bytes'] / 1e6:.0f} MB at the bandwidth; step {1e3 * fl['step']:.1f} ms")
    if interleave:
        print(f"steps: each peer in its own process, all started and warmed up ({args.warmup} steps) first, then "
              f"{args.repeat} round(s) of {args.steps} timed steps per peer, one peer at a time; best round per "
              "peer\n")
    else:
        print(f"steps: {args.warmup} warm-up + {args.steps} timed per peer, each peer in its own process"
              + (f"; best of {args.repeat} round-robin runs per peer" if args.repeat > 1 else "") + "\n")
    print(table(results, fl, sh))
    print("\ncells: value, then xF = multiple of the floor (samples/s, tokens/s: floor rate / measured; times: "
          "measured / floor), then xS = ratio to the straightforward loop (value / its value).")
    for r in results:
        if r.get("ok"):
            allr = r.get("all_samples_per_s") or []
            runs_s = f"; samples/s of each run {', '.join(f'{x:.1f}' for x in allr)}" if len(allr) > 1 else ""
            print(f"{r['peer']}: {r.get('phase_note', '')}; samples/s from {r.get('throughput_from')}; memory = "
                  f"{r.get('mem_kind')}{runs_s}")
    if args.repeat > 1 and "fdpg" in runs:
        for n in names:
            if n != "fdpg":
                rat = round_ratios(runs["fdpg"], runs[n])
                if rat:
                    print(f"fdpg / {n}, round by round (the runs of one round share the machine's load): "
                          f"{', '.join(f'{x:.2f}' for x in rat)}; median {statistics.median(rat):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": sh.name, "shape": sh.__dict__, "device": dev_name, "torch": torch.__version__,
            "threads": threads, "start": t_start, "load_before": load0, "load_after": load1,
            "matmul_flops_per_s": [rate, rate2], "decode_matmul_flops_per_s": rate_decode,
            "matmul_flops_per_s_by_library": {"before": rates, "after": rates2, "decode": rates_decode},
            "bandwidth_bytes_per_s": bw,
            "floors_s": {k: v for k, v in fl.items()}, "results": results}, indent=1))
    return 0


def round_ratios(a: list[dict], b: list[dict]) -> list[float]:
    """samples/s of ``a`` over ``b`` in each round where both ran."""
    return [x["samples_per_s"] / y["samples_per_s"] for x, y in zip(a, b)
            if x.get("ok") and y.get("ok") and y["samples_per_s"] > 0]


if __name__ == "__main__":
    sys.exit(main())
