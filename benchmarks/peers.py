"""Peers of fdpg's trainer for ``benchmarks/e2e.py``: the benchmark shapes, the models built from them, a
per-phase timer, and two training loops fdpg is measured against on the same model and batch.

- :class:`Straightforward`: the loop users write today. Hugging Face ``generate`` (``do_sample=True, top_k=0,
  top_p=1.0``, HF's default KV cache), full-logit ``log_softmax`` + ``gather`` for the policy (with grad) and the
  prior (no grad) in separate forward passes, the f-DPG loss in eager torch (running log Z by logsumexp, weights
  pi/q, f' of the divergence, self-normalised batch baseline, coefficients, surrogate), backward, gradient
  clipping, AdamW.
- :class:`Disco`: NAVER disco's ``FDPGTuner`` with its forward-KL loss (``KLLoss``), a pointwise constraint
  (``BooleanScorer``, "the decoded text contains token 3"), the same models wrapped in ``LMDistribution``. disco is
  imported from ``PYTHONPATH`` (e.g. ``PYTHONPATH=/work/disco-src``); it is never copied here. Without it the peer
  raises :class:`PeerUnavailable` ("disco not available").

Every peer has ``step(phases) -> tokens``: one optimizer step over ``shape.batch`` samples, its time split into the
phases of :data:`PHASES` by ``phases`` (a :class:`Phases`), returning the number of generated tokens (up to and
including each sequence's first EOS) as an int or a 0-d tensor.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import torch

__all__ = ["Shape", "SHAPES", "PHASES", "Phases", "PeerUnavailable", "build_model", "make_tokenizer",
           "completion_mask", "Straightforward", "Disco", "PEERS"]

# The phases of one step, in order; "other" is the step's time not inside any of them.
PHASES = ("sampling", "policy scoring", "prior scoring", "coefficients", "backward", "optimizer", "other")


# ---- shapes and models --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A benchmark configuration: the model (``family`` gpt2 or llama), the batch and the target.

    ``dtype`` is the weights' storage dtype ("float32" or "bfloat16"); on a GPU every peer also runs its forward
    passes under bf16 autocast. The target is one pointwise constraint: "contains ``constraint_token``" (negated
    when ``negate``: with a 50k vocabulary a random model almost never emits one given token).
    """

    name: str
    family: str
    vocab: int
    d: int
    n_layer: int
    n_head: int
    length: int
    batch: int
    n_kv_head: int | None = None
    d_ff: int | None = None
    n_positions: int = 128
    dtype: str = "float32"
    eos: int = 0
    bos: int = 0
    constraint_token: int = 3
    negate: bool = False
    gpu_only: bool = False
    default_device: str = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d

    @property
    def head_dim(self) -> int:
        return self.d // self.n_head

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def describe(self) -> str:
        kv = f", {self.kv_heads} kv heads" if self.kv_heads != self.n_head else ""
        return (f"{self.family}, vocab {self.vocab}, d {self.d}, {self.n_layer} layers, {self.n_head} heads{kv}, "
                f"d_ff {self.ff}, length {self.length}, batch {self.batch}, weights {self.dtype}, "
                f"target: x {'does not contain' if self.negate else 'contains'} token {self.constraint_token}")


SHAPES = {
    "tiny-cpu": Shape("tiny-cpu", "gpt2", vocab=512, d=128, n_layer=4, n_head=8, length=32, batch=64,
                      default_device="cpu"),
    # the same size in Llama's form (RMSNorm, RoPE, SwiGLU, grouped-query attention): fdpg's Llama step on the CPU
    # (the native loop's step_llama, the native forward's Llama layers)
    "tiny-cpu-llama": Shape("tiny-cpu-llama", "llama", vocab=512, d=128, n_layer=4, n_head=8, n_kv_head=2, d_ff=352,
                            length=32, batch=64, default_device="cpu"),
    "gpt2-small": Shape("gpt2-small", "gpt2", vocab=50257, d=768, n_layer=12, n_head=12, length=64, batch=32,
                        n_positions=1024, eos=50256, bos=50256, negate=True),
    "llama-1b": Shape("llama-1b", "llama", vocab=128256, d=2048, n_layer=16, n_head=32, n_kv_head=8, d_ff=8192,
                      length=128, batch=64, n_positions=2048, dtype="bfloat16", eos=128001, bos=128000,
                      negate=True, gpu_only=True),
}


def with_overrides(shape: Shape, *, length: int | None = None, batch: int | None = None) -> Shape:
    """``shape`` with another length or batch; the length must fit the model's positions."""
    if length is not None:
        if not 1 <= length < shape.n_positions:
            raise ValueError(f"--length: expected 1 <= length < {shape.n_positions} for {shape.name}, got {length}")
        shape = replace(shape, length=length)
    if batch is not None:
        if batch < 1:
            raise ValueError(f"--batch: expected a positive batch size, got {batch}")
        shape = replace(shape, batch=batch)
    return shape


def build_model(shape: Shape, seed: int = 0):
    """A randomly initialised causal LM of ``shape`` (eval mode, dropout off, on the CPU, weights in
    ``shape.dtype``); the same weights for the same seed. GPT-2 models match ``fdpg.models.build_tiny``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if shape.family == "gpt2":
            cfg = GPT2Config(vocab_size=shape.vocab, n_positions=shape.n_positions, n_embd=shape.d,
                             n_layer=shape.n_layer, n_head=shape.n_head, bos_token_id=shape.bos,
                             eos_token_id=shape.eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             initializer_range=0.02, activation_function="gelu_pytorch_tanh")
            model = GPT2LMHeadModel(cfg)
        elif shape.family == "llama":
            cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.d, intermediate_size=shape.ff,
                              num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
                              num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.n_positions,
                              rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=shape.bos,
                              eos_token_id=shape.eos, attention_dropout=0.0)
            model = LlamaForCausalLM(cfg)
        else:
            raise ValueError(f"family: expected gpt2 or llama, got {shape.family!r}")
    return model.to(shape.torch_dtype).eval()


def make_tokenizer(shape: Shape):
    """A word-level tokenizer over the model's vocabulary: token ``i`` is the word ``t{i}``, the BOS/EOS token is
    ``<eos>`` (so decoded samples read "t17 t3 t250"). disco needs a tokenizer; nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {shape.eos: "<eos>"}
    if shape.bos != shape.eos:
        special[shape.bos] = "<bos>"
    vocab = {special.get(i, f"t{i}"): i for i in range(shape.vocab)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=special[shape.bos], eos_token="<eos>",
                                   pad_token="<eos>", unk_token="<eos>")


def completion_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """``[B, T]`` bool: each position up to and including the first EOS (by position, never by token id)."""
    is_eos = tokens == eos
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0


# ---- phase timer ----------------------------------------------------------------------------------------------

class Phases:
    """Exclusive wall-clock time per phase: ``with phases("sampling"): ...`` (or ``begin``/``end``); a phase entered
    inside another is subtracted from the outer one. With ``sync`` (CUDA), the device is synchronised at every
    phase boundary so that time lands in the phase that queued the work; ``enabled=False`` makes every phase a
    no-op (the step is then timed as a whole)."""

    def __init__(self, *, sync: bool = False, enabled: bool = True):
        self.sync = sync and torch.cuda.is_available()
        self.enabled = enabled
        self.t: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, time spent in inner phases]

    def _sync(self):
        if self.sync:
            torch.cuda.synchronize()

    def begin(self, name: str) -> None:
        if self.enabled:
            self._sync()
            self._stack.append([name, time.perf_counter(), 0.0])

    def end(self) -> None:
        if self.enabled:
            self._sync()
            name, t0, inner = self._stack.pop()
            dt = time.perf_counter() - t0
            self.t[name] += dt - inner
            if self._stack:
                self._stack[-1][2] += dt

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def time_optimizer(self, opt: torch.optim.Optimizer, name: str = "optimizer", current=None):
        """Time ``opt.step()`` as ``name`` with the optimizer's step hooks (``current``: a function returning the
        Phases to use, for hooks that outlive this object)."""
        get = current or (lambda: self)
        opt.register_step_pre_hook(lambda *a: get().begin(name))
        opt.register_step_post_hook(lambda *a: get().end())

    def reset(self):
        self.t.clear()


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here (a missing package, no GPU); the message says why."""


def _amp(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- the straightforward loop ---------------------------------------------------------------------------------

# f'(s) with s = log(pi/p), as a user writes it (MATH.md's table); inf-safe where P(x) = 0 (s = +inf).
F_PRIME = {
    "forward_kl": lambda s: -torch.exp(-s),
    "reverse_kl": lambda s: s + 1.0,
    "tv": lambda s: 0.5 * torch.sign(s),
    "js": lambda s: 0.5 * (math.log(2.0) - torch.nn.functional.softplus(-s)),
}


class Straightforward:
    """The f-DPG step as users write it with Hugging Face and eager torch (on-policy: q = pi)."""

    name = "straightforward"

    def __init__(self, shape: Shape, device: torch.device, *, divergence: str = "forward_kl", lr: float = 1e-4,
                 grad_clip: float | None = 1.0, seed: int = 0):
        self.shape, self.device = shape, torch.device(device)
        self.prior = build_model(shape, seed).to(self.device).requires_grad_(False)
        self.policy = copy.deepcopy(self.prior).requires_grad_(True)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=lr)
        self.fprime = F_PRIME[divergence]
        self.grad_clip = grad_clip
        self.z_logsum = torch.full((), -math.inf, dtype=torch.float64, device=self.device)
        self.z_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def _token_logprobs(self, model, ids: torch.Tensor) -> torch.Tensor:
        with _amp(self.device):
            logits = model(input_ids=ids).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    def step(self, ph: Phases):
        sh, dev = self.shape, self.device
        B = sh.batch
        with ph("sampling"), torch.no_grad(), _amp(dev):
            bos = torch.full((B, 1), sh.bos, dtype=torch.long, device=dev)
            ids = self.policy.generate(input_ids=bos, attention_mask=torch.ones_like(bos), do_sample=True, top_k=0,
                                       top_p=1.0, temperature=1.0, max_new_tokens=sh.length, eos_token_id=sh.eos,
                                       pad_token_id=sh.eos)
        tokens = ids[:, 1:]
        mask = completion_mask(tokens, sh.eos)
        with ph("policy scoring"):
            lpi = (self._token_logprobs(self.policy, ids) * mask).sum(-1)
        with ph("prior scoring"), torch.no_grad():        # the prior, and the target's b(x)
            la = (self._token_logprobs(self.prior, ids) * mask).sum(-1)
            hit = ((tokens == sh.constraint_token) & mask).any(-1)
            ok = ~hit if sh.negate else hit
            log_b = torch.where(ok, 0.0, -math.inf)
        with ph("coefficients"):
            lq = lpi.detach()                                   # on-policy: q = pi
            log_P = la + log_b
            terms = (log_P - lq).double()
            self.z_logsum = torch.logaddexp(self.z_logsum, torch.logsumexp(terms, 0))
            self.z_count = self.z_count + B
            log_z = self.z_logsum - torch.log(self.z_count)
            log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z)).float()
            s = lpi.detach() - (log_P - log_z)                  # log(pi/p); +inf where P(x) = 0
            w = torch.exp(lpi.detach() - lq)                    # pi/q
            fp = self.fprime(s)
            baseline = (w * fp).sum() / w.sum()
            coef = w * (fp - baseline)
            loss = (coef * lpi).mean()
        with ph("backward"):
            loss.backward()
        with ph("optimizer"):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return mask.sum()


# ---- NAVER disco ------------------------------------------------------------------------------------------

class Disco:
    """disco's ``FDPGTuner`` (forward KL: ``KLLoss`` with its moving-average baseline), online (q = pi), one
    context (the BOS token), ``n_samples_per_context = sampling_size = scoring_size = batch``.

    Phases are attributed by wrapping disco's methods: sampling = ``policy.sample_batch`` (HF generate and text
    decoding), policy scoring = the policy's ``log_score_batch`` calls (disco scores the samples under the proposal
    without grad, then under the policy with grad: both are the policy here), prior scoring = the target's (prior x
    constraint), coefficients = the loss functor, backward =
    the rest of ``_compute_gradient_batched``, optimizer = ``optimizer.step``; "other" holds disco's bookkeeping
    (log Z, divergence estimates, per-sample ``.item()`` metrics, scheduler, zero_grad).

    Two things at disco HEAD (1.1.2) need a workaround: ``FDPGTuner`` passes ``context_distribution`` where
    ``Tuner`` reads ``context_dataset`` (so it is given ``context_dataset=[bos]``), and ``sample_batch`` does not
    replace an empty context by BOS (so the context is the BOS token's text).
    """

    name = "disco"

    def __init__(self, shape: Shape, device: torch.device, *, lr: float = 1e-4, seed: int = 0):
        try:
            from disco.distributions import LMDistribution
            from disco.scorers import BooleanScorer
            from disco.tuners import FDPGTuner
            from disco.tuners.losses import KLLoss
        except ImportError as e:
            raise PeerUnavailable(f"disco not available ({e}); run with PYTHONPATH=/path/to/disco-src") from None
        self.shape, self.device = shape, torch.device(device)
        tok = make_tokenizer(shape)
        prior = build_model(shape, seed).to(self.device)
        policy = copy.deepcopy(prior)
        word = f"t{shape.constraint_token}"
        if shape.negate:
            pred = lambda s, c: word not in s.text.split()  # noqa: E731
        else:
            pred = lambda s, c: word in s.text.split()  # noqa: E731
        self.base = LMDistribution(prior, tokenizer=tok, length=shape.length)
        self.model = LMDistribution(policy, tokenizer=tok, length=shape.length, freeze=False)
        target = self.base.constrain([BooleanScorer(pred)], [1.0])
        was = torch.is_anomaly_enabled()
        self.tuner = FDPGTuner(self.model, target, loss=KLLoss(), context=tok.bos_token,
                               context_dataset=[tok.bos_token], optimizer="AdamW", learning_rate=lr,
                               n_gradient_steps=2**30, n_samples_per_context=shape.batch,
                               sampling_size=shape.batch, scoring_size=shape.batch, warmup_steps=0)
        # disco's Tuner turns on torch.autograd.set_detect_anomaly(True) for the whole process; it stays on while
        # disco runs (it is part of disco's cost) and is restored by close().
        self._anomaly_was = was
        self.eos = shape.eos
        self._tokens = 0
        self._ph = Phases(enabled=False)
        self._instrument()

    def _instrument(self):
        """Wrap disco's methods once; the wrappers time into whichever :class:`Phases` the current step uses."""
        t, me = self.tuner, self

        def timed(obj, attr, name, count=False):
            orig = getattr(obj, attr)

            def f(*a, **k):
                with me._ph(name):
                    out = orig(*a, **k)
                if count:  # generated tokens, up to and including the first EOS
                    samples = out[0] if isinstance(out, tuple) else out
                    toks = torch.stack([s.token_ids for row in samples for s in row])
                    me._tokens += int(completion_mask(toks, me.eos).sum())
                return out
            setattr(obj, attr, f)

        timed(self.model, "sample_batch", "sampling", count=True)
        timed(self.model, "log_score_batch", "policy scoring")
        timed(t.target, "log_score_batch", "prior scoring")
        timed(t, "_compute_gradient_batched", "backward")
        self._ph.time_optimizer(t.optimizer, current=lambda: me._ph)
        loss = t._loss

        class TimedLoss:  # the loss is called as a functor: wrap the object, keep its attributes
            def __getattr__(self, k):
                return getattr(loss, k)

            def __call__(self, *a, **k):
                with me._ph("coefficients"):
                    return loss(*a, **k)

        t._loss = TimedLoss()

    def step(self, ph: Phases):
        self._ph = ph
        self._tokens = 0
        self.tuner._step()
        return self._tokens

    def close(self):
        torch.autograd.set_detect_anomaly(self._anomaly_was)


PEERS = {"straightforward": Straightforward, "disco": Disco}
