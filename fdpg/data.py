"""Stored data: offline batches (samples with their proposal log-probs) and prompts (contexts of a conditional
target).

Offline JSONL, one object per line (the format ``fdpg sample`` writes)::

    {"tokens": [5, 2, 0], "logprob": -4.21, "context": [0], "reward": 1.0}

``tokens``: the continuation, EOS included where it ended at one; ``logprob``: log q(x) under the model that drew
it (f-DPG's importance weights need it; Q-learning does not read it, and its files may leave it out); ``context``
(optional): its context token ids; ``reward`` (optional). A tensor file (``.pt``) holds a dict with ``tokens``
``[N, T]`` long (padded), ``logprob`` ``[N]``, and optionally ``mask`` ``[N, T]`` (else built up to the first EOS),
``reward`` ``[N]``.

Prompts: a list in the config (strings, or lists of token ids), a ``.txt`` file (one prompt a line; needs a
tokenizer), or a ``.jsonl`` file of ``{"tokens": [...]}`` or ``{"text": "..."}`` objects.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

import fdpg
from .config import ConfigError

__all__ = ["OfflineData", "load_offline", "load_prompts"]


@dataclass
class OfflineData:
    """tokens ``[N, T]`` long, mask ``[N, T]`` bool, logprob ``[N]`` float32 (log q; NaN where a file read with
    ``need_logprob=False`` has none), context_index ``[N]`` long into ``contexts`` (distinct token-id lists;
    ``[[bos]]`` when the file has none), reward ``[N]`` or None."""

    tokens: torch.Tensor
    mask: torch.Tensor
    logprob: torch.Tensor
    context_index: torch.Tensor
    contexts: list[list[int]]
    reward: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _bad(path, line, msg, key) -> ConfigError:
    where = f"{path}, line {line}" if line is not None else str(path)
    return ConfigError(key, f"{where}: {msg}")


def _jsonl_rows(lines, path, key, what: str = "a JSON object"):
    """``(line number, object)`` for each non-blank line of a JSONL file; a bad line raises naming file and line."""
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _bad(path, i, f"not valid JSON: {e}", key) from None
        if not isinstance(row, dict):
            raise _bad(path, i, f"expected {what}", key)
        yield i, row


def _check_tokens(toks, path, line, key, vocab_size, max_length, eos):
    if not isinstance(toks, list) or not toks or not all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in toks):
        raise _bad(path, line, "'tokens' must be a non-empty list of integer token ids", key)
    if len(toks) > max_length:
        raise _bad(path, line, f"{len(toks)} tokens, longer than max_length ({max_length})", key)
    bad = [t for t in toks if not 0 <= t < vocab_size]
    if bad:
        raise _bad(path, line, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", key)
    if eos is not None and eos in toks[:-1]:
        raise _bad(path, line, f"tokens continue after EOS ({eos}); a sequence ends at its first EOS", key)
    if (eos is None or toks[-1] != eos) and len(toks) != max_length:
        raise _bad(path, line, _PREFIX.format(n=len(toks), eos=eos, T=max_length), key)


_PREFIX = ("a row of {n} tokens ends without EOS ({eos}) before max_length ({T}): a prefix, not a whole sequence "
           "(sampled with a smaller max_length?)")


def _number(row, name, path, line, key, required):
    v = row.get(name)
    if v is None:
        if required:
            raise _bad(path, line, f"missing {name!r}", key)
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise _bad(path, line, f"{name!r} must be a number, got {v!r}", key)
    return float(v)


def load_offline(path: str, *, vocab_size: int, max_length: int, eos_token_id: int | None, bos_token_id: int = 0,
                 key: str = "offline", need_logprob: bool = True) -> OfflineData:
    """Read and check an offline batch (errors name the file and line). ``need_logprob=False`` (Q-learning) lets
    ``logprob`` be absent (read as NaN: nothing may use it); where present it is checked all the same."""
    if not os.path.exists(path):
        raise ConfigError(key, f"no offline file at {path!r}")
    pad = 0 if eos_token_id is None else eos_token_id
    if path.endswith((".pt", ".pth")):
        return _load_tensor_file(path, vocab_size, max_length, eos_token_id, bos_token_id, key, need_logprob)
    seqs, lps, rewards, ctx_of, contexts = [], [], [], [], {}
    with open(path) as f:
        for i, row in _jsonl_rows(f, path, key):
            if "tokens" not in row:
                raise _bad(path, i, "missing 'tokens'", key)
            _check_tokens(row["tokens"], path, i, key, vocab_size, max_length, eos_token_id)
            lp = _number(row, "logprob", path, i, key, need_logprob)
            if lp is None:
                lp = math.nan
            elif not (lp <= 0 and lp > -math.inf):
                raise _bad(path, i, f"'logprob' must be a finite log-probability <= 0, got {lp}", key)
            r = _number(row, "reward", path, i, key, False)
            if r is not None and not math.isfinite(r):
                raise _bad(path, i, f"'reward' must be finite, got {r}", key)
            ctx = row.get("context", [bos_token_id])
            if not isinstance(ctx, list) or not ctx or not all(isinstance(t, int) and not isinstance(t, bool)
                                                               and 0 <= t < vocab_size for t in ctx):
                raise _bad(path, i, "'context' must be a non-empty list of token ids in the vocabulary", key)
            seqs.append(row["tokens"]), lps.append(lp), rewards.append(r)
            ctx_of.append(contexts.setdefault(tuple(ctx), len(contexts)))
    if not seqs:
        raise _bad(path, None, "empty: no samples", key)
    if any(r is None for r in rewards) and not all(r is None for r in rewards):
        line = next(i for i, r in enumerate(rewards, 1) if r is None)
        raise _bad(path, line, "'reward' missing here but present on other lines", key)
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for j, s in enumerate(seqs):
        tokens[j, :len(s)] = torch.tensor(s)
        mask[j, :len(s)] = True
    return OfflineData(tokens, mask, torch.tensor(lps, dtype=torch.float32), torch.tensor(ctx_of),
                       [list(c) for c in contexts],
                       None if rewards[0] is None else torch.tensor(rewards, dtype=torch.float32))


def _load_tensor_file(path, vocab_size, max_length, eos, bos, key, need_logprob=True) -> OfflineData:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _bad(path, None, f"cannot read a tensor file: {type(e).__name__}: {e}", key) from None
    if not isinstance(d, dict) or "tokens" not in d or ("logprob" not in d and need_logprob):
        raise _bad(path, None, "expected a dict with 'tokens' [N, T] and 'logprob' [N]", key)
    tokens, lp = d["tokens"], d.get("logprob")
    if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point
            or tokens.dtype == torch.bool):
        raise _bad(path, None, "'tokens' must be an integer tensor [N, T]", key)
    N, T = tokens.shape
    if N == 0:
        raise _bad(path, None, "empty: no samples", key)
    if T > max_length:
        raise _bad(path, None, f"sequences of {T} tokens, longer than max_length ({max_length})", key)
    if lp is None:
        lp = torch.full((N,), math.nan)
    elif not isinstance(lp, torch.Tensor) or lp.shape != (N,) or not lp.dtype.is_floating_point:
        raise _bad(path, None, f"'logprob' must be a float tensor [{N}]", key)
    elif not bool((torch.isfinite(lp) & (lp <= 0)).all()):
        raise _bad(path, None, "'logprob' must hold finite log-probabilities <= 0", key)
    mask = d.get("mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != tokens.shape):
        raise _bad(path, None, f"'mask' must be a tensor of the shape of 'tokens' {tuple(tokens.shape)}", key)
    mask = fdpg.completion_mask(tokens, eos) if mask is None else mask.bool()
    n = mask.sum(1)
    if not torch.equal(mask, torch.arange(T)[None, :] < n[:, None]):
        raise _bad(path, None, "'mask' must cover a prefix of each row (its tokens, then padding)", key)
    last = tokens.gather(1, (n - 1).clamp_min(0)[:, None])[:, 0]
    ends = torch.zeros(N, dtype=torch.bool) if eos is None else last == eos
    if eos is not None and bool(((tokens == eos) & mask).sum(1).gt(ends.long()).any()):
        raise _bad(path, None, f"a row's tokens continue after EOS ({eos}); a sequence ends at its first EOS", key)
    short = ~ends & (n != max_length) & (n > 0)
    if bool(short.any()):
        raise _bad(path, None, _PREFIX.format(n=int(n[short][0]), eos=eos, T=max_length), key)
    sel = tokens[mask]
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= vocab_size):
        raise _bad(path, None, f"token ids outside the vocabulary [0, {vocab_size})", key)
    if not bool(mask.any(1).all()):
        raise _bad(path, None, "a row has no token", key)
    r = d.get("reward")
    if r is not None and (not isinstance(r, torch.Tensor) or not r.dtype.is_floating_point or r.shape != (N,)
                          or not bool(torch.isfinite(r).all())):
        raise _bad(path, None, f"'reward' must be a finite tensor [{N}]", key)
    tokens = torch.where(mask, tokens.long(), torch.full_like(tokens.long(), 0 if eos is None else eos))
    return OfflineData(tokens, mask, lp.float(), torch.zeros(N, dtype=torch.long), [[bos]],
                       None if r is None else r.float())


def load_prompts(spec, *, tokenizer, vocab_size: int, key: str = "prompts") -> list[list[int]]:
    """Contexts as token-id lists, from a list or a file (see the module docstring)."""
    if isinstance(spec, list):
        items, where = spec, None
    else:
        if not os.path.exists(spec):
            raise ConfigError(key, f"no prompts file at {spec!r}")
        with open(spec) as f:
            lines = f.read().splitlines()
        if spec.endswith(".jsonl"):
            items = []
            what = "an object with 'tokens' or 'text'"
            for i, row in _jsonl_rows(lines, spec, key, what):
                if "tokens" not in row and "text" not in row:
                    raise _bad(spec, i, f"expected {what}", key)
                items.append(row.get("tokens", row.get("text")))
        else:
            items = [ln for ln in lines if ln.strip()]
        where = spec
    out = []
    for i, it in enumerate(items):
        k = f"{key}[{i}]" if where is None else key
        if isinstance(it, str):
            if tokenizer is None:
                raise ConfigError(k, "text prompts need a tokenizer, and the model has none (give token ids)")
            ids = tokenizer(it, add_special_tokens=False)["input_ids"]
            if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
                ids = [tokenizer.bos_token_id] + ids
        elif isinstance(it, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in it):
            ids = it
        else:
            raise ConfigError(k, f"expected a string or a list of token ids, got {it!r}")
        if not ids:
            raise ConfigError(k, "empty prompt")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(k, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        out.append(list(ids))
    if not out:
        raise ConfigError(key, "no prompts")
    return out
