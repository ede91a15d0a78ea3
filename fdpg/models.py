"""Models: a tiny GPT-2 built from a seed, or a local Hugging Face causal LM; the scoring forward pass.

    >>> from fdpg.models import build_tiny, load_model
    >>> prior = build_tiny(vocab_size=6, n_layer=2, n_embd=32, seed=0)      # same weights for the same seed
    >>> prior.save_pretrained("my_prior")
    >>> same, tokenizer = load_model("my_prior")                            # tokenizer is None when none was saved

Every model fdpg trains or scores is a ``transformers`` causal LM in eval mode (dropout off: the policy gradient
needs the log pi of the sampling pass and of the scoring pass to be the same function).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

import fdpg
from .config import ConfigError
from .cpu_gemm import linear

__all__ = ["quiet", "build_tiny", "load_model", "vocab_size", "eos_token_id", "bos_token_id",
           "use_fused_output", "score_tokens", "score_sequences", "model_inputs"]


def build_tiny(vocab_size: int, n_layer: int = 2, n_embd: int = 32, seed: int = 0, n_head: int | None = None,
               eos_token_id: int | None = 0, n_positions: int = 128, initializer_range: float = 0.02,
               dropout: float = 0.0):
    """A randomly initialised GPT-2 (``GPT2LMHeadModel``), the same weights for the same arguments.

    ``eos_token_id`` (default 0) ends sequences and, as in GPT-2, doubles as the BOS token that starts an
    unconditional sample; ``None`` means no EOS (every sequence has ``max_length`` tokens; token 0 starts them).
    ``dropout`` (default 0) is GPT-2's residual, embedding and attention dropout; it acts only in train mode (the
    Monte-Carlo passes of Q-learning's target network). ``initializer_range`` is the std of the weights: larger
    gives a peakier prior.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, v in (("vocab_size", vocab_size), ("n_layer", n_layer), ("n_embd", n_embd),
                    ("n_positions", n_positions)) + ((("n_head", n_head),) if n_head is not None else ()):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(name, f"expected an int >= 1, got {v!r}")
    if not (isinstance(initializer_range, (int, float)) and math.isfinite(initializer_range)
            and initializer_range > 0):
        raise ConfigError("initializer_range", f"expected a finite number > 0 (the weights' std), "
                                               f"got {initializer_range!r}")
    if n_head is None:
        n_head = max(1, n_embd // 16) if n_embd % 16 == 0 else 1
    if n_embd % n_head:
        raise ConfigError("n_head", f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ConfigError("eos_token_id", f"expected a token id in [0, {vocab_size}), got {eos_token_id}")
    if not 0 <= dropout < 1:
        raise ConfigError("dropout", f"expected a probability in [0, 1), got {dropout}")
    special = 0 if eos_token_id is None else eos_token_id
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=special, eos_token_id=eos_token_id,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     initializer_range=initializer_range,
                     activation_function="gelu_pytorch_tanh")  # GPT-2's gelu_new, as one fused op
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    return model.eval()


def load_model(path: str, *, key: str = "prior", dtype: torch.dtype | None = None):
    """``(model, tokenizer_or_None)`` from a local directory written by ``save_pretrained`` (no hub access)."""
    from transformers import AutoModelForCausalLM

    if not isinstance(path, str) or not path:
        raise ConfigError(key, f"expected a path to a local Hugging Face model directory, got {path!r}")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise ConfigError(key, f"no model directory at {path!r} (fdpg loads local Hugging Face causal LMs only, "
                              "written by save_pretrained; nothing is downloaded)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(key, f"{path!r} has no config.json: not a Hugging Face model directory")
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                         **({"dtype": dtype} if dtype is not None else {}))
    except Exception as e:  # transformers raises many kinds; the user needs the path and the cause
        raise ConfigError(key, f"cannot load a causal LM from {path!r}: {type(e).__name__}: {e}") from None
    return model.eval(), load_tokenizer(path)


@contextlib.contextmanager
def quiet():
    """Hugging Face's progress bars off (saving and loading shards) for the duration."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str):
    """The tokenizer saved in ``path``, or None when there is none."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        return None


def vocab_size(model) -> int:
    """Rows of the output layer (the distribution's support), which may exceed the tokenizer's size."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def eos_token_id(model) -> int | None:
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def bos_token_id(model) -> int:
    """The token an unconditional sample starts from: BOS, else EOS (GPT-2), else 0."""
    for name in ("bos_token_id", "eos_token_id"):
        v = getattr(model.config, name, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def special_tokens(model, key: str = "prior", eos: int | None = None) -> tuple[int | None, int]:
    """``(eos, bos)``: the token that ends a sequence (``eos`` when given: the config's ``eos_token_id``; else
    :func:`eos_token_id`, the first where the model lists several) and :func:`bos_token_id`, checked to lie in the
    model's vocabulary (ConfigError naming ``key``, or ``eos_token_id`` for the given one, otherwise)."""
    V = vocab_size(model)
    if eos is not None and not 0 <= eos < V:
        raise ConfigError("eos_token_id", f"token id {eos} is outside the vocabulary [0, {V})")
    eos, bos = eos_token_id(model) if eos is None else eos, bos_token_id(model)
    for what, tok in (("eos_token_id", eos), ("bos_token_id", bos)):
        if tok is not None and not 0 <= tok < V:
            raise ConfigError(key, f"the model's {what} {tok} is outside its vocabulary [0, {V}); set "
                                   f"config.json's {what} to a token of the vocabulary")
    return eos, bos


def eos_token_ids(model) -> list[int]:
    """Every EOS token id the model's config lists."""
    eos = getattr(model.config, "eos_token_id", None)
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def max_positions(model) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(model.config, name, None)
        if isinstance(v, int):
            return v
    return None


# Model families whose output layer is a plain Linear applied to the base model's last hidden state (no logit
# scaling or soft-capping), so that the fused output-layer op computes exactly the model's log-probs.
_FUSABLE = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2", "smollm3", "gptj"}


def use_fused_output(model, choice: str = "auto", logits_rows: int | None = None) -> bool:
    """Whether to score through ``fdpg.paired_linear_token_logprobs`` (``choice``: "auto" | "fused" | "logits").

    "auto": on a GPU, for the model families known to apply a plain Linear output layer, fused only where the
    logits of ``logits_rows`` positions (three ``[rows, V]`` float32-sized buffers: policy, its gradient, prior)
    would take more than a quarter of the GPU's memory; otherwise the logits path, which is faster where memory
    allows (cuBLAS runs the output GEMM nearer the matmul rate than the fused op: benchmarks/RESULTS.md). With
    ``logits_rows`` None, fused wherever it applies on a GPU. The logits path on the CPU.
    """
    if choice == "logits":
        return False
    head = model.get_output_embeddings()
    ok = isinstance(head, torch.nn.Linear) and hasattr(model, "base_model") and model.base_model is not model
    if choice == "fused":
        if not ok:
            raise ConfigError("output_layer", f"{type(model).__name__} has no plain Linear output layer over a base "
                                             "model; use output_layer: logits")
        return True
    device = next(model.parameters()).device
    if not (ok and device.type == "cuda" and getattr(model.config, "model_type", None) in _FUSABLE):
        return False
    if logits_rows is None:
        return True
    need = 3 * logits_rows * vocab_size(model) * 4
    return need > torch.cuda.get_device_properties(device).total_memory // 4


@dataclass
class ModelInputs:
    """One forward pass over ``[context | continuation]``: ids ``[B, P+T]``, attention_mask ``[B, P+T]`` or None
    (no padding), position_ids ``[B, P+T]`` or None, and ``P`` (the first continuation token is at ``P``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    P: int


def model_inputs(context_ids: torch.Tensor, context_mask: torch.Tensor | None, tokens: torch.Tensor) -> ModelInputs:
    """Concatenate the (left-padded) contexts ``[B, P]`` and the continuations ``[B, T]``."""
    ids = torch.cat([context_ids, tokens], 1)
    if context_mask is None:
        return ModelInputs(ids, None, None, context_ids.shape[1])
    attn = torch.cat([context_mask.long(), torch.ones_like(tokens)], 1)
    pos = (attn.cumsum(1) - 1).clamp_min(0)
    return ModelInputs(ids, attn, pos, context_ids.shape[1])


def _hidden(model, inp: ModelInputs, stop: int | None = None) -> torch.Tensor:
    """The final hidden states ``[B, P+T, d]`` (``[B, stop, d]``: a causal model's first ``stop`` positions need no
    later token, so an eval-mode forward runs on those alone; in train mode the whole sequence, so that dropout draws
    what a full forward draws): fdpg's own forward for GPT-2 and Llama (no host sync, cheaper attention on the CPU),
    the model's elsewhere (:func:`fdpg.decode.hidden_states`)."""
    from .decode import hidden_states

    ids, mask = inp.input_ids, inp.attention_mask
    if stop is not None and 0 < stop < ids.shape[1] and not model.training:
        ids, mask = ids[:, :stop], None if mask is None else mask[:, :stop]
    return hidden_states(model, ids, mask)


def _output_operands(model, inp: ModelInputs, sl: slice):
    """``(hidden [B, len(sl), d], weight [V, d], bias [V] or None)``: the output layer's input at positions ``sl``
    and its parameters, for the fused op. Under autocast all three in the autocast dtype, as ``F.linear`` would
    take them (a float32 master weight would otherwise send the fused op down its float32 matmul path)."""
    head = model.get_output_embeddings()
    ts = (_hidden(model, inp, sl.stop)[:, sl], head.weight, head.bias)
    dev = ts[0].device.type
    if not torch.is_autocast_enabled(dev):
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(None if t is None or not t.is_floating_point() else t.to(dt) for t in ts)


def _logits(model, inp: ModelInputs, sl: slice = slice(None)) -> torch.Tensor:
    """The logits ``[B, len(sl), V]`` at positions ``sl`` (the output layer on those positions only)."""
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and hasattr(model, "base_model") and model.base_model is not model:
        h = _hidden(model, inp, sl.stop)[:, sl]
        plain = type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
        return linear(h, head.weight, head.bias) if plain else head(h)     # linear: fdpg.cpu_gemm on the CPU
    return model(input_ids=inp.input_ids, attention_mask=inp.attention_mask, position_ids=inp.position_ids,
                 use_cache=False).logits[:, sl]


def score_tokens(policy, prior, inp: ModelInputs, tokens: torch.Tensor, *, fused: bool,
                 with_prior: bool = True, policy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``[B, T]`` float32 of ``tokens`` under the policy (with grad) and the prior (inference
    mode), from one forward pass of each model and the paired op of :mod:`fdpg` (fused with the output layer
    when ``fused``). Returns ``(policy_lp, prior_lp or None)``; positions after EOS hold garbage: mask them.
    """
    P, T = inp.P, tokens.shape[1]
    sl = slice(P - 1, P + T - 1)  # the logits at position i predict token i + 1
    grad_ctx = torch.enable_grad() if policy_grad else torch.no_grad()
    if fused:
        with grad_ctx:
            h_pi, wt_pi, b_pi = _output_operands(policy, inp, sl)
        if with_prior:
            with torch.inference_mode():
                h_a, wt_a, b_a = _output_operands(prior, inp, sl)
            with grad_ctx:
                return fdpg.paired_linear_token_logprobs(h_pi, wt_pi, h_a, wt_a, tokens, policy_bias=b_pi,
                                                         prior_bias=b_a, validate=False)
        with grad_ctx:
            return fdpg.linear_token_logprobs(h_pi, wt_pi, tokens, bias=b_pi, validate=False), None
    with grad_ctx:
        z_pi = _logits(policy, inp, sl)
    if with_prior:
        with torch.inference_mode():
            z_a = _logits(prior, inp, sl)
        with grad_ctx:
            return fdpg.paired_token_logprobs(z_pi, z_a, tokens, validate=False)
    with grad_ctx:
        return fdpg.token_logprobs(z_pi, tokens, validate=False), None


def score_sequences(policy, prior, inp: ModelInputs, tokens: torch.Tensor, mask: torch.Tensor, *, fused: bool,
                    policy_grad: bool = True, policy_logits: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs ``(log pi(x), log a(x))``, ``[B]`` float32 each, of the continuations ``tokens [B, T]``
    under ``mask [B, T]``: one forward pass of each model (the prior in inference mode), then one fused op
    (:func:`fdpg.paired_token_stats` over the logits, or the output layer fused in with
    :func:`fdpg.paired_linear_token_logprobs`). Only ``log pi`` carries grad (when ``policy_grad``).
    ``policy_logits [B, T, V]``: the policy's logits at the scored positions when already at hand (the replayed
    sampling pass, ``Samples.replay``), in place of its forward pass.
    """
    if fused and policy_logits is None:
        tok_pi, tok_a = score_tokens(policy, prior, inp, tokens, fused=True, policy_grad=policy_grad)
        return (fdpg.sequence_logprobs(tok_pi, mask, validate=False),
                fdpg.sequence_logprobs(tok_a, mask, validate=False))
    P, T = inp.P, tokens.shape[1]
    sl = slice(P - 1, P + T - 1)
    grad_ctx = torch.enable_grad() if policy_grad else torch.no_grad()
    with grad_ctx:
        z_pi = _logits(policy, inp, sl) if policy_logits is None else policy_logits
    with torch.inference_mode():
        z_a = _logits(prior, inp, sl)
    with grad_ctx:
        st = fdpg.paired_token_stats(z_pi, z_a, tokens, mask=mask, validate=False)
    return st.policy_seq, st.prior_seq
