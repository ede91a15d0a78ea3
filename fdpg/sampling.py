"""Pure ancestral sampling from a causal LM with its KV cache; the proposal's log-probs come out of the same pass.

    >>> s = sample(model, 64, max_length=32, eos_token_id=0, generator=torch.Generator().manual_seed(0))
    >>> s.tokens, s.mask, s.logprob          # [64, T'] long, [64, T'] bool, [64] float32 (T' <= 32)

No temperature, top-k or top-p: importance weights need the true q(x). A sequence ends at its first EOS (which
belongs to it) or at ``max_length`` tokens; later positions are padding, masked by position
(:func:`fdpg.completion_mask`), never by token id.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

import fdpg
from .ops._checks import should_validate as validate

__all__ = ["Samples", "sample", "left_pad", "cat_samples"]

#: Where the sampling loop draws each token, and keeps its end-of-sequence bookkeeping, in one Triton kernel
#: (kernels/sampling.py; about a dozen ATen kernels a token otherwise): "cuda" (CUDA devices, the default), "always"
#: (CPU tensors too: the tests, under TRITON_INTERPRET=1) or "off"; the environment variable FDPG_FUSED_DRAW sets
#: it at import.
FUSED_DRAW = os.environ.get("FDPG_FUSED_DRAW", "cuda")


@dataclass
class Samples:
    """A batch of continuations and the contexts they were drawn after.

    tokens ``[B, T]`` long (padding after the end), mask ``[B, T]`` bool (the continuation, EOS included),
    token_logprob ``[B, T]`` float32 (log q per token, 0 where masked), logprob ``[B]`` float32 (log q(x)),
    context_ids ``[B, P]`` long (left-padded), context_mask ``[B, P]`` bool or None (no padding),
    context_index ``[B]`` long (which context; 0 for unconditional sampling).
    replay: when ``sample(record=True)`` could record the pass, a function that returns the sampling model's logits
    ``[B, T, V]`` at the positions that predict ``tokens``, with autograd into its weights, from the recording
    (:meth:`fdpg.decode._FastDecoder.replay_logits`): the scoring pass without its GEMMs; the function returns
    None once any weight of the model has been updated in place since the draw (``replay(check=False)`` skips
    that test). None when nothing was recorded.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    token_logprob: torch.Tensor
    logprob: torch.Tensor
    context_ids: torch.Tensor
    context_mask: torch.Tensor | None
    context_index: torch.Tensor
    replay: Callable[..., torch.Tensor | None] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "Samples":
        return Samples(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                          for f in fields(self) if f.name != "replay"})


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-pad token-id lists into ``(ids [B, P] long, mask [B, P] bool or None when nothing is padded)``."""
    P = max(len(s) for s in seqs)
    if P == 0:
        raise ValueError("contexts: every context is empty; give at least one token (e.g. BOS)")
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"contexts: context {i} is empty; give at least one token (e.g. BOS)")
        ids[i, P - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = True
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(model, batch_size: int, max_length: int, *, eos_token_id: int | None, bos_token_id: int = 0,
           context_ids: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
           context_index: torch.Tensor | None = None, generator: torch.Generator | None = None,
           autocast_dtype: torch.dtype | None = None, stop_check_every: int = 1, fast: bool = True,
           record: bool = False, cuda_graph: bool | None = None,
           all_done: Callable[[bool], bool] | None = None) -> Samples:
    """Draw ``batch_size`` sequences by ancestral sampling with the KV cache.

    Args:
        model: a Hugging Face causal LM (eval mode).
        max_length: the most tokens per continuation.
        eos_token_id: the token that ends a sequence, or None (every sequence has ``max_length`` tokens).
        bos_token_id: the one-token context of unconditional samples (when ``context_ids`` is None).
        context_ids: ``[batch_size, P]`` left-padded contexts (with ``context_mask`` ``[batch_size, P]`` bool, or
            None when nothing is padded) and ``context_index`` ``[batch_size]``, carried into the result.
        generator: the source of randomness (on the model's device).
        autocast_dtype: run the model under autocast to this dtype (e.g. bfloat16 on a GPU); log-probs are float32.
        stop_check_every: test every this many tokens whether all sequences have ended (a host sync).
        all_done: at each such test, maps "all of this batch's sequences have ended" to whether to stop: for
            processes that must run the same number of forward passes (FSDP), an agreement of every rank.
        fast: decode with :mod:`fdpg.decode`'s own forward and static KV cache for the model families it knows
            (GPT-2, Llama); other models, and False, use the model's forward with Hugging Face's cache. Both
            compute the same distribution and consume the generator alike.
        record: keep the pass's GEMM outputs so that ``Samples.replay`` can stand in for the model's scoring pass
            (the fast path on the CPU in float32/64, when the recording takes at most
            ``fdpg.decode.RECORD_MAX_BYTES``: B x length x (the GEMM outputs of every layer + the vocabulary)
            values; elsewhere ``replay`` is None).
        cuda_graph: on a GPU, decode with a static cache and replay each step from one CUDA graph (default: on a
            GPU, for the fast path's families).

    Returns:
        :class:`Samples`, with ``T`` the length of the longest sequence drawn (at most ``max_length``).
    """
    from .decode import decoder, use_triton
    from .models import vocab_size

    dev = next(model.parameters()).device
    _check_sample_args(batch_size, max_length, stop_check_every, eos_token_id, bos_token_id, context_ids,
                       context_mask, vocab_size(model))
    if context_ids is None:
        context_ids = torch.full((batch_size, 1), bos_token_id, dtype=torch.long, device=dev)
        context_mask = None
    if context_index is None:
        context_index = torch.zeros(batch_size, dtype=torch.long, device=dev)
    B, P = context_ids.shape
    # no autocast cache: a step's casts must be made inside it (a CUDA graph replays them)
    amp = (torch.autocast(dev.type, dtype=autocast_dtype, cache_enabled=False) if autocast_dtype is not None
           else contextlib.nullcontext())
    pad = 0 if eos_token_id is None else eos_token_id
    done = torch.zeros(B, 1, dtype=torch.bool, device=dev)
    any_done = False                      # known on the host at the stop checks; until then nothing to mask
    tokens, lps = [], []
    graph = dev.type == "cuda" and cuda_graph is not False
    dec = decoder(model, B, P + max_length - 1, fast=fast, record=record, static=graph, cuda_graph=graph)
    if autocast_dtype is not None and dec.fast:
        dec.cast_gemm_weights(autocast_dtype)                      # once for the pass, not at every step
    with amp:
        logits = dec.prefill(context_ids, context_mask)
    native = None
    if dec.fast and dev.type == "cpu" and all_done is None:   # GPT-2, Llama on the CPU: the pass in one C call
        from .cpu_decode import run

        native = run(dec, logits, max_length, eos_token_id, pad, stop_check_every, generator)
    fused = native is None and use_triton(FUSED_DRAW, "fdpg.sampling.FUSED_DRAW (or FDPG_FUSED_DRAW)", dev)
    if fused:
        from .kernels.sampling import draw
    for t in range(max_length if native is None else 0):
        if fused:    # the uniforms as _draw takes them; rows done get pad and 0, done updated, in the kernel
            u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=dev)
            tok, lp = draw(logits, u, done, pad=pad, eos=eos_token_id)
        else:
            tok, lp = _draw(logits, generator)                    # [B, 1] each
            if eos_token_id is not None:
                if any_done or stop_check_every > 1:
                    tok.masked_fill_(done, pad)
                    lp.masked_fill_(done, 0.0)
                done |= tok == eos_token_id
        tokens.append(tok)
        lps.append(lp)
        if t + 1 == max_length:
            break
        if eos_token_id is not None and (t + 1) % stop_check_every == 0:
            n_done = int(done.sum())
            if n_done == B if all_done is None else all_done(n_done == B):
                break
            any_done = n_done > 0
        with amp:
            logits = dec.step(tok.view(-1))
    tokens, token_lp = native if native is not None else (torch.cat(tokens, 1), torch.cat(lps, 1))
    mask = fdpg.completion_mask(tokens, eos_token_id)
    if validate(None, token_lp) and bool(torch.isnan(token_lp).any()):   # (a host sync: the CPU by default)
        raise FloatingPointError("sample: the model's logits hold NaN (the drawn tokens' log-probs are NaN); "
                                 "its weights or inputs are not finite")
    dec.seal()
    T = tokens.shape[1]
    return Samples(tokens=tokens, mask=mask, token_logprob=token_lp, logprob=token_lp.sum(-1),
                   context_ids=context_ids, context_mask=context_mask, context_index=context_index,
                   replay=_replayer(dec, T) if dec.recording else None)


def _check_sample_args(batch_size, max_length, stop_check_every, eos_token_id, bos_token_id, context_ids,
                       context_mask, V) -> None:
    for name, v in (("batch_size", batch_size), ("max_length", max_length), ("stop_check_every", stop_check_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    ids = [("eos_token_id", eos_token_id)] + ([("bos_token_id", bos_token_id)] if context_ids is None else [])
    for name, v in ids:
        if v is not None and not 0 <= v < V:
            raise ValueError(f"{name}: expected a token id in [0, {V}) (the model's vocabulary), got {v}")
    if context_ids is None:
        return
    if not isinstance(context_ids, torch.Tensor) or context_ids.dim() != 2 or context_ids.dtype.is_floating_point:
        raise ValueError(f"context_ids: expected an integer tensor [batch_size, P], got "
                         f"{tuple(context_ids.shape) if isinstance(context_ids, torch.Tensor) else context_ids!r}")
    if context_ids.shape[0] != batch_size or context_ids.shape[1] < 1:
        raise ValueError(f"context_ids: expected shape ({batch_size}, P) with P >= 1, got {tuple(context_ids.shape)}")
    if context_mask is not None and tuple(context_mask.shape) != tuple(context_ids.shape):
        raise ValueError(f"context_mask: expected shape {tuple(context_ids.shape)} like context_ids, got "
                         f"{tuple(context_mask.shape)}")
    if not validate(None, context_ids):      # value checks: host syncs (the CPU by default)
        return
    if context_ids.numel() and (int(context_ids.min()) < 0 or int(context_ids.max()) >= V):
        raise ValueError(f"context_ids: token ids must lie in [0, {V}) (the model's vocabulary)")
    if context_mask is not None:
        if not bool(context_mask.bool().any(-1).all()):
            raise ValueError("context_mask: every row needs at least one context token (True)")


def _replayer(dec, T: int) -> Callable[..., torch.Tensor | None]:
    """``Samples.replay``: the recorded pass's logits with autograd, or None once the weights have changed."""
    def replay(check: bool = True) -> torch.Tensor | None:
        return dec.replay_logits(T, check=False) if not check or dec.can_replay else None
    return replay


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits [B, V]`` and its log-prob, ``[B, 1]`` long and float32, by the inverse CDF in
    float64 with one uniform per row (exact to rounding, cheaper than multinomial's V exponentials)."""
    p = torch.softmax(logits, -1, dtype=torch.float32)
    cdf = p.cumsum(-1, dtype=torch.float64)
    u = torch.rand(p.shape[0], 1, generator=generator, dtype=torch.float64, device=p.device)
    tok = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).clamp_max_(cdf.shape[-1] - 1)
    # log of the drawn token's probability (a token is drawn only when its probability is not 0)
    return tok, p.gather(-1, tok).log_()


def cat_samples(parts: list[Samples], pad_id: int) -> Samples:
    """Concatenate batches (right-padding continuations, left-padding contexts to common widths)."""
    T = max(p.tokens.shape[1] for p in parts)
    P = max(p.context_ids.shape[1] for p in parts)

    def rpad(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    def lpad(x, value):
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=value)

    cm = [p.context_mask if p.context_mask is not None else torch.ones_like(p.context_ids, dtype=torch.bool)
          for p in parts]
    ctx_mask = torch.cat([lpad(m, False) for m in cm])
    return Samples(tokens=torch.cat([rpad(p.tokens, pad_id) for p in parts]),
                   mask=torch.cat([rpad(p.mask, False) for p in parts]),
                   token_logprob=torch.cat([rpad(p.token_logprob, 0.0) for p in parts]),
                   logprob=torch.cat([p.logprob for p in parts]),
                   context_ids=torch.cat([lpad(p.context_ids, pad_id) for p in parts]),
                   context_mask=None if bool(ctx_mask.all()) else ctx_mask,
                   context_index=torch.cat([p.context_index for p in parts]))
