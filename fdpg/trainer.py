"""The training loop: f-DPG (DPG, GDC++, any f-divergence, KL-control), on- or off-policy, online or offline.

One step reads top to bottom (:meth:`Trainer.train_step`):

1. sample ``x ~ q`` with the KV cache (q = pi on-policy; a frozen snapshot of pi for DPG's KL-adaptive proposal;
   a stored batch offline), log q(x) from the sampling pass;
2. score policy and prior in one paired pass (prior in inference mode) and the target's ``log b(x)``:
   ``log P = log a + log b``;
3. update the running ``log Z`` (per context) in log space;
4. ``c_i = (pi_i/q_i)(f'(pi_i/p_i) - B)`` from :func:`fdpg.fdpg_coefficients`; surrogate ``mean(c_i log pi(x_i))``;
5. one backward (gradient accumulation over ``grad_accum`` batches), clipping, AdamW, LR schedule.

    >>> from fdpg.trainer import train
    >>> run_dir = train("examples/tiny_js.yaml", overrides=["steps=100"])     # writes run_dir/metrics.jsonl

Nothing in the step synchronises with the host except the KL-adaptive proposal decision; figures are
accumulated as tensors and read at evaluation time.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

import fdpg
from . import distributed, divergences, exact as exact_mod
from .config import Config, ConfigError, resolve, to_dict
from .data import OfflineData, load_offline, load_prompts
from .models import (build_tiny, eos_token_id, eos_token_ids, load_model, load_tokenizer, max_positions,
                     model_inputs, quiet, special_tokens, use_fused_output, vocab_size)
from .sampling import Samples, cat_samples, left_pad, sample
from .targets import SeqBatch, Target, TargetScores, build_target, fit_lambdas

__all__ = ["Trainer", "train", "Scored", "TIMING_KEYS"]

# Keys that a resumed run may change: how it is run and observed, not what it trains.
_RESUME_MAY_CHANGE = frozenset({"eval", "checkpoint_every", "keep_checkpoints", "threads", "device", "distributed"})

# Metrics that measure the machine, not the run: they differ between otherwise identical runs.
TIMING_KEYS = ("samples_per_s", "tokens_per_s", "time")


@dataclass
class Scored:
    """A batch scored: policy_lp ``[B]`` (with grad when asked), prior_lp ``[B]``, log_P ``[B]`` = log a + log b,
    the target's scores, and proposal_lp ``[B]`` (log q)."""

    policy_lp: torch.Tensor
    prior_lp: torch.Tensor
    proposal_lp: torch.Tensor
    log_P: torch.Tensor
    target: TargetScores


def _finite_or_none(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, list):
        return [_finite_or_none(x) for x in v]
    return v


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    """Builds everything a run needs from a :class:`~fdpg.config.Config`, checks it before training, and trains.

    ``resume=True`` continues from the newest complete checkpoint in ``output_dir/checkpoints`` (or starts afresh
    when there is none). ``log`` receives one-line messages (default: stderr).
    """

    OFFLINE_LOGPROB = True      # an offline file must give log q(x) of every row (importance weights)

    def __init__(self, config: Config, *, resume: bool = False, log=None):
        self.cfg = cfg = config
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.device = distributed.setup(self._device(cfg.device))   # under torchrun: joins the process group
        if not distributed.is_main():
            self.log = lambda msg: None                                  # rank 0 speaks for the run
        on_gpu = self.device.type == "cuda"
        if self.device.type == "cpu":
            from .cpu_decode import retain_heap
            retain_heap()                            # the step's large tensors reuse mapped pages (no page faults)
        self.amp_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and on_gpu) else None
        self.out = Path(cfg.output_dir)
        if not resume and (self.out / "checkpoints").is_dir() and any((self.out / "checkpoints").glob("step-*")):
            raise ConfigError("output_dir", f"{str(self.out)!r} holds checkpoints of an earlier run; pass --resume "
                                            "(resume=True) to continue it, or choose another output_dir")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)

        # ---- models: the frozen prior a, the policy pi (a copy of a unless given), the proposal q
        self.prior, tokenizer = self._model(cfg.prior, "prior")
        self.prior.float().requires_grad_(False)
        if cfg.policy is None:
            self.policy = copy.deepcopy(self.prior)
        else:
            self.policy, tok2 = self._model(cfg.policy, "policy")
            tokenizer = tokenizer or tok2
        self.policy.float().requires_grad_(True)          # float32 master weights (autocast does bf16 compute)
        if self.amp_dtype is not None:
            self.prior.to(self.amp_dtype)                  # inference only: half the memory
        if cfg.tokenizer is not None:
            if not os.path.isdir(cfg.tokenizer):
                raise ConfigError("tokenizer", f"no tokenizer directory at {cfg.tokenizer!r}")
            tokenizer = load_tokenizer(cfg.tokenizer)
            if tokenizer is None:
                raise ConfigError("tokenizer", f"no tokenizer found in {cfg.tokenizer!r}")
        self.tokenizer = tokenizer
        self.V = vocab_size(self.prior)
        if vocab_size(self.policy) != self.V:
            raise ConfigError("policy", f"vocabulary size {vocab_size(self.policy)} differs from the prior's {self.V}; "
                                        "policy and prior must share one vocabulary")
        self.eos, self.bos = special_tokens(self.prior, eos=cfg.eos_token_id)
        if eos_token_id(self.policy) != eos_token_id(self.prior):
            raise ConfigError("policy", f"EOS token {eos_token_id(self.policy)} differs from the prior's "
                                        f"{eos_token_id(self.prior)}")
        listed = eos_token_ids(self.prior)
        if cfg.eos_token_id is None and len(listed) > 1:
            self.log(f"fdpg: the model lists EOS tokens {listed}; sequences end at the first, {self.eos} (set "
                     f"eos_token_id to choose another, e.g. a chat model's end-of-turn token)")
        self.pad = 0 if self.eos is None else self.eos
        rows = cfg.batch_size * cfg.max_length  # logits positions of one scored batch
        self.fused = (use_fused_output(self.policy, cfg.output_layer, rows)
                      and use_fused_output(self.prior, cfg.output_layer, rows))
        self.on_policy = cfg.offline is None and cfg.proposal.update == "on_policy"
        self.proposal = None
        if cfg.proposal.update == "kl_adaptive":
            self.proposal = copy.deepcopy(self.policy).requires_grad_(False).eval()

        # ---- contexts: one BOS (unconditional), prompts (conditional), or those of an offline file
        self.offline: OfflineData | None = None
        if cfg.offline is not None:
            self.offline = load_offline(cfg.offline, vocab_size=self.V, max_length=cfg.max_length,
                                        eos_token_id=self.eos, bos_token_id=self.bos,
                                        need_logprob=self.OFFLINE_LOGPROB)
            self.contexts = self.offline.contexts
        elif cfg.prompts is not None:
            self.contexts = load_prompts(cfg.prompts, tokenizer=self.tokenizer, vocab_size=self.V)
        else:
            self.contexts = [[self.bos]]
        self.conditional = cfg.prompts is not None or len(self.contexts) > 1 or self.contexts[0] != [self.bos]
        ctx_ids, ctx_mask = left_pad(self.contexts, self.pad)
        self.ctx_ids, self.ctx_mask = ctx_ids.to(self.device), None if ctx_mask is None else ctx_mask.to(self.device)
        self.ctx_len = torch.tensor([len(c) for c in self.contexts])
        for which, model in (("prior", self.prior), ("policy", self.policy)):
            limit = max_positions(model)
            if limit is not None and int(self.ctx_len.max()) + cfg.max_length > limit:
                raise ConfigError("max_length", f"contexts of up to {int(self.ctx_len.max())} tokens plus max_length "
                                                f"{cfg.max_length} exceed the {which}'s {limit} positions")

        # ---- target P(x) = a(x) b(x) and divergence
        search = [Path.cwd()]
        self.target: Target = build_target(cfg.target, log_b_floor=cfg.log_b_floor, tokenizer=self.tokenizer,
                                           vocab_size=self.V, search=search)
        self.divergence = divergences.get(cfg.divergence)

        # ---- data parallel under torchrun: DDP, or FSDP2 (which replaces the parameters: before the optimizer)
        self.dist = distributed.Parallel(cfg.distributed.strategy, self.device)
        if self.dist.distributed and type(self).train_step is not Trainer.train_step:
            raise ConfigError("algorithm", f"{cfg.algorithm} runs in one process only, not under torchrun (its "
                                           "training step does not go through the data-parallel wrapper)")
        self.dist.wrap(self.policy, self.prior, frozen=() if self.proposal is None else (self.proposal,))

        # ---- optimisation
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # the fused kernel (one pass over all parameters: ~4x faster on the CPU) on plain tensors; FSDP2's
        # DTensors take the default implementation
        fused = self.dist.strategy != "fsdp" and all(type(p) is torch.nn.Parameter and p.is_floating_point()
                                                      and p.device.type in ("cpu", "cuda") for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

        # ---- state
        C = len(self.contexts)
        self.step, self.samples_seen, self.proposal_updates = 0, 0, 0
        self.z_logsum = torch.full((C,), -math.inf, dtype=torch.float64, device=self.device)
        self.z_count = torch.zeros(C, dtype=torch.float64, device=self.device)
        self.last_kl_p_q: float | None = None
        self.sample_gen = torch.Generator(self.device).manual_seed(distributed.rank_seed(cfg.seed))  # per rank
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.offline_perm, self.offline_pos = None, 0
        self._elapsed = 0.0
        if self.offline is not None:
            self.offline_perm = torch.randperm(len(self.offline), generator=self.data_gen)
        self._reset_window()

        # ---- before training: exact space, probe, lambdas (or the checkpoint's)
        self.space = self._exact_space()
        ckpt = self.dist.broadcast(self._find_checkpoint() if resume else None)   # rank 0's choice, on every rank
        if ckpt is None:
            if resume:
                self.log(f"resume: no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
            self._probe()
            if self.target.features and self.target.lambdas is None:
                self._fit_lambdas()
            self.resumed_from = None
        else:
            self._load_checkpoint(ckpt)
            self.resumed_from = ckpt
        self._exact_cache = self._build_exact_cache() if self.space is not None else None

    # ------------------------------------------------------------------------------------------ setup helpers

    @staticmethod
    def _device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{name!r} requested but CUDA is not available")
        return dev

    def _model(self, spec, key: str):
        if spec.tiny is not None:
            t = spec.tiny
            try:
                model = build_tiny(**dataclasses.asdict(t))
            except ConfigError as e:
                raise ConfigError(f"{key}.tiny.{e.key}", str(e).split(": ", 1)[1]) from None
            tokenizer = None
        else:
            model, tokenizer = load_model(spec.path, key=key)
        return model.to(self.device).eval(), tokenizer

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    def _amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _exact_space(self):
        cfg = self.cfg
        if cfg.eval.exact is False:
            return None
        n = exact_mod.space_size(self.V, cfg.max_length, self.eos) * len(self.contexts)
        if n > cfg.eval.max_space:
            if cfg.eval.exact is True:
                raise ConfigError("eval.exact", f"the space holds {n:.3g} sequences (vocabulary {self.V}, max_length "
                                                f"{cfg.max_length}, {len(self.contexts)} context(s)), more than "
                                                f"eval.max_space = {cfg.eval.max_space:.3g}; set eval.exact: false")
            return None
        return exact_mod.enumerate_space(self.V, cfg.max_length, self.eos)

    # ------------------------------------------------------------------------------------------ sampling

    def _context_batch(self, n: int, gen: torch.Generator | None = None):
        """Contexts for ``n`` samples: ``(ids [n, P], mask or None, index [n])`` or Nones (unconditional)."""
        if not self.conditional:
            return None, None, None
        spc = self.cfg.samples_per_context
        W = self.dist.world if gen is None else 1    # the trainer's stream: the global batch, this rank's slice
        n_ctx = -(-n * W // spc)
        idx = torch.randint(len(self.contexts), (n_ctx,), generator=gen or self.data_gen)
        idx = idx.repeat_interleave(spc)[:n * W]
        return self._contexts_of(self.dist.local(idx) if W > 1 else idx)

    def _contexts_of(self, idx: torch.Tensor):
        lens = self.ctx_len[idx]
        P, full = int(lens.max()), self.ctx_ids.shape[1]
        dev_idx = idx.to(self.device)
        ids = self.ctx_ids[dev_idx, full - P:]
        mask = None
        if self.ctx_mask is not None and int(lens.min()) != P:
            mask = self.ctx_mask[dev_idx, full - P:]
        return ids, mask, dev_idx

    def draw(self, n: int, model=None, *, sample_gen: torch.Generator | None = None,
             data_gen: torch.Generator | None = None, record: bool = False) -> Samples:
        """``n`` fresh samples from ``model`` (default: the policy) on the trainer's contexts; the generators
        default to the trainer's (whose states are checkpointed)."""
        ids, mask, idx = self._context_batch(n, data_gen)
        try:
            return sample(model if model is not None else self.policy, n, self.cfg.max_length,
                          eos_token_id=self.eos, bos_token_id=self.bos, context_ids=ids, context_mask=mask,
                          context_index=idx, generator=sample_gen or self.sample_gen, autocast_dtype=self.amp_dtype,
                          stop_check_every=1 if self.device.type == "cpu" else 16, record=record,
                          # FSDP: every rank runs the same forward passes (collectives): stop when all are done
                          all_done=self.dist.all_done if self.dist.strategy == "fsdp" else None)
        except FloatingPointError as e:   # NaN logits (values checked: the CPU by default)
            raise FloatingPointError(f"training diverged at step {self.step}: {e} (the last checkpoint is intact; "
                                     f"lower lr, set grad_clip, or run with FDPG_VALIDATE=1 to find the first "
                                     f"non-finite input)") from None

    def _offline_indices(self, n: int) -> torch.Tensor:
        """The next ``n`` rows of the shuffled offline stream (reshuffled at each epoch; checkpointed state)."""
        data, parts, need = self.offline, [], n
        while need:
            if self.offline_pos == len(data):
                self.offline_perm = torch.randperm(len(data), generator=self.data_gen)
                self.offline_pos = 0
            take = min(need, len(data) - self.offline_pos)
            parts.append(self.offline_perm[self.offline_pos:self.offline_pos + take])
            self.offline_pos += take
            need -= take
        return torch.cat(parts)

    def _offline_samples(self, idx: torch.Tensor) -> Samples:
        """Rows ``idx`` of the offline set as :class:`Samples` on the trainer's device (log q from the file)."""
        data, dev = self.offline, self.device
        ids, mask, cidx = self._contexts_of(data.context_index[idx])
        tokens = data.tokens[idx].to(dev)
        return Samples(tokens=tokens, mask=data.mask[idx].to(dev), token_logprob=torch.zeros(tokens.shape, device=dev),
                       logprob=data.logprob[idx].to(dev), context_ids=ids, context_mask=mask, context_index=cidx)

    def _offline_batch(self, n: int) -> Samples:
        # the global batch is drawn from the shared stream; this rank keeps its slice
        return self._offline_samples(self.dist.local(self._offline_indices(n * self.dist.world)))

    def next_batch(self) -> Samples:
        """The next training batch from q (policy, proposal snapshot, or the offline set)."""
        n = self.cfg.batch_size
        if self.offline is not None:
            return self._offline_batch(n)
        if self.proposal is not None:
            return self.draw(n, self.proposal)
        # on-policy, one process: record the sampling pass so that scoring replays it instead of a forward pass
        return self.draw(n, self.policy, record=self.on_policy and self.dist.strategy == "none")

    # ------------------------------------------------------------------------------------------ scoring

    def target_scores(self, s: Samples) -> TargetScores:
        return self.target.score(SeqBatch(s.tokens, s.mask, s.context_ids if self.conditional else None,
                                          s.context_mask, self.tokenizer))

    def score(self, s: Samples, *, grad: bool = True) -> Scored:
        """Policy and prior log-probs of ``s`` (one paired pass), the target's ``log b``, ``log P``, ``log q``."""
        inp = model_inputs(s.context_ids, s.context_mask, s.tokens)
        with self._amp():
            # the policy's pass: replayed from its sampling pass when recorded (next_batch, then score: no weight
            # update in between, so the check that reads the weights' norms back is skipped)
            z_pi = s.replay(check=False) if grad and s.replay is not None else None
            lpi, la = self.dist.score(inp, s.tokens, s.mask, fused=self.fused, grad=grad, policy_logits=z_pi)
        ts = self.target_scores(s)
        lq = lpi.detach() if self.on_policy else s.logprob
        return Scored(policy_lp=lpi, prior_lp=la, proposal_lp=lq, log_P=la + ts.log_b, target=ts)

    def _group_logsumexp(self, terms: torch.Tensor, idx: torch.Tensor | None):
        """Per-context ``(logsumexp of terms, count)``, ``[C]`` float64 each."""
        C = len(self.contexts)
        terms = terms.detach().to(torch.float64)
        if idx is None:
            return torch.logsumexp(terms, 0).reshape(1), torch.full((1,), float(terms.shape[0]),
                                                                      dtype=torch.float64, device=terms.device)
        m = torch.full((C,), -math.inf, dtype=torch.float64, device=terms.device)
        m = m.scatter_reduce(0, idx, terms, "amax")
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = torch.zeros(C, dtype=torch.float64, device=terms.device).scatter_add(0, idx, torch.exp(terms - m_safe[idx]))
        n = torch.zeros(C, dtype=torch.float64, device=terms.device).scatter_add(0, idx, torch.ones_like(terms))
        return m_safe + torch.log(s), n

    def log_z(self) -> torch.Tensor:
        """The running estimate ``log Z(c)`` ``[C]`` float64 (-inf where no sample has had P > 0)."""
        return torch.where(self.z_count > 0, self.z_logsum - torch.log(self.z_count),
                           torch.full_like(self.z_logsum, -math.inf))

    def _per_sample_log_z(self, log_z: torch.Tensor, idx: torch.Tensor | None, n: int) -> torch.Tensor:
        lz = log_z.expand(n) if idx is None else log_z[idx]
        # no sample of this context has had P > 0 yet: its samples all have log P = -inf, any finite Z will do
        return torch.where(torch.isfinite(lz), lz, torch.zeros_like(lz)).to(torch.float32)

    def coefficients(self, sc: Scored, idx: torch.Tensor | None, *, update_log_z: bool = True):
        """The statistics that couple the batch: log Z(c) (running or from this batch, in log space), then the
        f-DPG coefficients with their baseline, normalised weights and ESS (:class:`fdpg.FDPGCoefficients`)."""
        lse, n = self._group_logsumexp(sc.log_P - sc.proposal_lp, idx)
        if self.cfg.z_estimate == "running":
            if update_log_z:
                self.z_logsum = torch.logaddexp(self.z_logsum, lse)
                self.z_count = self.z_count + n
            log_z = self.log_z()
        else:
            log_z = torch.where(n > 0, lse - torch.log(n), torch.full_like(lse, -math.inf))
        lz = self._per_sample_log_z(log_z, idx, sc.log_P.shape[0])
        # per-context log Z folded into the target: s = log pi - (log P - log Z(c)), with log_z = 0 in the op
        return fdpg.fdpg_coefficients(sc.policy_lp, sc.proposal_lp, sc.log_P - lz, self.divergence, log_z=0.0,
                                      baseline=self.cfg.baseline, validate=False)

    def batch_loss(self, s: Samples, *, update_log_z: bool = True):
        """Score ``s`` (policy with grad), then :meth:`coefficients`; returns ``(surrogate loss, coefficients,
        Scored)``, the loss being ``mean(coef * log pi)``."""
        sc = self.score(s, grad=True)
        idx = s.context_index if self.conditional else None
        if not self.dist.distributed:
            coef = self.coefficients(sc, idx, update_log_z=update_log_z)
            return coef.loss(sc.policy_lp), coef, sc
        # W ranks: every rank computes the statistics of the global batch from all ranks' per-sequence scalars
        lpi, la, lq, lP, gidx = self.dist.gather(sc.policy_lp.detach(), sc.prior_lp, sc.proposal_lp, sc.log_P, idx)
        coef = self.coefficients(Scored(lpi, la, lq, lP, None), gidx, update_log_z=update_log_z)
        # gradient: this rank's mean of c_i grad log pi (DDP and FSDP average over ranks: the global mean);
        # value: the global surrogate, as one process with the whole batch would log it
        local = (self.dist.local(coef.coef).to(sc.policy_lp.dtype) * sc.policy_lp).mean()
        return coef.loss(lpi) + (local - local.detach()), coef, sc

    # ------------------------------------------------------------------------------------------ the step

    def train_step(self) -> None:
        """One optimizer step over ``grad_accum`` batches from q."""
        cfg, t0 = self.cfg, time.perf_counter()
        for i in range(cfg.grad_accum):
            s = self.next_batch()                                   # 1. x ~ q, log q
            with self.dist.accumulate(sync=i == cfg.grad_accum - 1):  # DDP: all-reduce with the last batch
                loss, coef, sc = self.batch_loss(s)                 # 2-4. score, log Z, coefficients
                (loss / cfg.grad_accum).backward()                  # 5. one backward per batch
            w = self._win
            w["loss"] += loss.detach()
            w["ess"] += coef.ess.detach().float()
            w["tokens"] += s.mask.sum()
            w["batches"] += 1
        self._optimizer_step()
        if self.proposal is not None and self.step % cfg.proposal.every == 0:
            self._update_proposal()
        self._win["time"] += time.perf_counter() - t0

    def _optimizer_step(self) -> None:
        """Clip, AdamW and LR-schedule steps on the accumulated gradients; count the step and its samples."""
        cfg = self.cfg
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        n = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.samples_seen += n
        self._win["samples"] += n

    @torch.no_grad()
    def _update_proposal(self) -> None:
        """KL-adaptive proposal (Khalifa et al. 2021): q <- pi when KL(p||pi) < KL(p||q) on fresh samples of q."""
        n = self.cfg.proposal.n_samples
        s = self.draw(-(-n // self.dist.world) if n else self.cfg.batch_size, self.proposal)  # n: all ranks'
        sc = self.score(s, grad=False)
        idx = s.context_index if self.conditional else None
        # all ranks' samples: one decision
        log_P, lq, lpi, idx = self.dist.gather(sc.log_P, s.logprob, sc.policy_lp, idx)
        # the running log Z; with z_estimate: batch (no running sums) or for a context with no P > 0 sample yet,
        # the estimate from these samples of q
        lse, cnt = self._group_logsumexp(log_P - lq, idx)
        log_z = torch.where(torch.isfinite(self.log_z()), self.log_z(), lse - torch.log(cnt))
        log_p = log_P - self._per_sample_log_z(log_z, idx, log_P.shape[0])
        w = torch.exp(log_p - lq)                             # p/q
        zero = torch.zeros_like(w)
        kl_pi = torch.where(w > 0, w * (log_p - lpi), zero).mean()
        kl_q = torch.where(w > 0, w * (log_p - lq), zero).mean()
        self.last_kl_p_q = float(kl_q)
        if bool(kl_pi < kl_q):                                # the one host sync of the step
            self.proposal.load_state_dict(self.policy.state_dict())
            self.proposal_updates += 1
            self.last_kl_p_q = float(kl_pi)

    def _reset_window(self) -> None:
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self._win = {"loss": z(), "ess": z(), "tokens": torch.zeros((), dtype=torch.long, device=self.device),
                     "batches": 0, "samples": 0, "time": 0.0}

    # ------------------------------------------------------------------------------------------ before training

    @torch.no_grad()
    def _prior_samples(self, n: int, seed: int) -> Samples:
        """``n`` samples of the prior from generators of their own (the training streams stay untouched)."""
        sgen, dgen = torch.Generator(self.device).manual_seed(seed), torch.Generator().manual_seed(seed + 1)
        parts, left = [], n
        while left:
            k = min(left, max(self.cfg.batch_size, 256))
            parts.append(self.draw(k, self.prior, sample_gen=sgen, data_gen=dgen))
            left -= k
        return cat_samples(parts, self.pad)

    def _probe(self) -> None:
        """Stop before training when no probe sample of the prior (or of the offline set) has P(x) > 0."""
        if not self.target.constraints:
            return
        if self.offline is not None:
            n = min(len(self.offline), 4096)
            s = Samples(self.offline.tokens[:n].to(self.device), self.offline.mask[:n].to(self.device),
                        torch.zeros(self.offline.tokens[:n].shape, device=self.device),
                        self.offline.logprob[:n].to(self.device), *self._contexts_of(self.offline.context_index[:n]))
            where = f"{n} samples of the offline set {self.cfg.offline!r}"
        else:
            n = max(512, 4 * self.cfg.batch_size)
            s = self._prior_samples(n, self.cfg.seed + 7919)
            where = f"{n} samples of the prior"
        b = SeqBatch(s.tokens, s.mask, s.context_ids if self.conditional else None, s.context_mask, self.tokenizer)
        each = []
        for i, c in enumerate(self.target.constraints):
            try:
                each.append(c(b).to(torch.bool))
            except ValueError as e:     # a user function's bad output, found before any training
                raise ConfigError(f"target.constraints[{i}].function", f"on {where}: {e}") from None
        if bool(torch.stack(each).all(0).any()):
            return
        dead = [i for i, v in enumerate(each) if not bool(v.any())]
        if dead:
            keys = ", ".join(f"target.constraints[{i}]" for i in dead)
            raise ConfigError(keys.split(", ")[0], f"no sample of {where} satisfies {keys}, so P(x) = 0 for every "
                                                   "sample and training has nothing to learn from; is the "
                                                   "constraint satisfiable (token id, pattern)?")
        raise ConfigError("target.constraints", f"no sample of {where} satisfies all constraints together, so "
                                                "P(x) = 0 for every sample; the constraints may be incompatible")

    def _fit_lambdas(self) -> None:
        """Fit the distributional constraints' lambda on samples of the prior (MATH.md), and report it."""
        fit = self.cfg.target.lambda_fit
        s = self._prior_samples(fit.n_samples, self.cfg.seed + 104729)
        b = SeqBatch(s.tokens, s.mask, s.context_ids if self.conditional else None, s.context_mask, self.tokenizer)
        phi = self.target.feature_values(b)
        sat = self.target.satisfied(b)
        log_w = torch.where(sat, torch.zeros_like(phi[:, 0]), torch.full_like(phi[:, 0], -math.inf))
        lam, mom, ok = fit_lambdas(phi, log_w, self.target.mu_bar, lr=fit.lr, steps=fit.steps, tol=fit.tol)
        lam, mom, ok = self.dist.broadcast((lam.cpu(), mom.cpu(), ok))      # rank 0's fit on every rank
        self.target.set_lambdas(lam.cpu())
        self.fit_report = {"lambdas": lam.tolist(), "moments": mom.tolist(), "mu_bar": list(self.target.mu_bar),
                           "converged": ok, "n_samples": fit.n_samples}
        self.log(f"lambda fitted on {fit.n_samples} prior samples: lambda = {[round(v, 4) for v in lam.tolist()]}, "
                 f"moments = {[round(v, 4) for v in mom.tolist()]} (mu_bar = {self.target.mu_bar})"
                 + ("" if ok else f"; NOT converged to tol {fit.tol} in {fit.steps} steps (is mu_bar reachable?)"))

    @torch.no_grad()
    def _build_exact_cache(self):
        """Per context: log a(x) and the target's scores over the whole space (fixed during training)."""
        sp, cache = self.space, []
        for c in self.contexts:
            la = exact_mod.space_logprobs(self.prior, sp, context=c, autocast_dtype=self.amp_dtype)
            ctx = torch.tensor([c] * len(sp), device=self.device) if self.conditional else None
            ts = self.target.score(SeqBatch(sp.tokens.to(self.device), sp.mask.to(self.device), ctx, None,
                                            self.tokenizer))
            cache.append((la, ts))
        return cache

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Exact metrics over the listed space (averaged over contexts), or IS estimates from policy samples."""
        if self._exact_cache is not None:
            per = []
            for c, (la, ts) in zip(self.contexts, self._exact_cache):
                lpi = exact_mod.space_logprobs(self.policy, self.space, context=c, autocast_dtype=self.amp_dtype)
                per.append(exact_mod.exact_metrics(lpi, la, ts.log_b, satisfied=ts.satisfied, log_b_raw=ts.log_b_raw,
                                                   reward=ts.reward, features=ts.features))
            out = {k: (float(np.mean([p[k] for p in per])) if not isinstance(per[0][k], list)
                       else np.mean([p[k] for p in per], 0).tolist()) for k in per[0]}
            out["exact"] = True
            return out
        return self._estimate()

    @torch.no_grad()
    def _estimate(self) -> dict:
        """IS estimates from ``eval.n_samples`` fresh samples of the policy (q = pi), with the running log Z
        (or, for a context with no P > 0 sample yet, the estimate from these samples)."""
        n, parts = -(-self.cfg.eval.n_samples // self.dist.world), []   # per rank; the estimates use all ranks'
        while n > 0:
            k = min(n, self.cfg.batch_size)
            s = self.draw(k, self.policy)
            parts.append((s.context_index, self.score(s, grad=False)))
            n -= k
        idx = torch.cat([p[0] for p in parts]) if self.conditional else None
        lpi = torch.cat([p[1].policy_lp for p in parts])
        la = torch.cat([p[1].prior_lp for p in parts])
        lP = torch.cat([p[1].log_P for p in parts])
        ts = [p[1].target for p in parts]
        lpi, la, lP, idx = self.dist.gather(lpi, la, lP, idx)
        lse, cnt = self._group_logsumexp(lP - lpi, idx)
        log_z = torch.where(torch.isfinite(self.log_z()), self.log_z(), lse - torch.log(cnt))
        lz = self._per_sample_log_z(log_z, idx, lpi.shape[0])
        est = fdpg.divergence_estimates(lpi, lpi, lP - lz, la, log_z=0.0, validate=False)
        out = {k: float(v) for k, v in est.items() if k != "log_z"}
        finite = torch.isfinite(log_z)
        out["log_z"] = float(log_z[finite].mean()) if bool(finite.any()) else -math.inf
        g = self.dist.gather
        sat = g(torch.cat([t.satisfied for t in ts]).double())
        out["constraint_satisfaction"] = float(sat.mean())
        out["e_pi_b"] = float(g(torch.cat([t.log_b_raw for t in ts]).double()).exp().mean())
        if ts[0].reward is not None:
            out["reward"] = float(g(torch.cat([t.reward for t in ts]).double()).mean())
        if ts[0].features is not None:
            out["moments"] = g(torch.cat([t.features for t in ts]).double()).mean(0).tolist()
        out["exact"] = False
        return out

    def record(self) -> dict:
        """Evaluate and append one object to ``metrics.jsonl`` (the evaluation, then :meth:`_window_metrics` over
        the steps since the last record); returns it."""
        t0 = time.perf_counter()
        rec = {"step": self.step, "samples": self.samples_seen}
        rec.update(self.evaluate())
        rec.update(self._window_metrics())
        loss = rec.get("loss", rec.get("td_loss"))
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: the loss is {loss} at step {self.step} (the last checkpoint "
                                     f"is intact); lower lr, set grad_clip, or run with FDPG_VALIDATE=1 to find the "
                                     f"first non-finite input")
        self._elapsed += self._win["time"] + (time.perf_counter() - t0)
        rec["time"] = self._elapsed
        rec = {k: _finite_or_none(v) for k, v in rec.items()}
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        self._reset_window()
        return rec

    def _window_metrics(self) -> dict:
        """Training figures accumulated since the last record: loss, ESS, running log Z, throughput."""
        w = self._win
        b = max(1, w["batches"])
        finite = torch.isfinite(self.log_z())
        tokens = float(self.dist.sum(w["tokens"]))          # all ranks'
        return {
            "ess": float(w["ess"]) / b if w["batches"] else None,
            "loss": float(w["loss"]) / b if w["batches"] else None,
            "log_z_estimate": float(self.log_z()[finite].mean()) if bool(finite.any()) else None,
            "lr": self.scheduler.get_last_lr()[0],
            "proposal_updates": self.proposal_updates,
            "kl_p_q": self.last_kl_p_q,
            "samples_per_s": w["samples"] / w["time"] if w["time"] > 0 else None,
            "tokens_per_s": tokens / w["time"] if w["time"] > 0 else None,
        }

    # ------------------------------------------------------------------------------------------ the run

    def train(self) -> Path:
        """Run to ``cfg.steps`` (evaluating every ``eval.every`` steps and at the end, checkpointing every
        ``checkpoint_every``); returns the run directory. The final policy is saved in ``output_dir/policy``."""
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if getattr(self, "fit_report", None):
                _write_atomic(self.out / "target.json", json.dumps(self.fit_report, indent=1))
        space = "none" if self.space is None else f"{len(self.space) * len(self.contexts)} sequences, exact metrics"
        ranks = f" x {self.dist.world} ranks ({self.dist.strategy})" if self.dist.distributed else ""
        self.log(f"fdpg: {cfg.steps} steps of {self._method()}, batch {cfg.batch_size} x "
                 f"{cfg.grad_accum}{ranks}, {self.device}{' bf16' if self.amp_dtype else ''}; listed space: {space}; "
                 f"writing {self.out}")
        if self.resumed_from is None:
            if self.dist.is_main:
                (self.out / "metrics.jsonl").write_text("")
            self._show(self.record())
        else:
            self.log(f"resumed from {self.resumed_from} at step {self.step}")
        bar = self._bar()
        while self.step < cfg.steps:
            self.train_step()
            if bar is not None:
                bar.update(1)
            if self.step % cfg.eval.every == 0 or self.step == cfg.steps:
                rec = self.record()
                self._show(rec, bar)
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self._save_policy()
        return self.out

    def _method(self) -> str:
        """What the run trains with, for the opening log line."""
        cfg = self.cfg
        return (f"{self.divergence.name} (baseline {cfg.baseline}, "
                f"{'offline' if self.offline is not None else cfg.proposal.update})")

    def _bar(self):
        show = self.cfg.progress
        if show is False or not self.dist.is_main or (show == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.steps, initial=self.step, file=sys.stderr, dynamic_ncols=True, desc="fdpg")

    def _show(self, rec: dict, bar=None) -> None:
        if bar is not None:
            bar.set_postfix_str(self._postfix(rec))

    def _postfix(self, rec: dict) -> str:
        """The progress bar's figures."""
        return (f"KL(p|pi)={_fmt(rec['kl_p_pi'])} KL(pi|a)={_fmt(rec['kl_pi_a'])} "
                f"sat={_fmt(rec['constraint_satisfaction'])} {_fmt(rec['samples_per_s'])} samples/s")

    def _save_policy(self) -> None:
        full = self.dist.full_state_dict(self.policy)     # FSDP: gathered to rank 0 (every rank takes part)
        if self.dist.is_main:
            tmp = self.out / f".policy.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            with quiet():
                self.dist.save_pretrained(self.policy, tmp, full)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            final, old = self.out / "policy", self.out / f".policy.old-{os.getpid()}"
            if final.exists():  # move the previous policy aside, never delete it before the new one is in place
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()

    # ------------------------------------------------------------------------------------------ checkpoints

    def _rng_state(self) -> dict:
        st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "sample_gen": self.sample_gen.get_state(), "data_gen": self.data_gen.get_state()}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def _set_rng_state(self, st: dict) -> None:
        random.setstate(st["python"])
        np.random.set_state(st["numpy"])
        torch.set_rng_state(st["torch"])
        self.sample_gen.set_state(st["sample_gen"])
        self.data_gen.set_state(st["data_gen"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])

    def _check_finite(self) -> None:
        """Raise FloatingPointError where the loss since the last evaluation or a policy weight is not finite (one
        host sync): a diverged run writes no checkpoint over its good ones."""
        params = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in self.policy.parameters()]
        norms = torch.stack(torch._foreach_norm(params))                  # (FSDP: this rank's shards)
        loss = torch.as_tensor(self._win["loss"], device=norms.device)
        bad = self.dist.sum(torch.stack([~torch.isfinite(norms).all(), ~torch.isfinite(loss).all()]).float())
        if bool(bad.any()):
            what = "a policy weight" if bool(bad[0]) else "the loss"
            raise FloatingPointError(f"training diverged: {what} is not finite at step {self.step} (the last "
                                     f"checkpoint is intact; none was written); lower lr, set grad_clip, or run "
                                     f"with FDPG_VALIDATE=1 to find the first non-finite input")

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-NNNNNNNN`` atomically: a temporary directory renamed into place, then the
        ``latest`` pointer replaced; older checkpoints beyond ``keep_checkpoints`` are removed afterwards. Raises
        FloatingPointError instead where training diverged (:meth:`_check_finite`)."""
        self._check_finite()
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:08d}"
        # every rank: FSDP's full state dicts gathered to rank 0, and each rank's random streams; rank 0 writes
        par, models = self.dist, {"policy": self.policy, **self._checkpoint_models()}
        full = {key: par.full_state_dict(model) for key, model in models.items()}
        optimizer = par.optimizer_state_dict(self.policy, self.optimizer)
        rngs = par.all_gather_object(self._rng_state())
        # the window's token count is summed over ranks where it is reported: saved summed, restored to rank 0
        window = {**self._win, "tokens": par.sum(self._win["tokens"].clone())}
        if not par.is_main:
            par.barrier()
            return root / name
        tmp = root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with quiet():
            for key, model in models.items():
                par.save_pretrained(model, tmp / key, full[key])
        metrics = self.out / "metrics.jsonl"
        state = {
            "step": self.step, "samples": self.samples_seen, "proposal_updates": self.proposal_updates,
            "last_kl_p_q": self.last_kl_p_q, "z_logsum": self.z_logsum.cpu(), "z_count": self.z_count.cpu(),
            "lambdas": None if self.target.lambdas is None else self.target.lambdas.cpu(),
            "fit_report": getattr(self, "fit_report", None),
            "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
            "rng": rngs[0], "rng_ranks": rngs,
            "offline": None if self.offline is None else {"perm": self.offline_perm, "pos": self.offline_pos},
            "window": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in window.items()},
            "elapsed": self._elapsed,
            "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0,
            "config": to_dict(self.cfg),
        }
        with open(tmp / "trainer.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        (tmp / "COMPLETE").write_text(name + "\n")
        final = root / name
        if final.exists():  # the same step written again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", name + "\n")
        done = sorted(p for p in root.glob("step-*") if (p / "COMPLETE").exists())
        for old in done[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        par.barrier()
        return final

    def _checkpoint_models(self) -> dict:
        """The models saved in each checkpoint beside the policy, by directory name (subclasses add theirs)."""
        return {} if self.proposal is None else {"proposal": self.proposal}

    def _find_checkpoint(self) -> Path | None:
        root = self.out / "checkpoints"
        if not root.is_dir():
            return None
        latest = root / "latest"
        if latest.exists():
            p = root / latest.read_text().strip()
            if (p / "COMPLETE").exists():
                return p
        done = sorted(p for p in root.glob("step-*") if (p / "COMPLETE").exists())
        return done[-1] if done else None

    def _load_checkpoint(self, ckpt: Path) -> None:
        from transformers import AutoModelForCausalLM

        st = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
        old = st.get("config", {})
        diff = [k for k, v in to_dict(self.cfg).items() if k not in ("steps", "progress", "output_dir")
                and old.get(k) != v]
        changed = [k for k in diff if k not in _RESUME_MAY_CHANGE]
        if changed:
            raise ConfigError(changed[0], f"differs from the checkpoint's ({old.get(changed[0])!r}) in {ckpt}; "
                                          f"a resumed run must train the same problem (changed: {', '.join(changed)}); "
                                          f"only {', '.join(sorted(_RESUME_MAY_CHANGE))} and steps may change")
        if diff:
            self.log(f"resume: the configuration differs from the checkpoint's in {', '.join(diff)}")
        with quiet():
            pol = AutoModelForCausalLM.from_pretrained(ckpt / "policy", local_files_only=True)
            self.dist.load_full_state_dict(self.policy, pol.state_dict())
            for name, model in self._checkpoint_models().items():
                saved = AutoModelForCausalLM.from_pretrained(ckpt / name, local_files_only=True)
                self.dist.load_full_state_dict(model, saved.state_dict())
        self.dist.load_optimizer_state_dict(self.policy, self.optimizer, st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.step, self.samples_seen = st["step"], st["samples"]
        self.proposal_updates, self.last_kl_p_q = st["proposal_updates"], st["last_kl_p_q"]
        self.z_logsum, self.z_count = st["z_logsum"].to(self.device), st["z_count"].to(self.device)
        if st["lambdas"] is not None:
            self.target.set_lambdas(st["lambdas"])
        if st.get("fit_report"):
            self.fit_report = st["fit_report"]
        rngs = st.get("rng_ranks") or [st["rng"]]
        self._set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0])
        if len(rngs) != self.dist.world:        # saved by another number of ranks: fresh per-rank sampling streams
            self.log(f"resume: the checkpoint was written by {len(rngs)} rank(s), this run has {self.dist.world}; "
                     "sampling streams are reseeded")
            self.sample_gen.manual_seed(distributed.rank_seed(self.cfg.seed + 7 * self.step))
        if st["offline"] is not None:
            self.offline_perm, self.offline_pos = st["offline"]["perm"], st["offline"]["pos"]
        self._win = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in st["window"].items()}
        if not self.dist.is_main:
            self._win["tokens"] = torch.zeros_like(self._win["tokens"])   # (saved summed over the ranks)
        self._elapsed = st["elapsed"]
        metrics = self.out / "metrics.jsonl"
        if self.dist.is_main and metrics.exists():
            with open(metrics, "r+b") as f:
                f.truncate(st["metrics_bytes"])  # drop evaluations logged after this checkpoint


def train(config, *, resume: bool = False, overrides=(), log=None) -> Path:
    """Train from a :class:`Config`, a mapping, or a YAML path (with ``key=value`` overrides); returns the run
    directory (``output_dir``), which holds metrics.jsonl, config.yaml, checkpoints/ and the final policy/."""
    cfg = resolve(config, overrides)
    if cfg.algorithm != "fdpg":
        from .qtrainer import QTrainer  # psi_learning, q_learning

        return QTrainer(cfg, resume=resume, log=log).train()
    return Trainer(cfg, resume=resume, log=log).train()
