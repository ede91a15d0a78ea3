"""The fast decoder (fdpg.decode) against Hugging Face's forward, and sampling through it against the generic path."""
import contextlib
import os

import pytest
import torch

import _tiny
import fdpg
from fdpg.decode import decoder, fast_path_reason, hidden_states
from fdpg.models import build_tiny, model_inputs, score_tokens
from fdpg.sampling import left_pad, sample

torch.set_num_threads(1)

V = 23


def tiny_llama(seed=0, **kw):
    return _tiny.llama(V, seed, **kw)


MODELS = {
    "gpt2": lambda: build_tiny(V, n_layer=2, n_embd=32, n_head=4, seed=1, initializer_range=0.3),
    "llama-gqa": lambda: tiny_llama(),
    # head_dim * heads != hidden_size, biases, linear RoPE scaling
    "llama-bias-rope": lambda: tiny_llama(seed=2, num_key_value_heads=4, head_dim=12, attention_bias=True,
                                          mlp_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 500.0}),
}
_cache = {}


def get(name):
    if name not in _cache:
        _cache[name] = MODELS[name]()
    return _cache[name]


def contexts(kind, B):
    """``(ids, mask)``: one BOS per row, or left-padded contexts of lengths 1..4 (every row a different length)."""
    if kind == "bos":
        return torch.full((B, 1), 1, dtype=torch.long), None
    g = torch.Generator().manual_seed(B)
    rows = [torch.randint(1, V, (1 + i % 4,), generator=g).tolist() for i in range(B)]
    return left_pad(rows, pad_id=0)


def hf_logits(model, ids, mask):
    """Every position's logits from one full forward pass (no cache) over the left-padded rows."""
    inp = model_inputs(ids[:, :0], None, ids) if mask is None else model_inputs(ids, mask, ids[:, :0])
    return model(input_ids=inp.input_ids, attention_mask=inp.attention_mask, position_ids=inp.position_ids,
                 use_cache=False).logits


def forward_logits(model, ids, mask, toks):
    """The model's logits ``[B, T + 1, V]`` where a decoder gives them: after the contexts ``ids`` (``mask``), and
    after each token of ``toks [B, T]`` (one full forward pass)."""
    full_mask = None if mask is None else torch.cat([mask, torch.ones_like(toks, dtype=torch.bool)], 1)
    return hf_logits(model, torch.cat([ids, toks], 1), full_mask)[:, ids.shape[1] - 1:]


def decoded(dec, ids, mask, toks, ctx=contextlib.nullcontext):
    """The decoder's logits ``[B, T + 1, V]``: its prefill of the contexts, then a step per token of ``toks``, each
    call inside ``ctx()``, without autograd (copies: a CUDA graph's steps return one buffer)."""
    with torch.no_grad():
        with ctx():
            out = [dec.prefill(ids, mask).clone()]
        for t in range(toks.shape[1]):
            with ctx():
                out.append(dec.step(toks[:, t]).clone())
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("attention", ["auto", "sdpa", "bmm"])
def test_hidden_states_and_grads_equal_the_models_forward(name, attention, monkeypatch):
    """The scoring pass (every position, with autograd) in float64 against the model's own forward: hidden states
    at real positions, and every parameter's gradient of a random projection of them. Attention: the native
    kernels ("auto"), SDPA, and the batched GEMMs that run where the native library is off ("bmm")."""
    import copy

    if attention == "bmm":
        monkeypatch.setenv("FDPG_CPU_DECODE", "0")
        attention = "auto"

    model = copy.deepcopy(get(name)).double()
    B, T = 5, 7
    ids, mask = contexts("padded", B)
    toks = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(3))
    inp = model_inputs(ids, mask, toks)
    w = torch.randn(B, inp.input_ids.shape[1], model.config.hidden_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    real = inp.attention_mask.bool()

    def run(f):
        model.zero_grad(set_to_none=True)
        h = f()
        (h * w)[real].sum().backward()
        return h.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, g_got = run(lambda: hidden_states(model, inp.input_ids, inp.attention_mask, attention=attention))
    want, g_want = run(lambda: model.base_model(input_ids=inp.input_ids, attention_mask=inp.attention_mask,
                                                position_ids=inp.position_ids, use_cache=False)[0])
    assert got.shape == want.shape and want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert g_got.keys() == g_want.keys() and len(g_want) >= 10
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], atol=1e-10, rtol=1e-9, msg=n)
    # no padding: the causal mask alone
    h = hidden_states(model, inp.input_ids[:, -T:], None, attention=attention)
    ref = model.base_model(input_ids=inp.input_ids[:, -T:], use_cache=False)[0]
    torch.testing.assert_close(h, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-bias-rope"])
def test_float32_passes_through_onednn(name, monkeypatch):
    """float32 on the CPU, every GEMM through oneDNN (fdpg.cpu_gemm, forced at these sizes): the scoring pass with
    autograd, and the replayed sampling pass, against the float64 model's forward and gradients."""
    import copy

    from fdpg import cpu_gemm

    if cpu_gemm.onednn_reason() is not None:
        pytest.skip(cpu_gemm.onednn_reason())
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    calls = []
    lin = cpu_gemm._lin
    monkeypatch.setattr(cpu_gemm, "_lin", lambda *a: calls.append(1) or lin(*a))
    m32, m64 = copy.deepcopy(get(name)).float(), copy.deepcopy(get(name)).double()
    B, T = 5, 6
    ids, mask = contexts("padded", B)
    P = ids.shape[1]
    toks = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(8))
    inp = model_inputs(ids, mask, toks)
    w = torch.randn(B, T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def run(model, f):
        model.zero_grad(set_to_none=True)
        z = f(model)
        (z.double() * w).sum().backward()
        return z.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}

    want, g_want = run(m64, lambda m: m(input_ids=inp.input_ids, attention_mask=inp.attention_mask,
                                        position_ids=inp.position_ids).logits[:, P - 1:P + T - 1])
    head = m32.get_output_embeddings()

    def replayed(m):
        dec = decoder(m, B, P + T - 1, record=True)
        with torch.no_grad():
            dec.prefill(ids, mask)
            for t in range(T - 1):
                dec.step(toks[:, t])
        dec.seal()
        return dec.replay_logits(T)

    for f in (lambda m: head(hidden_states(m, inp.input_ids, inp.attention_mask)[:, P - 1:P + T - 1]), replayed):
        calls.clear()
        got, g_got = run(m32, f)
        assert calls
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        for n in g_want:
            torch.testing.assert_close(g_got[n], g_want[n], atol=5e-5, rtol=5e-5, msg=n)


def test_the_padding_rows_embedding_gets_no_gradient():
    """A token equal to the embedding's padding_idx at real positions (Llama's pad id as its BOS): its embedding row
    gets no gradient, as through nn.Embedding (fdpg's forward and the replay of a recorded pass, float64)."""
    import copy

    model = copy.deepcopy(get("llama-gqa")).double()
    assert model.model.embed_tokens.padding_idx == 0
    ids = torch.randint(1, V, (4, 6), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 0
    w = torch.randn(4, 6, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grad(f):
        model.zero_grad(set_to_none=True)
        (f() * w).sum().backward()
        return model.model.embed_tokens.weight.grad.clone()

    want = grad(lambda: model.base_model(input_ids=ids, use_cache=False)[0])
    got = grad(lambda: hidden_states(model, ids))
    assert bool((want[0] == 0).all()) and bool((got[0] == 0).all())
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def gpt2_with(act: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0, initializer_range=0.3,
                                      activation_function=act)).eval()


@pytest.mark.parametrize("ctx,fed,act,B", [("bos", 6, "gelu_pytorch_tanh", 6), ("padded", 6, "gelu_pytorch_tanh", 6),
                                           ("padded", 3, "gelu_new", 6), ("bos", 1, "gelu", 6),
                                           ("padded", 4, "relu", 6), ("padded", 5, "gelu_new", 11),
                                           ("padded", 6, "llama-gqa", 6), ("bos", 4, "llama-bias-rope", 6),
                                           ("padded", 2, "llama-bias-rope", 6)])
def test_replayed_pass_equals_a_forward_pass(ctx, fed, act, B):
    """The recorded sampling pass replayed with autograd (its GEMMs, and GELU's output, taken from the recording)
    against a fresh forward pass, in float64: the logits of the positions fed and every parameter's gradient.
    GPT-2 with several activations (B = 11: the slab's attention over a block of 8 rows and 3 rows alone); Llama
    with GQA, biases and scaled RoPE (q and k recorded before RoPE)."""
    import copy

    model = (copy.deepcopy(get(act)) if act.startswith("llama") else gpt2_with(act)).double()
    T = 6
    ids, mask = contexts(ctx, B)
    P = ids.shape[1]
    toks = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(6))
    dec = decoder(model, B, P + T - 1, record=True)
    with torch.no_grad():
        dec.prefill(ids, mask)
        for t in range(fed - 1):                       # fewer than T tokens: the sampling pass stopped early
            dec.step(toks[:, t])
    assert not dec.can_replay                          # not sealed yet
    dec.seal()
    assert dec.can_replay
    if not act.startswith("llama"):
        assert ("act" in dec._rec) == (act != "relu")              # GELU's output replayed, ReLU recomputed
    w = torch.randn(B, fed, V, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def run(f):
        model.zero_grad(set_to_none=True)
        z = f()
        (z * w).sum().backward()
        return z.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    z_rep, g_rep = run(lambda: dec.replay_logits(fed))
    inp = model_inputs(ids, mask, toks[:, :fed])
    z_fwd, g_fwd = run(lambda: model(input_ids=inp.input_ids, attention_mask=inp.attention_mask,
                                     position_ids=inp.position_ids).logits[:, P - 1:P + fed - 1])
    torch.testing.assert_close(z_rep, z_fwd, atol=1e-10, rtol=1e-10)
    assert len(g_fwd) == len(list(model.parameters()))
    for n in g_fwd:
        torch.testing.assert_close(g_rep[n], g_fwd[n], atol=1e-10, rtol=1e-9, msg=n)
    with pytest.raises(ValueError, match="T: expected"):
        dec.replay_logits(fed + 1)


def test_replay_is_void_after_a_weight_update_and_absent_where_nothing_is_recorded():
    model = build_tiny(V, n_layer=1, n_embd=16, n_head=2, seed=4, initializer_range=0.3)
    g = torch.Generator().manual_seed(0)
    s = sample(model, 4, 5, eos_token_id=None, generator=g, record=True)
    assert s.replay is not None and s.replay().shape == (4, 5, V)
    assert sample(model, 4, 5, eos_token_id=None, generator=g).replay is None          # not asked for
    # an optimizer step, through the fused kernel (which bypasses the version counters) and the default one
    for kw in ({"fused": True}, {}):
        s = sample(model, 4, 5, eos_token_id=None, generator=g, record=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **kw)
        s.replay().sum().backward()
        opt.step()
        assert s.replay() is None
    dec = decoder(model, 3, 4, record=True)
    with torch.no_grad():
        dec.prefill(torch.ones(3, 1, dtype=torch.long), None)
    dec.seal()
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    with pytest.raises(RuntimeError, match="nothing recorded for the current weights"):
        dec.replay_logits(1)
    # where no recording is kept: bf16 weights, autocast, the static cache, the model's own forward
    for m, kw in ((copy_to(model, torch.bfloat16), {}), (model, {"autocast_dtype": torch.bfloat16}),
                  (model, {"fast": False})):
        assert sample(m, 3, 4, eos_token_id=0, generator=g, record=True, **kw).replay is None
    dec = decoder(model, 3, 4, static=True, record=True)
    dec.prefill(torch.ones(3, 1, dtype=torch.long), None)
    dec.seal()
    assert not dec.can_replay
    # a recording larger than the budget is not kept (the scoring pass then runs a forward)
    import fdpg.decode as D

    need = decoder(model, 4, 5, record=True)._record_bytes()
    assert need == 5 * 4 * (1 * (16 + 64 + 64 + 16) + V) * 4               # proj, act, dact, mlp; logits
    old, D.RECORD_MAX_BYTES = D.RECORD_MAX_BYTES, need - 1
    try:
        assert sample(model, 4, 5, eos_token_id=None, generator=g, record=True).replay is None
    finally:
        D.RECORD_MAX_BYTES = old


def copy_to(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def test_hidden_states_falls_back_to_the_models_forward():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4)).eval()
    assert fast_path_reason(model) is not None
    ids = torch.randint(0, V, (3, 6))
    torch.testing.assert_close(hidden_states(model, ids), model.base_model(input_ids=ids)[0])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("ctx", ["bos", "padded"])
@pytest.mark.parametrize("mode", [dict(), dict(attention="sdpa"), dict(static=True)])
def test_step_logits_equal_a_full_forward(name, ctx, mode):
    model, B, T = get(name), 6, 5
    ids, mask = contexts(ctx, B)
    P = ids.shape[1]
    dec = decoder(model, B, P + T, **mode)
    assert dec.fast
    toks = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(5))
    got = decoded(dec, ids, mask, toks)
    with torch.no_grad():
        want = forward_logits(model, ids, mask, toks)
    assert got.dtype == torch.float32 and got.shape == (B, T + 1, V)
    assert want.abs().max() > 1                                   # peaky enough that a wrong mask would show
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("ctx", ["bos", "padded"])
def test_sampling_equals_the_generic_path_and_rescoring(name, ctx):
    model, B, T = get(name), 48, 7
    ids, mask = contexts(ctx, B)
    kw = dict(eos_token_id=0, context_ids=ids, context_mask=mask, context_index=torch.arange(B))
    fast = sample(model, B, T, generator=torch.Generator().manual_seed(9), **kw)
    slow = sample(model, B, T, generator=torch.Generator().manual_seed(9), fast=False, **kw)
    assert torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.mask, slow.mask)
    torch.testing.assert_close(fast.token_logprob, slow.token_logprob, atol=1e-5, rtol=0)
    n = fast.mask.sum(1)
    assert bool((n < T).any()) and bool((n > 1).any())            # EOS ended some rows, not all at once
    assert bool((fast.tokens[~fast.mask] == 0).all()) and bool((fast.token_logprob[~fast.mask] == 0).all())
    # log q of the sampling pass = an independent full-forward scoring of the drawn sequences
    inp = model_inputs(fast.context_ids, fast.context_mask, fast.tokens)
    with torch.no_grad():
        lp, _ = score_tokens(model, None, inp, fast.tokens, fused=False, with_prior=False, policy_grad=False)
    torch.testing.assert_close(fast.logprob, fdpg.sequence_logprobs(lp, fast.mask), atol=1e-5, rtol=0)
    assert torch.equal(fast.context_index, torch.arange(B))


def test_reproducible_and_no_eos():
    model = get("gpt2")
    a = sample(model, 16, 6, eos_token_id=None, generator=torch.Generator().manual_seed(3))
    b = sample(model, 16, 6, eos_token_id=None, generator=torch.Generator().manual_seed(3))
    assert a.tokens.shape == (16, 6) and bool(a.mask.all())
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.token_logprob, b.token_logprob)
    one = sample(model, 16, 1, eos_token_id=0, generator=torch.Generator().manual_seed(3))
    assert one.tokens.shape == (16, 1) and bool(one.mask.all())


def test_reads_the_live_weights():
    """No copies: an in-place update of the model (an optimizer step) is seen by an existing decoder."""
    model = build_tiny(V, n_layer=1, n_embd=16, n_head=2, seed=4, initializer_range=0.3)
    ids = torch.full((3, 1), 1, dtype=torch.long)
    dec = decoder(model, 3, 4)
    before = dec.prefill(ids, None)                            # outside no_grad: the decoder needs no autograd
    assert not before.requires_grad and not dec.step(ids[:, 0]).requires_grad
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)
        after = dec.prefill(ids, None)
        want = hf_logits(model, ids, None)[:, -1]
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, want, atol=1e-5, rtol=0)


def test_dropout_follows_the_model_mode():
    model = build_tiny(V, n_layer=2, n_embd=32, n_head=4, seed=1, initializer_range=0.3, dropout=0.3)
    assert fast_path_reason(model) is None                     # eval mode: dropout is off, the fast path runs
    a = sample(model, 32, 5, eos_token_id=0, generator=torch.Generator().manual_seed(2))
    b = sample(model, 32, 5, eos_token_id=0, generator=torch.Generator().manual_seed(2), fast=False)
    assert torch.equal(a.tokens, b.tokens)
    model.train()                                               # train mode with dropout: the model's own forward
    try:
        assert "dropout" in fast_path_reason(model)
        assert not decoder(model, 2, 4).fast
        torch.manual_seed(0)
        c = sample(model, 32, 5, eos_token_id=0, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(0)
        d = sample(model, 32, 5, eos_token_id=0, generator=torch.Generator().manual_seed(2), fast=False)
        assert torch.equal(c.tokens, d.tokens) and torch.equal(c.logprob, d.logprob)
    finally:
        model.eval()
    plain = build_tiny(V, n_layer=1, n_embd=16, n_head=2, seed=1).train()
    assert fast_path_reason(plain) is None                     # train mode without dropout: the same function


def test_other_models_take_the_generic_path():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=64, eos_token_id=0,
                                            bos_token_id=1, initializer_range=0.3)).eval()
    assert "GPTNeoXForCausalLM" in fast_path_reason(neox) and not decoder(neox, 2, 4).fast
    s = sample(neox, 16, 4, eos_token_id=0, generator=torch.Generator().manual_seed(0))
    assert s.tokens.shape[0] == 16
    hooked = build_tiny(V, n_layer=1, n_embd=16, n_head=2, seed=1)
    h = hooked.transformer.h[0].register_forward_hook(lambda *a: None)
    try:
        assert "hooks" in fast_path_reason(hooked)
    finally:
        h.remove()
    assert fast_path_reason(hooked) is None


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_autocast_bf16(name):
    """Under autocast the fast path runs the same ops in bf16 as the model's forward (close to rounding)."""
    model, B, T = get(name), 6, 4
    ids, mask = contexts("padded", B)
    P = ids.shape[1]
    toks = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(5))
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    got = decoded(decoder(model, B, P + T), ids, mask, toks, amp)
    with torch.no_grad():
        with amp():
            want = forward_logits(model, ids, mask, toks)
        ref = forward_logits(model, ids, mask, toks)
    assert got.dtype == want.dtype == torch.bfloat16
    err, bf16_err = (got.float() - want.float()).abs().max(), (want.float() - ref).abs().max()
    assert 0 < bf16_err < 0.1 * ref.abs().max() and err <= 2 * bf16_err, (err, bf16_err)
    s = sample(model, B, T, eos_token_id=0, context_ids=ids, context_mask=mask, autocast_dtype=torch.bfloat16,
               generator=torch.Generator().manual_seed(1))
    assert s.token_logprob.dtype == torch.float32 and bool(torch.isfinite(s.logprob).all())


@pytest.mark.parametrize("name", list(MODELS))
def test_static_cast_steps_under_autocast(name):
    """The GPU's decoding set-up on the CPU: static cache (its additive mask opened a slot a step), the GEMM weights
    cast once for the pass (Llama's q, k, v and gate, up stacked) under autocast: the dynamic steps' logits to
    rounding, both within bf16 rounding of the float32 forward."""
    model, B, T = get(name), 6, 5
    ids, mask = contexts("padded", B)
    P = ids.shape[1]
    toks = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(5))
    runs = []
    for static in (False, True):
        dec = decoder(model, B, P + T, static=static, attention="sdpa")
        if static:
            dec.cast_gemm_weights(torch.bfloat16)
            assert dec.k is None and (dec.fused is None) == (name == "gpt2")
        runs.append(decoded(dec, ids, mask, toks,
                            lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)).float())
        assert dec.k.dtype == torch.bfloat16                     # the cache holds what attention reads
    with torch.no_grad():
        ref = forward_logits(model, ids, mask, toks)
    bf16_err = (runs[0] - ref).abs().max()
    assert 0 < bf16_err < 0.1 * ref.abs().max()
    assert (runs[1] - ref).abs().max() <= 1.5 * bf16_err
    torch.testing.assert_close(runs[1], runs[0], atol=0.5 * bf16_err.item(), rtol=0)


@pytest.mark.parametrize("name, per_layer", [("gpt2", 13), ("llama-gqa", 28)])
def test_a_decoding_step_is_few_ops(name, per_layer):
    """The ops (each a kernel on a GPU) of one static decoding step under autocast with the weights cast for the
    pass, per layer: GPT-2 13 (norms, their casts, 4 GEMMs, one cache write, attention, GELU as one op, two
    residual adds); Llama 18 and its two RMSNorms (5 ops each on the CPU; q, k, v and gate, up one GEMM each, RoPE
    in 4). Views are free; a regression (GELU as eight ops, a cast per weight, a mask converted per layer) fails."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.n += not (torch.Tag.view_copy in func.tags or func.is_view
                           or func.overloadpacket.__name__ in ("t", "transpose", "split", "chunk", "unbind"))
            return out

    counts = []
    for n_layer in (2, 3):
        model = (build_tiny(V, n_layer=n_layer, n_embd=32, n_head=4, seed=1) if name == "gpt2"
                 else tiny_llama(num_hidden_layers=n_layer))
        dec = decoder(model, 4, 8, static=True)
        dec.cast_gemm_weights(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            dec.prefill(torch.ones(4, 1, dtype=torch.long), None)
            dec.step(torch.ones(4, dtype=torch.long))
            with Ops() as ops:
                dec.step(torch.ones(4, dtype=torch.long))
        counts.append(ops.n)
    assert counts[1] - counts[0] <= per_layer, counts


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", [dict(), dict(static=True)])
def test_fused_norm_steps(name, mode, dev, monkeypatch):
    """Steps with each residual add, norm and cast in one Triton kernel (a GPU's default; on CPU tensors under the
    interpreter): the model's forward in float32, and the unfused steps to bf16 rounding under autocast with the
    weights cast for the pass."""
    pytest.importorskip("triton")
    import copy

    import fdpg.decode as D

    model, B, T = get(name), 6, 4
    ids, mask = contexts("padded", B)
    if dev == "cuda":                                              # the real kernel (and a GPU's autocast)
        model, ids, mask = copy.deepcopy(model).cuda(), ids.cuda(), mask.cuda()
    elif os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)")
    P = ids.shape[1]
    toks = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(5)).to(ids.device)
    with torch.no_grad():
        want = forward_logits(model, ids, mask, toks).float()

    def run(fused, amp):
        monkeypatch.setattr(D, "FUSED_NORMS", "always" if fused else "off")
        dec = decoder(model, B, P + T, attention="sdpa", **mode)
        ctx = contextlib.nullcontext
        if amp:
            dec.cast_gemm_weights(torch.bfloat16)
            ctx = lambda: torch.autocast(dev, dtype=torch.bfloat16, cache_enabled=False)  # noqa: E731
        out = decoded(dec, ids, mask, toks, ctx).float()
        assert dec.fuse_norms == fused
        return out

    torch.testing.assert_close(run(True, False), want, atol=2e-5 if dev == "cpu" else 1e-4, rtol=0)
    # the interpreter rounds float32 to bf16 toward zero (a GPU to nearest): a biased rounding, larger errors
    fused, plain = run(True, True), run(False, True)
    bf16_err = (plain - want).abs().max()
    assert 0 < bf16_err < 0.05 * want.abs().max() and (fused - want).abs().max() <= 3 * bf16_err
    monkeypatch.setattr(D, "FUSED_NORMS", "sometimes")
    with pytest.raises(ValueError, match="FUSED_NORMS"):
        decoder(model, B, P + T, attention="sdpa").prefill(ids, mask)
    if dev == "cpu":
        monkeypatch.setattr(D, "FUSED_NORMS", "always")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            decoder(model, B, P + T, attention="sdpa").prefill(ids, mask)


def test_bf16_weights():
    """bf16 weights on the CPU take the SDPA layout and stay within bf16 rounding of the model's forward."""
    model = build_tiny(V, n_layer=2, n_embd=32, n_head=4, seed=1, initializer_range=0.3).to(torch.bfloat16)
    ids, mask = contexts("padded", 6)
    toks = torch.randint(1, V, (6, 3), generator=torch.Generator().manual_seed(5))
    dec = decoder(model, 6, ids.shape[1] + 3)
    got = decoded(dec, ids, mask, toks).float()
    with torch.no_grad():
        want = forward_logits(model, ids, mask, toks).float()
    assert not dec.slab and dec.k.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0)


def test_bad_inputs():
    model = get("gpt2")
    dec = decoder(model, 4, 3)
    with pytest.raises(ValueError, match="context_ids"):
        dec.prefill(torch.ones(5, 1, dtype=torch.long), None)
    with torch.no_grad():
        dec.prefill(torch.ones(4, 2, dtype=torch.long), None)
        dec.step(torch.ones(4, dtype=torch.long))
        with pytest.raises(ValueError, match="full"):
            dec.step(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention"):
        decoder(model, 4, 3, attention="flash")
    with pytest.raises(ValueError, match="max_length"):
        sample(model, 4, 0, eos_token_id=0)
    short = build_tiny(V, n_layer=1, n_embd=16, n_head=2, n_positions=6)
    with pytest.raises(ValueError, match="n_positions"):
        sample(short, 4, 6, eos_token_id=None, context_ids=torch.ones(4, 2, dtype=torch.long))
    assert sample(short, 4, 4, eos_token_id=None, context_ids=torch.ones(4, 2, dtype=torch.long)).tokens.shape == (4, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_steps_equal_eager_steps(name, amp):
    """Steps replayed from a CUDA graph give the eager steps' logits, and sampling through them the same draws."""
    import contextlib
    import copy

    model = copy.deepcopy(get(name)).cuda()
    B, T = 6, 5
    ids, mask = contexts("padded", B)
    ids, mask = ids.cuda(), mask.cuda()
    P = ids.shape[1]
    toks = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(5)).cuda()
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if amp else contextlib.nullcontext
    runs = []
    for kw in (dict(), dict(static=True, cuda_graph=True)):
        dec = decoder(model, B, P + T, **kw)
        for rows, m in ((ids, mask), (ids.flip(0), mask.flip(0))):   # two passes of one decoder: captured anew
            runs.append(decoded(dec, rows, m, toks, ctx).float())
    assert dec._graph is not None and dec.cuda_graph                  # captured, not fallen back
    tol = 3e-2 * runs[0].abs().max().item() if amp else 2e-5
    torch.testing.assert_close(runs[2], runs[0], atol=tol, rtol=0)
    torch.testing.assert_close(runs[3], runs[1], atol=tol, rtol=0)
    draws = [sample(model, B, 8, eos_token_id=0, context_ids=ids, context_mask=mask, cuda_graph=g,
                    generator=torch.Generator("cuda").manual_seed(3)) for g in (False, True)]
    assert torch.equal(draws[0].tokens, draws[1].tokens)
    torch.testing.assert_close(draws[0].logprob, draws[1].logprob, atol=1e-4, rtol=0)
