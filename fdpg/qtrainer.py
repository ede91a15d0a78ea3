"""KL-control the reinforcement-learning way: Psi-learning and Q-learning from a fixed batch (Jaques et al. 2019).

``algorithm: psi_learning | q_learning`` (MATH.md, "KL-control by Q-learning from a fixed batch"). The policy LM's
logits are the Q-values, ``Q(s, .) = z(s)`` and ``pi = softmax(Q)``; the Q-network starts as the prior (pi = a).
One step (:meth:`QTrainer.train_step`):

1. a batch of the offline file (tokens, rewards; the same shuffled stream as f-DPG's offline mode);
2. one paired pass over policy and prior (prior in inference mode, never with dropout):
   ``Q(s_t, a_t) = log pi(a_t|s_t) + logsumexp z(s_t)`` (differentiable), ``log a(a_t|s_t)``, and for
   ``kl_reward: exact`` the exact per-token ``KL(pi || a)``, all from :func:`fdpg.paired_token_stats` (or the fused
   output layer, :func:`fdpg.paired_linear_token_logprobs`), so no B x T x V tensor beyond the logits exists;
3. the bootstrap ``V'(s_{t+1})`` from the target network: ``logsumexp`` (psi) or ``max`` (q) of its logits, the
   minimum over ``mc_dropout`` passes with dropout on (the Monte-Carlo lower bound), read from the same op;
4. regression targets (:func:`fdpg.qlearning.psi_targets` / :func:`~fdpg.qlearning.q_targets`) with the sequence
   reward paid at the last token, Huber or squared TD loss over the unmasked tokens, one backward, clipping, AdamW;
5. Polyak update of the target network, ``theta' <- tau theta + (1 - tau) theta'``.

Everything else (model loading, the offline reader and its checks, exact evaluation against the reward-tilted
target ``p_beta``, logging, atomic checkpoints with exact resume, the final ``policy/``) is :class:`Trainer`'s.

    >>> from fdpg.qtrainer import sample_batch
    >>> from fdpg.trainer import train
    >>> sample_batch("examples/tiny_psi.yaml", 4096, "runs/batch.jsonl")        # what `fdpg sample` does
    >>> run_dir = train("examples/tiny_psi.yaml", overrides=["offline=runs/batch.jsonl"])
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fdpg
from . import qlearning as Q
from .config import Q_ALGORITHMS, Config, ConfigError
from .models import _logits, _output_operands, model_inputs
from .sampling import Samples
from .targets import SeqBatch
from .trainer import Trainer, _fmt

__all__ = ["QTrainer", "TDTerms", "sample_batch"]


@dataclass
class TDTerms:
    """One batch's TD regression: loss (scalar, with grad), q_taken ``[B, T]`` (``Q(s_t, a_t)``, with grad),
    targets ``[B, T]`` (no grad), mask ``[B, T]`` bool, and the mean Q of the actions taken (no grad)."""

    loss: torch.Tensor
    q_taken: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    q_mean: torch.Tensor


class QTrainer(Trainer):
    """:class:`~fdpg.trainer.Trainer` for ``algorithm: psi_learning | q_learning`` (see the module docstring).

    Before training it stops (:class:`~fdpg.config.ConfigError`) on a bad offline file (naming the file and line)
    and when no reward exists: the file's ``reward`` column is used where present, else ``target.reward`` computed
    on the batch once. The exact metrics measure against the config's target ``p_beta(x) ∝ a(x) exp(R(x)/beta)``.
    The file's ``logprob`` column is optional (Q-learning needs no importance weights).
    """

    OFFLINE_LOGPROB = False

    def __init__(self, config: Config, *, resume: bool = False, log=None):
        if config.algorithm not in Q_ALGORITHMS:
            raise ConfigError("algorithm", f"QTrainer runs psi_learning or q_learning, got {config.algorithm!r}")
        self.psi = config.algorithm == "psi_learning"
        self.target_net = None  # built from the policy (or restored) when the checkpoint models are first asked for
        super().__init__(config, resume=resume, log=log)
        if self.dist.distributed:
            raise ConfigError("distributed", f"{config.algorithm} runs in one process (its batches and target "
                                             "network are not sharded); launch it without torchrun")
        self._checkpoint_models()
        if config.mc_dropout > 1 and not _has_dropout(self.target_net):
            raise ConfigError("mc_dropout", f"{config.mc_dropout} Monte-Carlo passes need dropout in the model, and "
                                            "it has none (a tiny prior takes prior.tiny.dropout, e.g. 0.1)")
        self.rewards = self._offline_rewards()
        kl = config.kl_reward
        self.kl_kind = "none" if self.psi or kl is None else kl.kind
        self.kl_weight = 0.0 if self.kl_kind == "none" else (config.target.beta if kl.weight is None else kl.weight)

    # ------------------------------------------------------------------------------------------ setup

    def _checkpoint_models(self) -> dict:
        if self.target_net is None:
            self.target_net = copy.deepcopy(self.policy).requires_grad_(False).eval()
        return {**super()._checkpoint_models(), "target": self.target_net}

    def _method(self) -> str:
        cfg = self.cfg
        mc = f"MC dropout x{cfg.mc_dropout}" if cfg.mc_dropout > 1 else "no MC dropout"
        kl = "" if self.psi else f", KL reward {self.kl_kind}" + (f" x{self.kl_weight:g}" if self.kl_weight else "")
        return (f"{cfg.algorithm} (gamma {cfg.gamma:g}, tau {cfg.target_update:g}, {mc}, {cfg.loss} loss{kl}, "
                f"offline batch of {len(self.offline)})")

    @torch.no_grad()
    def _offline_rewards(self) -> torch.Tensor:
        """Rewards ``[N]`` float32 of the offline rows: the file's, else ``target.reward`` on the batch."""
        data, path = self.offline, self.cfg.offline
        if self.target.reward is None and data.reward is None:
            raise ConfigError("target.reward", f"{self.cfg.algorithm} needs a reward: {path}, line 1 has no 'reward' "
                                               "(nor has any line) and the configuration sets no target.reward")
        if self.target.reward is None:
            self.log(f"rewards from {path}; no target.reward, so the exact metrics measure against the prior "
                     "(p = a), not the target of these rewards")
            return data.reward
        computed = []
        for i in range(0, len(data), 4096):
            idx = torch.arange(i, min(i + 4096, len(data)))
            ids, mask, _ = self._contexts_of(data.context_index[idx])
            b = SeqBatch(data.tokens[idx].to(self.device), data.mask[idx].to(self.device),
                         ids if self.conditional else None, mask, self.tokenizer)
            try:
                computed.append(self.target.reward(b).float().cpu())
            except ValueError as e:       # a user function's bad output, on the offline rows
                raise ConfigError("target.reward", f"on {path}, rows {i + 1}..: {e}") from None
        computed = torch.cat(computed)
        if not bool(torch.isfinite(computed).all()):
            row = int((~torch.isfinite(computed)).nonzero()[0])
            raise ConfigError("target.reward", f"{path}: not finite ({float(computed[row])}) for sequence {row + 1} "
                                               f"({data.tokens[row][data.mask[row]].tolist()})")
        if data.reward is None:
            return computed
        diff = (data.reward - computed).abs()
        if float(diff.max()) > 1e-4 * (1 + float(computed.abs().max())):
            self.log(f"the rewards of {path} differ from target.reward on {int((diff > 1e-4).sum())} of "
                     f"{len(data)} rows (max |difference| {float(diff.max()):.4g}): training uses the file's, the "
                     "exact metrics measure against target.reward's p_beta")
        return data.reward

    # ------------------------------------------------------------------------------------------ batches

    def next_batch(self) -> tuple[Samples, torch.Tensor]:
        """The next batch of the fixed set: ``(Samples, rewards [B] float32)``."""
        idx = self._offline_indices(self.cfg.batch_size)
        return self._offline_samples(idx), self.rewards[idx].to(self.device)

    # ------------------------------------------------------------------------------------------ the TD step

    def _paired(self, inp, tokens: torch.Tensor, sl: slice, kl: bool):
        """``(policy_lp, policy_lse, prior_lp, kl or None)`` ``[B, T]`` float32: policy fields with grad."""
        if self.fused and not kl:
            h_pi, wt_pi, b_pi = _output_operands(self.policy, inp, sl)
            with torch.inference_mode():
                h_a, wt_a, b_a = _output_operands(self.prior, inp, sl)
            o = fdpg.paired_linear_token_logprobs(h_pi, wt_pi, h_a, wt_a, tokens, policy_bias=b_pi, prior_bias=b_a,
                                                  validate=False, return_lse=True)
            return o.policy_lp, o.policy_lse, o.prior_lp, None
        z_pi = _logits(self.policy, inp, sl)
        with torch.no_grad():  # not inference_mode: the exact KL's backward keeps the prior logits
            z_a = _logits(self.prior, inp, sl)
        st = fdpg.paired_token_stats(z_pi, z_a, tokens, kl=kl, validate=False, inplace_backward=True)
        return st.policy_lp, st.policy_lse, st.prior_lp, st.kl

    @torch.no_grad()
    def bootstrap(self, inp, tokens: torch.Tensor, sl: slice) -> torch.Tensor:
        """``V'(s_t)`` ``[B, T]`` float32 of the target network at every position: ``logsumexp`` (psi) or ``max``
        (q) of its Q-values, the minimum over ``mc_dropout`` passes with dropout on (one pass without it when
        ``mc_dropout`` is 0 or 1). Only per-position figures come back: the fused output layer never forms the
        logits, and from logits the op keeps no B x T x V tensor."""
        net, M = self.target_net, self.cfg.mc_dropout
        passes = M if M > 1 else 1
        best = None
        net.train(M > 1)
        try:
            for _ in range(passes):
                with self._amp():
                    if self.fused:
                        h, wt, b = _output_operands(net, inp, sl)
                        o = fdpg.linear_token_logprobs(h, wt, tokens, bias=b, validate=False, return_lse=True)
                        v = o.lse if self.psi else o.max
                    else:
                        st = fdpg.paired_token_stats(_logits(net, inp, sl), None, tokens, validate=False)
                        v = st.policy_lse if self.psi else st.policy_max
                v = v.float()
                best = v if best is None else torch.minimum(best, v)
        finally:
            net.eval()
        return best

    def td_terms(self, s: Samples, reward: torch.Tensor) -> TDTerms:
        """The TD regression of one batch (MATH.md): ``Q(s_t, a_t)`` against the fixed targets ``y_t``."""
        cfg = self.cfg
        inp = model_inputs(s.context_ids, s.context_mask, s.tokens)
        T = s.tokens.shape[1]
        sl = slice(inp.P - 1, inp.P + T - 1)  # the logits at position i score token i + 1
        with self._amp():
            policy_lp, policy_lse, prior_lp, kl = self._paired(inp, s.tokens, sl, self.kl_kind == "exact")
        next_v = Q.shift_next(self.bootstrap(inp, s.tokens, sl))
        done = Q.last_token(s.mask)
        r = Q.token_rewards(reward, s.mask)
        prior_lp = prior_lp.float()
        if self.psi:
            y = Q.psi_targets(prior_lp, next_v, r, done, beta=cfg.target.beta, gamma=cfg.gamma)
        else:
            k = None
            if self.kl_kind == "sampled":
                k = prior_lp - policy_lp.detach().float()
            elif self.kl_kind == "exact":
                k = -kl.detach().float()
            y = Q.q_targets(r, k, next_v, done, weight=self.kl_weight, gamma=cfg.gamma)
        q_taken = policy_lp.float() + policy_lse.float()  # = z[a_t]; its gradient is onehot(a_t)
        loss = Q.td_loss(q_taken, y, s.mask, cfg.loss)
        m = s.mask
        q_mean = torch.where(m, q_taken.detach(), torch.zeros((), device=m.device)).sum() / m.sum().clamp_min(1)
        return TDTerms(loss, q_taken, y, m, q_mean)

    def train_step(self) -> None:
        """One optimizer step over ``grad_accum`` batches of the fixed set, then the Polyak update."""
        cfg, t0 = self.cfg, time.perf_counter()
        for _ in range(cfg.grad_accum):
            s, reward = self.next_batch()
            terms = self.td_terms(s, reward)
            (terms.loss / cfg.grad_accum).backward()
            w = self._win
            w["loss"] += terms.loss.detach()
            w["q"] += terms.q_mean
            w["tokens"] += s.mask.sum()
            w["batches"] += 1
        self._optimizer_step()
        self.update_target()
        self._win["time"] += time.perf_counter() - t0

    @torch.no_grad()
    def update_target(self) -> None:
        """``theta' <- tau theta + (1 - tau) theta'`` (tau = ``target_update``)."""
        src = list(self.policy.parameters())
        dst = list(self.target_net.parameters())
        torch._foreach_lerp_(dst, [p.detach().to(d.dtype) for p, d in zip(src, dst)], self.cfg.target_update)

    def _reset_window(self) -> None:
        super()._reset_window()
        self._win["q"] = torch.zeros((), device=self.device)

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def initial_value(self) -> float:
        """Mean over the contexts of ``V(s_0)``: ``logsumexp`` (psi; log Z at the fixed point) or ``max`` (q) of
        the Q-network's values at the first continuation position."""
        vals = []
        for i in range(0, len(self.contexts), 256):
            idx = torch.arange(i, min(i + 256, len(self.contexts)))
            ids, mask, _ = self._contexts_of(idx)
            inp = model_inputs(ids, mask, ids[:, :0])
            with self._amp():
                z = _logits(self.policy, inp, slice(-1, None))[:, -1].float()
            vals.append(torch.logsumexp(z, -1) if self.psi else z.amax(-1))
        return float(torch.cat(vals).double().mean())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """:meth:`Trainer.evaluate` (exact over the listed space, or estimates), plus ``v0`` and, exactly,
        ``v0_minus_log_z`` (psi_learning: the over-estimation of V(s_0) against its fixed point log Z)."""
        m = super().evaluate()
        m["v0"] = self.initial_value()
        if self.psi and m.get("exact"):
            m["v0_minus_log_z"] = m["v0"] - m["log_z"]
        return m

    def _window_metrics(self) -> dict:
        """``td_loss`` and ``q_mean`` (mean Q of the actions taken) over the steps since the last record, the
        learning rate and the throughput."""
        w = self._win
        b = w["batches"]
        return {
            "td_loss": float(w["loss"]) / b if b else None,
            "q_mean": float(w["q"]) / b if b else None,
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": w["samples"] / w["time"] if w["time"] > 0 else None,
            "tokens_per_s": float(w["tokens"]) / w["time"] if w["time"] > 0 else None,
        }

    def _postfix(self, rec: dict) -> str:
        return (f"TD={_fmt(rec['td_loss'])} KL(p|pi)={_fmt(rec.get('kl_p_pi'))} "
                f"V0={_fmt(rec['v0'])} logZ={_fmt(rec.get('log_z'))}")


def _has_dropout(model) -> bool:
    """Whether train mode makes the model random: a dropout module with p > 0, or an attention dropout rate."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    c = model.config
    return any(isinstance(getattr(c, k, None), (int, float)) and getattr(c, k) > 0
               for k in ("attention_dropout", "attn_pdrop", "hidden_dropout", "dropout"))


# ---------------------------------------------------------------------------------------------- fdpg sample

@torch.no_grad()
def sample_batch(config, n: int, out, *, model: str | None = None, overrides=(), seed: int | None = None,
                 log=None) -> Path:
    """Write ``n`` sequences drawn from the config's prior (or the local model at ``model``) to ``out``, one JSON
    object a line: ``tokens`` (EOS included where it ended at one), ``logprob`` (log q(x) under the model that
    drew it), ``reward`` (the config's ``target.reward``, when it has one) and ``context`` (with prompts).

    ``config``: a YAML path, a mapping or a :class:`Config` (its ``offline`` file is not read). The contexts are the
    config's prompts, drawn uniformly, or none. Returns the path written.
    """
    from .config import resolve
    from .data import load_prompts
    from .models import build_tiny, load_model, special_tokens, vocab_size
    from .sampling import left_pad, sample
    from .targets import build_target

    cfg = resolve(config, overrides, for_sampling=True)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("--n", f"expected a number of sequences >= 1, got {n!r}")
    log = log or (lambda msg: None)
    device = Trainer._device(cfg.device)
    if model is not None:
        net, tokenizer = load_model(model, key="--model")
    elif cfg.prior.tiny is not None:
        try:
            net, tokenizer = build_tiny(**dataclasses.asdict(cfg.prior.tiny)), None
        except ConfigError as e:
            raise ConfigError(f"prior.tiny.{e.key}", str(e).split(": ", 1)[1]) from None
    else:
        net, tokenizer = load_model(cfg.prior.path, key="prior")
    if cfg.tokenizer is not None:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer) or tokenizer
    net = net.to(device).float().eval()
    V, (eos, bos) = vocab_size(net), special_tokens(net, "--model" if model is not None else "prior",
                                                    eos=cfg.eos_token_id)
    target = build_target(cfg.target, tokenizer=tokenizer, vocab_size=V, search=[Path.cwd()])
    if target.features and target.lambdas is None:
        target.features = []  # the reward alone is written; lambdas are not needed
    contexts = load_prompts(cfg.prompts, tokenizer=tokenizer, vocab_size=V) if cfg.prompts is not None else None
    pad = 0 if eos is None else eos
    gen = torch.Generator(device).manual_seed(cfg.seed if seed is None else seed)
    pick = torch.Generator().manual_seed((cfg.seed if seed is None else seed) + 1)
    out = Path(out)
    if out.is_dir():
        raise ConfigError("--out", f"{str(out)!r} is a directory; expected the path of the JSONL file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("--out", f"cannot create the directory of {str(out)!r}: {e.strerror}") from None
    tmp = out.with_name(f".{out.name}.tmp")
    written = 0
    with open(tmp, "w") as f:
        while written < n:
            k = min(n - written, max(cfg.batch_size, 256))
            ctx = ids = cmask = None
            if contexts is not None:
                ci = torch.randint(len(contexts), (k,), generator=pick)
                ctx = [contexts[i] for i in ci.tolist()]
                ids, cmask = left_pad(ctx, pad)
                ids, cmask = ids.to(device), None if cmask is None else cmask.to(device)
            s = sample(net, k, cfg.max_length, eos_token_id=eos, bos_token_id=bos, context_ids=ids,
                       context_mask=cmask, generator=gen)
            reward = None
            if target.reward is not None:
                reward = target.reward(SeqBatch(s.tokens, s.mask, ids, cmask, tokenizer)).float().tolist()
            lens = s.mask.sum(1).tolist()
            for j, (row, L, lp) in enumerate(zip(s.tokens.tolist(), lens, s.logprob.tolist())):
                rec = {"tokens": row[:L], "logprob": lp}
                if reward is not None:
                    if not math.isfinite(reward[j]):
                        raise ValueError(f"target.reward: not finite ({reward[j]}) for the sequence {row[:L]}")
                    rec["reward"] = reward[j]
                if ctx is not None:
                    rec["context"] = ctx[j]
                f.write(json.dumps(rec) + "\n")
            written += k
    tmp.replace(out)
    log(f"wrote {n} sequences of {'the prior' if model is None else model} to {out}")
    return out
