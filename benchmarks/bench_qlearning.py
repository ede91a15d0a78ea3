"""Q-learning from a fixed batch (issue 9): the memory of one TD step, and the cost of the exact KL and entropy.

    python benchmarks/bench_qlearning.py                # GPU: the issue's figures (both tables)
    python benchmarks/bench_qlearning.py --cpu-smoke    # small sizes on CPU (torch paths): checks the script itself

1. Peak memory of one Q-learning step (forward, TD targets, backward) on a GPT-2 of vocabulary V, B sequences of T
   tokens, beyond what is allocated before the step (parameters, batch). Implementations:
   - ``fdpg, logits``: :meth:`fdpg.qtrainer.QTrainer.td_terms` with ``output_layer: logits``: each model's logits,
     then :func:`fdpg.paired_token_stats` (Triton on a GPU: one pass, no [B, T, V] temporary, in-place backward);
   - ``fdpg, fused``: ``output_layer: fused``: hidden states and the fused output layer, no logits at all
     (the exact KL reward needs logits, so ``q_learning`` with ``kl_reward: exact`` falls back to the logits path);
   - ``straightforward``: :func:`fdpg.qlearning.reference_td_loss` on the same logits, as Jaques et al.'s code:
     float32 log-softmax of policy and prior (and the policy's softmax for the exact KL) over the vocabulary.
   Figures: MB beyond the start, and that in units of one float32 [B, T, V] tensor ("x BTV"; the logits of the
   three models, in the compute dtype, are part of every figure). GPU: ``torch.cuda.max_memory_allocated``; CPU:
   the torch profiler's allocation events (every CPU allocation and free, in order). On a CPU the ``logits`` path
   runs the op's torch reference, which does form temporaries; the kernels' claim is a GPU claim.
2. GPU: time of :func:`fdpg.paired_token_stats` on bf16 logits [N, V] with ``kl=True, entropy=True`` against
   without (forward; forward + backward with every output in the loss). Goal: at most 10% more.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from _timing import bench  # noqa: E402  (benchmarks/ is the script directory)

import fdpg
from fdpg.config import from_dict
from fdpg.models import _logits, model_inputs
from fdpg.qlearning import reference_td_loss


def peak_bytes(fn, device) -> int:
    """Peak bytes allocated by ``fn()`` beyond what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


# ---- 1. memory of one TD step -----------------------------------------------------------------------------------

def make_trainer(args, algorithm: str, output_layer: str, kl_kind: str | None, tmp: str):
    from fdpg.qtrainer import QTrainer

    path = os.path.join(tmp, "batch.jsonl")
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(0)
        toks = torch.randint(1, args.vocab, (args.batch, args.length), generator=g)
        with open(path, "w") as f:
            for row in toks.tolist():
                f.write(json.dumps({"tokens": row, "logprob": -1.0, "reward": float(row.count(2))}) + "\n")
    cfg = {"algorithm": algorithm, "max_length": args.length, "offline": path, "batch_size": args.batch,
           "prior": {"tiny": {"vocab_size": args.vocab, "n_layer": args.layers, "n_embd": args.d, "seed": 0,
                              "eos_token_id": None, "n_positions": args.length + 8}},
           "target": {"reward": {"type": "token_count", "token_id": 2}, "beta": 1.0},
           "eval": {"exact": False}, "output_layer": output_layer, "progress": False, "device": args.device,
           "output_dir": os.path.join(tmp, "run")}
    if kl_kind is not None:
        cfg["kl_reward"] = {"kind": kl_kind}
    return QTrainer(from_dict(cfg), log=lambda m: None)


def ours_step(tr):
    def run():
        s, r = tr.next_batch()
        terms = tr.td_terms(s, r)
        terms.loss.backward()
        tr.optimizer.zero_grad(set_to_none=True)
    return run


def straightforward_step(tr):
    def run():
        s, r = tr.next_batch()
        inp = model_inputs(s.context_ids, s.context_mask, s.tokens)
        sl = slice(inp.P - 1, inp.P + s.tokens.shape[1] - 1)
        with tr._amp():
            z_pi = _logits(tr.policy, inp)[:, sl]
            with torch.no_grad():
                z_a = _logits(tr.prior, inp)[:, sl]
                z_t = [_logits(tr.target_net, inp)[:, sl]]
        loss, _, _ = reference_td_loss(z_pi, z_a, z_t, s.tokens, s.mask, r, algorithm=tr.cfg.algorithm,
                                       beta=tr.cfg.target.beta, gamma=tr.cfg.gamma, kl_kind=tr.kl_kind,
                                       kl_weight=tr.kl_weight, loss=tr.cfg.loss)
        loss.backward()
        tr.optimizer.zero_grad(set_to_none=True)
    return run


def memory_table(args, device) -> list[dict]:
    B, T, V = args.batch, args.length, args.vocab
    btv = B * T * V * 4
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm, kl in (("psi_learning", None), ("q_learning", "exact")):
            label = algorithm + ("" if kl is None else f", kl_reward {kl}")
            for impl, layer in (("fdpg, logits", "logits"), ("fdpg, fused", "fused"), ("straightforward", "logits")):
                tr = make_trainer(args, algorithm, layer, kl, tmp)
                step = straightforward_step(tr) if impl == "straightforward" else ours_step(tr)
                step()  # warm up (optimizer-free; autotuning, lazy imports)
                peak = peak_bytes(step, device)
                note = "falls back to logits (exact KL)" if layer == "fused" and kl == "exact" else ""
                rows.append({"step": label, "impl": impl, "peak_MB": peak / 2**20, "x_BTV": peak / btv, "note": note})
                print(f"  {label:34s} {impl:16s} {peak / 2**20:10.1f} MB  {peak / btv:6.2f} x BTV  {note}",
                      flush=True)
                del tr, step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


# ---- 2. time of the paired op with and without KL and entropy --------------------------------------------------

def time_table(args, device) -> list[dict]:
    N, V = args.tokens, args.stats_vocab
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(N, V, device=device, dtype=dtype, generator=g)
    xp = torch.randn(N, V, device=device, dtype=dtype, generator=g)
    y = torch.randint(0, V, (N,), device=device, generator=g)
    rows = []

    def fwd(stats):
        with torch.no_grad():
            fdpg.paired_token_stats(x, xp, y, kl=stats, entropy=stats, validate=False)

    def step(stats):
        xg = x.detach().requires_grad_(True)
        st = fdpg.paired_token_stats(xg, xp, y, kl=stats, entropy=stats, validate=False)
        loss = st.policy_lp.sum() + st.policy_lse.sum()
        if stats:
            loss = loss + st.kl.sum() + st.entropy.sum()
        loss.backward()

    for name, fn in (("forward", fwd), ("forward + backward", step)):
        base = bench(lambda: fn(False), device)
        full = bench(lambda: fn(True), device)
        rows.append({"pass": name, "without_ms": base, "with_kl_entropy_ms": full, "extra_pct": 100 * (full / base - 1)})
        print(f"  {name:20s} without {base:9.3f} ms   with kl+entropy {full:9.3f} ms   {100 * (full / base - 1):+6.1f}%",
              flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="small sizes on CPU")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16384, help="N for the timing table")
    p.add_argument("--stats-vocab", type=int, default=128256, help="V for the timing table")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.vocab, args.batch, args.length, args.d, args.layers = 32768, 8, 128, 64, 1
        args.tokens, args.stats_vocab = 256, 4096
        args.device = "cpu"
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke, or on a GPU for the issue's figures", file=sys.stderr)
            return 2
        args.device = "cuda"
    device = torch.device(args.device)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"bench_qlearning: {env}; B={args.batch} T={args.length} V={args.vocab} d={args.d} "
          f"layers={args.layers}; one float32 BxTxV tensor = {args.batch * args.length * args.vocab * 4 / 2**20:.1f} MB")
    print("1. peak memory of one Q-learning step (forward + targets + backward), beyond the start:")
    mem = memory_table(args, device)
    print(f"2. paired_token_stats on {'bf16' if device.type == 'cuda' else 'float32'} logits "
          f"[{args.tokens}, {args.stats_vocab}] (policy and prior), median time:")
    tim = time_table(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": vars(args) | env, "memory": mem, "time": tim}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
