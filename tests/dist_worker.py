"""Scenarios of tests/test_distributed.py: each trains a tiny model and returns what the test compares.

Run by torchrun (``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT DATA
NAME...``), every rank saves ``OUT/NAME-rank{r}.pt``; the test runs the same scenario in one process with the
global batch and compares. A scenario's global batch is ``GLOBAL_BATCH`` sequences: ``GLOBAL_BATCH / W`` per rank.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

GLOBAL_BATCH = 8
PRIOR = {"tiny": {"vocab_size": 6, "n_layer": 2, "n_embd": 16, "seed": 0, "eos_token_id": 0,
                  "initializer_range": 0.3}}


def quiet(msg):
    pass


def write_offline(path: Path, n: int = 96) -> Path:
    """An offline JSONL set drawn from the prior, on two contexts (a conditional target: log Z per context)."""
    from fdpg.models import build_tiny
    from fdpg.sampling import sample

    prior = build_tiny(**PRIOR["tiny"])
    ctxs = ([0], [0, 2])
    with open(path, "w") as f:
        for i, c in enumerate(ctxs):
            ids = torch.tensor([c] * (n // 2))
            s = sample(prior, n // 2, 4, eos_token_id=0, context_ids=ids, generator=torch.Generator().manual_seed(i))
            for t, m, lp in zip(s.tokens, s.mask, s.logprob):
                f.write(json.dumps({"tokens": t[m].tolist(), "logprob": float(lp), "context": c}) + "\n")
    return path


def config(out: Path, world: int, **kw) -> dict:
    d = {"prior": PRIOR, "max_length": 4, "target": {"constraints": [{"type": "contains_token", "token_id": 3}]},
         "steps": 3, "batch_size": GLOBAL_BATCH // world, "lr": 3e-3, "seed": 0, "threads": 1,
         # Adam divides by sqrt(v) + eps: with the default eps it would blow the float noise of gradients that are
         # 0 in exact arithmetic (GPT-2's key bias: softmax ignores it) up to lr-sized steps that differ between
         # runs; eps 1e-4 leaves them negligible and every real gradient (>= 1e-3 here) as it was
         "adam_eps": 1e-4,
         "eval": {"exact": True, "every": 1}, "progress": False, "output_dir": str(out)}
    d.update(kw)
    return d


def full_params(model) -> dict:
    """Every parameter, whole (FSDP shards all-gathered: a collective), on the CPU."""
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().cpu().clone()
    return out


def instrument(tr) -> dict:
    """Record every batch's global statistics, every logged record, and the first step's gradients."""
    rec = {"batches": [], "records": [], "grads": None, "first_tokens": None}
    batch_loss, record = tr.batch_loss, tr.record

    def recorded_batch_loss(s, **kw):
        loss, coef, sc = batch_loss(s, **kw)
        if rec["first_tokens"] is None:
            rec["first_tokens"], rec["first_contexts"] = s.tokens.cpu().clone(), s.context_index.cpu().clone()
        rec["batches"].append({"log_z": tr.log_z().cpu().clone(), "baseline": coef.baseline.cpu().clone(),
                               "weights": coef.weights.cpu().clone(), "ess": coef.ess.cpu().clone(),
                               "coef": coef.coef.cpu().clone(), "loss": loss.detach().cpu().clone()})
        return loss, coef, sc

    def recorded_record():
        r = record()
        rec["records"].append(r)
        return r

    def grads_before_first_step(optimizer, args, kwargs):
        if rec["grads"] is None:
            rec["grads"] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).cpu().clone()
                            for n, p in tr.policy.named_parameters()}

    tr.batch_loss, tr.record = recorded_batch_loss, recorded_record
    tr.optimizer.register_step_pre_hook(grads_before_first_step)
    return rec


class FixedDraws:
    """Stands in for ``Trainer.draw``: call k returns this rank's slice of the k-th global batch of a fixed pool
    (sequences of the prior from seed k), with ``logprob`` = log q(x) under the model asked for. So a run on W ranks
    and a run on one rank with the global batch see the same sequences, on-policy or with a proposal."""

    def __init__(self, tr):
        from fdpg.models import build_tiny

        self.tr, self.calls, self.draw = tr, 0, tr.draw
        self.pool_model = build_tiny(**PRIOR["tiny"])

    @torch.no_grad()
    def __call__(self, n, model=None, *, sample_gen=None, data_gen=None):
        from fdpg.models import model_inputs
        from fdpg.sampling import Samples, sample

        if sample_gen is not None:           # the trainer's own prior samples (probe, lambda fit)
            return self.draw(n, model, sample_gen=sample_gen, data_gen=data_gen)
        tr, W, r = self.tr, self.tr.dist.world, self.tr.dist.rank
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        s = sample(self.pool_model, n * W, tr.cfg.max_length, eos_token_id=tr.eos, bos_token_id=tr.bos, generator=g)
        rows = slice(r * n, (r + 1) * n)
        tokens, mask, ctx = s.tokens[rows], s.mask[rows], s.context_ids[rows]
        model = model if model is not None else tr.policy
        inp = model_inputs(ctx, None, tokens)
        logits = model(input_ids=inp.input_ids, use_cache=False).logits[:, inp.P - 1:inp.P + tokens.shape[1] - 1]
        tok_lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
        tok_lp = torch.where(mask, tok_lp, torch.zeros_like(tok_lp))
        return Samples(tokens=tokens, mask=mask, token_logprob=tok_lp, logprob=tok_lp.sum(-1), context_ids=ctx,
                       context_mask=None, context_index=torch.zeros(n, dtype=torch.long))


def _trainer(cfg: dict, **kw):
    from fdpg.config import from_dict
    from fdpg.trainer import Trainer

    return Trainer(from_dict(cfg), log=quiet, **kw)


def _train(tr, fixed: bool = False) -> dict:
    rec = instrument(tr)
    if fixed:
        tr.draw = FixedDraws(tr)
    tr.train()
    rec["params"] = full_params(tr.policy)
    rec["local_params"] = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().cpu().clone()
                           for n, p in tr.policy.named_parameters()}
    rec["proposal_updates"] = tr.proposal_updates
    rec["samples"] = tr.samples_seen
    rec["sample_seed"] = tr.sample_gen.initial_seed()
    rec["strategy"] = tr.dist.strategy
    w = tr.policy.get_output_embeddings().weight
    rec["head_sharded"] = type(w).__name__ == "DTensor" and tuple(w.to_local().shape) != tuple(w.shape)
    return rec


# ---- scenarios: (out, data, world) -> results ----------------------------------------------------------------

def ddp_offline(out: Path, data: Path, world: int) -> dict:
    """DDP, offline conditional data (per-context running log Z), logits path, two micro-batches a step."""
    return _train(_trainer(config(out, world, offline=str(data), grad_accum=2, output_layer="logits",
                                  distributed={"strategy": "ddp"})))


def ddp_kl_adaptive(out: Path, data: Path, world: int) -> dict:
    """DDP, DPG with the KL-adaptive proposal (decided every step) on fixed samples, the fused output layer;
    metrics estimated from 16 samples of the policy (split over the ranks) instead of listed exactly."""
    return _train(_trainer(config(out, world, proposal={"update": "kl_adaptive", "every": 1},
                                  eval={"exact": False, "every": 1, "n_samples": 16},
                                  output_layer="fused", distributed={"strategy": "ddp"})), fixed=True)


def fsdp_kl_adaptive(out: Path, data: Path, world: int) -> dict:
    """FSDP2: policy, prior and proposal sharded; the fused output-layer op on the sharded (tied) output weight;
    JS divergence, batch log Z, on fixed samples with the KL-adaptive proposal."""
    return _train(_trainer(config(out, world, proposal={"update": "kl_adaptive", "every": 1}, divergence="js",
                                  z_estimate="batch", output_layer="fused", distributed={"strategy": "fsdp"})),
                  fixed=True)


def fsdp_offline(out: Path, data: Path, world: int) -> dict:
    """FSDP2, offline conditional data, logits path, two micro-batches a step."""
    return _train(_trainer(config(out, world, offline=str(data), grad_accum=2, output_layer="logits",
                                  distributed={"strategy": "fsdp"})))


PROMPTS = [[0], [0, 2]]


def _resume(strategy: str, out: Path, world: int) -> dict:
    """On-policy sampling (per-rank seeds) on two prompts, 4 steps with checkpoints every 2: once straight
    through, once stopped at step 2 and resumed by a new trainer on every rank."""
    kw = dict(steps=4, checkpoint_every=2, output_layer="fused", eval={"exact": True, "every": 2},
              prompts=PROMPTS, samples_per_context=2, distributed={"strategy": strategy})
    full = _train(_trainer(config(out / "full", world, **kw)))
    _train(_trainer(config(out / "part", world, **{**kw, "steps": 2})))
    resumed = _train(_trainer(config(out / "part", world, **kw), resume=True))
    return {"full": full, "resumed": resumed}


def ddp_resume(out: Path, data: Path, world: int) -> dict:
    return _resume("ddp", out, world)


def fsdp_resume(out: Path, data: Path, world: int) -> dict:
    return _resume("fsdp", out, world)


SCENARIOS = {f.__name__: f for f in (ddp_offline, ddp_kl_adaptive, fsdp_kl_adaptive, fsdp_offline, ddp_resume,
                                     fsdp_resume)}


def main(argv) -> None:
    torch.set_num_threads(1)
    out, data, names = Path(argv[0]), Path(argv[1]), argv[2:]
    import fdpg.distributed as D

    D.setup("cpu")
    r, w = D.rank(), D.world_size()
    for name in names:
        res = SCENARIOS[name](out / name, data, w)
        torch.save(res, out / f"{name}-rank{r}.pt")
    D.teardown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)   # no interpreter shutdown, where FSDP2 over gloo aborts now and then (as fdpg.cli does)
