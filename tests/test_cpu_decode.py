"""The native CPU sampling loop (fdpg/cpu_decode.c) against sample()'s Python loop over the same decoder."""
import copy
import platform

import pytest
import torch

import _tiny
import fdpg.cpu_decode as native
from fdpg.decode import decoder
from fdpg.models import model_inputs
from fdpg.sampling import left_pad, sample

V = 29


def gpt2(act="gelu_new", dtype=torch.float64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=40, n_embd=48, n_layer=2, n_head=3, resid_pdrop=0,
                                       embd_pdrop=0, attn_pdrop=0, initializer_range=0.25,
                                       activation_function=act, bos_token_id=1, eos_token_id=0))
    return m.eval().to(dtype)


def llama(dtype=torch.float32, seed=0, **kw):
    return _tiny.llama(V, seed, **{"intermediate_size": 40, "initializer_range": 0.25, **kw}).to(dtype)


def contexts(kind, B):
    if kind == "bos":
        return None, None
    g = torch.Generator().manual_seed(B)
    return left_pad([torch.randint(1, V, (1 + i % 5,), generator=g).tolist() for i in range(B)], pad_id=0)


def both(monkeypatch, model, B, T, **kw):
    """sample() through the native loop and through the Python loop, from the same seed: the two Samples and the
    next uniform each leaves in its generator."""
    out = []
    for off in ("1", "0"):
        monkeypatch.setenv("FDPG_CPU_DECODE", off)
        g = torch.Generator().manual_seed(11)
        s = sample(model, B, T, generator=g, **kw)
        out += [s, torch.rand(3, generator=g)]
    return out


def native_and_torch(monkeypatch, model, ids, mask=None):
    """``hidden_states`` of ``ids`` without autograd through the native forward, then through the torch one."""
    from fdpg.decode import hidden_states

    with torch.no_grad():
        got = hidden_states(model, ids, mask)
        monkeypatch.setenv("FDPG_CPU_DECODE", "0")
        want = hidden_states(model, ids, mask)
        monkeypatch.delenv("FDPG_CPU_DECODE")
    return got, want


def test_available_here():
    """CI's machine has a C compiler: the native loop must load (or every comparison is vacuous)."""
    dec = decoder(gpt2(), 4, 8)
    dec.prefill(torch.ones(4, 1, dtype=torch.long), None)
    assert native.unavailable_reason(dec) is None


def test_shares_torchs_openmp_runtime():
    """The native library's threads are those of the OpenMP runtime torch loaded (one libgomp in the process): a
    second runtime's threads would compete for the cores with torch's spinning workers."""
    try:
        with open("/proc/self/maps") as f:
            before = {ln.split()[-1] for ln in f if "libgomp" in ln}
    except OSError:
        pytest.skip("no /proc/self/maps")
    if not before:
        pytest.skip("torch has not loaded libgomp (another OpenMP runtime)")
    assert native._library_reason(torch.float32) is None and native._library_reason(torch.float64) is None
    with open("/proc/self/maps") as f:
        after = {ln.split()[-1] for ln in f if "libgomp" in ln}
    assert after == before


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("ctx", ["bos", "padded"])
@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu"])
def test_native_loop_equals_the_python_loop(monkeypatch, threads, ctx, act):
    """float64, B = 13 rows split over 1-3 threads, EOS ending rows at different steps: the same tokens, mask and
    log-probs, the same generator state after, and the same replayed logits."""
    torch.set_num_threads(threads)
    try:
        model, B, T = gpt2(act), 13, 9
        ids, mask = contexts(ctx, B)
        a, ua, b, ub = both(monkeypatch, model, B, T, eos_token_id=0, context_ids=ids, context_mask=mask,
                            record=True)
    finally:
        torch.set_num_threads(1)
    assert a.tokens.shape == b.tokens.shape and torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    n = a.mask.sum(1)
    assert bool((n < a.tokens.shape[1]).any()) and bool((n > 1).any())       # EOS ended some rows, not all at once
    torch.testing.assert_close(a.token_logprob, b.token_logprob, atol=2e-6, rtol=0)   # (float32 softmax both)
    assert torch.equal(ua, ub)
    torch.testing.assert_close(a.replay(), b.replay(), atol=1e-10, rtol=1e-10)


LLAMAS = {"gqa": {}, "bias-rope-hd": dict(seed=2, num_key_value_heads=4, head_dim=12, attention_bias=True,
                                           mlp_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 500.0})}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("ctx", ["bos", "padded"])
@pytest.mark.parametrize("name", list(LLAMAS))
def test_native_llama_loop_equals_the_python_loop(monkeypatch, threads, ctx, name):
    """Llama (float32; grouped-query attention, and biases, scaled RoPE and a head dim other than d / heads): B = 19
    rows over 1-3 threads, EOS ending rows: the native pass draws the same tokens from the same uniforms, with the
    same log-probs and replayed logits to float32 rounding; the native loop did run."""
    model, B, T = llama(**LLAMAS[name]), 19, 9
    with torch.no_grad():                                          # EOS (token 0) likelier: rows end early
        model.lm_head.weight[0].mul_(2.0)
        model.model.norm.weight.mul_(2.0)
    ids, mask = contexts(ctx, B)
    calls = []
    real = native._call
    monkeypatch.setattr(native, "_call", lambda fn, *a: calls.append(fn) or real(fn, *a))
    torch.set_num_threads(threads)
    try:
        a, ua, b, ub = both(monkeypatch, model, B, T, eos_token_id=0, context_ids=ids, context_mask=mask,
                            record=True)
    finally:
        torch.set_num_threads(1)
    assert native._load(torch.float32).sample in calls
    assert a.tokens.shape == b.tokens.shape and torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    n = a.mask.sum(1)
    assert bool((n < a.tokens.shape[1]).any()) and bool((n > 1).any())
    torch.testing.assert_close(a.token_logprob, b.token_logprob, atol=2e-5, rtol=0)
    assert torch.equal(ua, ub)
    torch.testing.assert_close(a.replay(), b.replay(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("every", [1, 3])
def test_early_stop_and_float32(monkeypatch, every):
    """Every row ends early (EOS likely): the pass stops at the first stop check after the last EOS, as the Python
    loop does; float32 weights."""
    model = gpt2(seed=3, dtype=torch.float32)
    with torch.no_grad():
        model.transformer.ln_f.bias.copy_(1.4 * model.lm_head.weight[0])   # EOS (token 0) more likely
    a, ua, b, ub = both(monkeypatch, model, 24, 30, eos_token_id=0, stop_check_every=every)
    assert a.tokens.shape[1] < 30 and a.tokens.shape == b.tokens.shape
    assert (a.tokens.shape[1] % every == 0) or a.tokens.shape[1] == 30
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(ua, ub)
    torch.testing.assert_close(a.token_logprob, b.token_logprob, atol=2e-5, rtol=0)


def test_no_eos_and_one_token(monkeypatch):
    model = gpt2(seed=4)
    a, ua, b, ub = both(monkeypatch, model, 5, 7, eos_token_id=None)
    assert a.tokens.shape == (5, 7) and bool(a.mask.all()) and torch.equal(a.tokens, b.tokens)
    assert torch.equal(ua, ub)
    a, ua, b, ub = both(monkeypatch, model, 1, 1, eos_token_id=0)
    assert a.tokens.shape == (1, 1) and torch.equal(a.tokens, b.tokens) and torch.equal(ua, ub)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replay_of_the_native_pass_has_the_forward_pass_gradients(family):
    """The recording the native loop writes, replayed with autograd, against a fresh forward pass: GPT-2 in float64;
    Llama in float32 (q and k recorded before RoPE, o, gate, up, down; biases, scaled RoPE), 17 rows."""
    model, B, tol = (gpt2("gelu_new"), 6, 1e-10) if family == "gpt2" else (llama(**LLAMAS["bias-rope-hd"]), 17, 1e-4)
    T = 7
    ids, mask = contexts("padded", B)
    s = sample(model, B, T, eos_token_id=None, context_ids=ids, context_mask=mask, record=True,
               generator=torch.Generator().manual_seed(5))
    w = torch.randn(B, T, V, dtype=model.dtype, generator=torch.Generator().manual_seed(7))

    def run(f):
        model.zero_grad(set_to_none=True)
        z = f()
        (z * w).sum().backward()
        return z.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    z_rep, g_rep = run(lambda: s.replay())
    inp = model_inputs(s.context_ids, s.context_mask, s.tokens)
    P = ids.shape[1]
    z_fwd, g_fwd = run(lambda: model(input_ids=inp.input_ids, attention_mask=inp.attention_mask,
                                     position_ids=inp.position_ids).logits[:, P - 1:P + T - 1])
    torch.testing.assert_close(z_rep, z_fwd, atol=tol, rtol=tol)
    for n in g_fwd:
        torch.testing.assert_close(g_rep[n], g_fwd[n], atol=tol, rtol=10 * tol, msg=n)


def test_nan_weights_give_nan_logprobs_not_silent_numbers(monkeypatch):
    model = copy.deepcopy(gpt2(seed=6))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="sample: the model's logits hold NaN"):
        both(monkeypatch, model, 4, 3, eos_token_id=None)       # values checked: by default on the CPU
    monkeypatch.setenv("FDPG_VALIDATE", "0")                     # unchecked (a GPU's default): NaN, not numbers
    a, _, b, _ = both(monkeypatch, model, 4, 3, eos_token_id=None)
    assert bool(a.token_logprob.isnan().all()) and bool(b.token_logprob.isnan().all())


def test_unavailable_where_the_python_loop_runs(monkeypatch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=24)).eval()
    cases = {"GPT-2 and Llama only": (neox, {}), "not on the CPU slab": (gpt2(dtype=torch.bfloat16), {}),
             "all_done": (gpt2(), {"all_done": lambda x: x}), "float64": (llama(dtype=torch.float64), {}),
             "activation": (llama(hidden_act="gelu"), {})}
    for why, (model, kw) in cases.items():
        dec = decoder(model, 2, 4)
        dec.prefill(torch.ones(2, 1, dtype=torch.long), None)
        assert why in native.unavailable_reason(dec, **kw)
    monkeypatch.setattr(native, "LLAMA_MAX_BYTES", 1000)
    dec = decoder(llama(), 2, 4)
    dec.prefill(torch.ones(2, 1, dtype=torch.long), None)
    assert "LLAMA_MAX_BYTES" in native.unavailable_reason(dec)
    monkeypatch.setenv("FDPG_CPU_DECODE", "0")
    dec = decoder(gpt2(), 2, 4)
    dec.prefill(torch.ones(2, 1, dtype=torch.long), None)
    assert "FDPG_CPU_DECODE=0" in native.unavailable_reason(dec)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 2e-6)])
def test_activation_and_the_no_grad_forward(dtype, tol, monkeypatch):
    """The C activation (the prior's no-grad forward) against the modules, odd sizes and 1-3 threads; autograd
    wanted, or a tensor too small to be worth the threads -> None (the module runs); fdpg's forward under inference
    mode through it equals the model's."""
    import transformers.activations as A

    from fdpg.decode import hidden_states

    x = torch.randn(37, 53, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 3
    assert native.activation(x, A.NewGELUActivation()) is None             # 1961 elements: ATen's kernel
    monkeypatch.setattr(native, "_ACT_MIN", 1)
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            for act in (A.NewGELUActivation(), A.GELUActivation(), A.GELUTanh(), torch.nn.ReLU()):
                torch.testing.assert_close(native.activation(x, act), act(x), atol=tol, rtol=tol)
        finally:
            torch.set_num_threads(1)
    assert native.activation(x.requires_grad_(), A.NewGELUActivation()) is None
    assert native.activation(x.detach(), torch.nn.SiLU()) is None
    model = gpt2("gelu_new", dtype=dtype)
    ids, mask = contexts("padded", 5)
    with torch.inference_mode():
        got = hidden_states(model, ids, mask)
        pos = (mask.long().cumsum(1) - 1).clamp_min(0)
        want = model.transformer(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    torch.testing.assert_close(got[mask], want[mask], atol=50 * tol, rtol=50 * tol)


def test_retain_heap(monkeypatch):
    """glibc keeps freed memory for reuse once a CPU trainer starts (no page faults on each step's large tensors);
    the environment can keep it from doing so."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    import os

    for k in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES", "FDPG_MALLOC"]:
        monkeypatch.delenv(k, raising=False)
    assert native.retain_heap() == native.retain_heap()                                 # once per process
    assert native._tune_heap() is None                                                  # glibc takes the settings
    monkeypatch.setenv("FDPG_MALLOC", "0")
    assert native._tune_heap() == "FDPG_MALLOC=0"
    monkeypatch.delenv("FDPG_MALLOC")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert "environment" in native._tune_heap()


@pytest.mark.parametrize("threads,chunk", [(1, 64 << 20), (3, 64 << 20), (2, 1)])
@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu"])
def test_native_forward_equals_the_torch_forward(monkeypatch, threads, chunk, act):
    """The scoring forward in one native call (no autograd: the prior's pass) against fdpg's torch forward, float64:
    left-padded and unpadded rows, rows split over threads (and in chunks of one row); positions past the padding
    compared."""
    monkeypatch.setattr(native, "FORWARD_CHUNK_BYTES", chunk)
    torch.set_num_threads(threads)
    try:
        model = gpt2(act, seed=2)
        B = 7
        ids, mask = contexts("padded", B)
        plain = torch.randint(0, V, (B, 9), generator=torch.Generator().manual_seed(3))
        calls = []
        real = native.forward
        monkeypatch.setattr(native, "forward", lambda *a: calls.append(1) or real(*a))
        for x, m in ((ids, mask), (plain, None)):
            got, want = native_and_torch(monkeypatch, model, x, m)
            keep = torch.ones_like(x, dtype=torch.bool) if m is None else m
            torch.testing.assert_close(got[keep], want[keep], atol=1e-12, rtol=1e-12)
            assert bool(torch.isfinite(got).all())
        assert len(calls) == 4                     # both passes ask it (FDPG_CPU_DECODE=0: it answers None)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_forward_through_row_blocks(monkeypatch, dtype, tol, threads):
    """Chunks of 16 rows (8 in float64): their attention through blocks of rows as vectors (attention_lanes, over a
    copy of qkv with the batch innermost), the chunk's other rows one by one: against the torch forward, padded."""
    torch.set_num_threads(threads)
    try:
        model = gpt2(seed=4).to(dtype)
        B = 40
        ids, mask = contexts("padded", B)
        got, want = native_and_torch(monkeypatch, model, ids, mask)
        torch.testing.assert_close(got[mask], want[mask], atol=tol, rtol=tol)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("threads,chunk", [(1, 64 << 20), (3, 64 << 20), (2, 1)])
@pytest.mark.parametrize("name", list(LLAMAS))
def test_native_llama_forward_equals_the_torch_forward(monkeypatch, threads, chunk, name):
    """Llama's scoring forward in one native call (float32; GQA, and biases, scaled RoPE, head dim off d / heads):
    left-padded and unpadded rows, 37 of them (blocks of 16 rows and single rows in attention), over 1-3 threads
    and in chunks of one row, against fdpg's torch forward; the native call did run. float64 stays in torch."""
    monkeypatch.setattr(native, "FORWARD_CHUNK_BYTES", chunk)
    model = llama(**LLAMAS[name])
    ids, mask = contexts("padded", 37)
    plain = torch.randint(0, V, (37, 9), generator=torch.Generator().manual_seed(3))
    calls = []
    real = native._call
    monkeypatch.setattr(native, "_call", lambda fn, *a: calls.append(fn) or real(fn, *a))
    torch.set_num_threads(threads)
    try:
        for x, m in ((ids, mask), (plain, None)):
            got, want = native_and_torch(monkeypatch, model, x, m)
            keep = torch.ones_like(x, dtype=torch.bool) if m is None else m
            torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=2e-5)
    finally:
        torch.set_num_threads(1)
    assert calls.count(native._load(torch.float32).forward) == 2
    assert native.forward(decoder(model.double(), 2, 3), torch.zeros(2, 3, dtype=torch.long)) is None


def test_native_llama_weights_follow_updates(monkeypatch):
    """The transposed Linear weights the native Llama code reads are made once and kept while the weight is
    unchanged; an in-place update (an optimizer step) is seen at the next call; they go with the model."""
    import gc

    model = llama()
    ids = torch.randint(0, V, (5, 7), generator=torch.Generator().manual_seed(4))
    before = len(native._transposed_cache)
    got, want = native_and_torch(monkeypatch, model, ids)
    n = len(native._transposed_cache)
    assert n == before + 14                                    # 7 Linears a layer, 2 layers
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(-2.0)
    got2, want2 = native_and_torch(monkeypatch, model, ids)
    assert len(native._transposed_cache) == n and not torch.allclose(got, got2)
    torch.testing.assert_close(got2, want2, atol=2e-5, rtol=2e-5)
    # updates that leave the version counter alone: through .data, and torch's fused AdamW (the trainer's on the CPU)
    w = model.model.layers[0].mlp.down_proj.weight
    v = w._version
    w.data.mul_(0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert w._version == v
    got3, want3 = native_and_torch(monkeypatch, model, ids)
    assert not torch.allclose(got2, got3)
    torch.testing.assert_close(got3, want3, atol=2e-5, rtol=2e-5)
    del model, opt, w, p
    gc.collect()
    assert len(native._transposed_cache) == before


def test_native_forward_only_without_autograd():
    """With autograd wanted (the policy's scoring pass), under autocast, or in half precision the torch forward runs."""
    from fdpg.decode import _GPT2

    model = gpt2(dtype=torch.float32)
    ids = torch.randint(0, V, (3, 5))
    dec = _GPT2(model, 3, 5)
    seen = []
    dec._native_forward = lambda x: seen.append(native.forward(dec, x))
    dec.forward(ids, None)                                    # grad enabled, weights require grad
    with torch.no_grad():
        dec.forward(ids, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dec.forward(ids, None)
    assert seen[0] is None and seen[1] is not None and seen[2] is None
    h = seen[1]
    assert h.shape == (3, 5, 48) and h.dtype == torch.float32
    bad = ids.clone()
    bad[1, 2] = V                                             # out of the vocabulary: never read natively
    with torch.no_grad():
        with pytest.raises(IndexError):
            dec.forward(bad, None)
    assert seen[-1] is None


def test_builds_without_openmp(monkeypatch, tmp_path):
    """Where the compiler has no OpenMP the library is built single-threaded (-DFDPG_NO_OPENMP) and computes the
    same: the sampling pass and the native forward against the Python loop and the torch forward."""
    real = native._compile_with

    def no_openmp(cc, flags, double):
        if "-fopenmp" in flags:
            raise OSError("cc: unsupported option '-fopenmp'")
        return real(cc, flags, double)

    monkeypatch.setattr(native, "_compile_with", no_openmp)
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setenv("FDPG_CACHE_DIR", str(tmp_path))
    model = gpt2()
    a, ua, b, ub = both(monkeypatch, model, 5, 6, eos_token_id=0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(ua, ub)
    torch.testing.assert_close(a.token_logprob, b.token_logprob, atol=1e-6, rtol=0)          # (float32 draws)
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    got, want = native_and_torch(monkeypatch, model, ids)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert len(list(tmp_path.glob("cpu_decode_f64_*.so"))) == 1                         # the fallback build


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
def test_builds_for_avx2(monkeypatch, tmp_path):
    """Built for a CPU without AVX-512 (the GEMM's 6-row tiles of 8-float vectors): the sampling pass (GPT-2 and
    Llama), the native forward and the attention over blocks of rows (with its gradients) compute the same, float32
    and float64."""
    real = native._compile_with
    monkeypatch.setattr(native, "_compile_with", lambda cc, flags, double: real(cc, [*flags, "-mno-avx512f"], double))
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setenv("FDPG_CACHE_DIR", str(tmp_path))
    model = gpt2()
    a, ua, b, ub = both(monkeypatch, model, 5, 6, eos_token_id=0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(ua, ub)
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        got, want = native_and_torch(monkeypatch, model.to(dtype), ids)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    model.double()
    test_native_attention_against_float64(torch.float32, 2e-5, 21, 9, 4, 2, 5)
    test_native_llama_loop_equals_the_python_loop(monkeypatch, 2, "padded", "bias-rope-hd")
    assert len(list(tmp_path.glob("cpu_decode_f*_*.so"))) == 2


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_native_forward_odd_head_dims(monkeypatch, dtype, tol):
    """Head dims that are not a multiple of the vector width (15, 5, 36; one and several vectors), positions past one
    vector of keys (33), a left-padded row: the native forward against the torch forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(2)
    try:
        for d, H, s in ((60, 4, 9), (20, 4, 33), (72, 2, 5)):      # (72: the MLP's K = 288 in two blocks)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(d)
                m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=40, n_embd=d, n_layer=2, n_head=H,
                                               initializer_range=0.3, bos_token_id=1, eos_token_id=0))
            m = m.eval().to(dtype)
            ids = torch.randint(0, V, (3, s), generator=torch.Generator().manual_seed(s))
            mask = torch.ones(3, s, dtype=torch.bool)
            mask[1, :s // 2] = False
            got, want = native_and_torch(monkeypatch, m, ids, mask)
            torch.testing.assert_close(got[mask], want[mask], atol=tol, rtol=tol)
    finally:
        torch.set_num_threads(1)


def attention_reference(q, k, v, valid, scale):
    """Causal attention in float64 under the scoring mask (valid keys at or before the query; a padding query sees
    itself only): ``[B, s, H * hd]``."""
    B, s, H, hd = q.shape
    G = H // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    if valid is not None:
        allowed = (allowed & valid[:, None, None, :]) | torch.eye(s, dtype=torch.bool)
    sc = torch.einsum("bthe,bjhe->bhtj", q, k).mul(scale).masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhtj,bjhe->bthe", sc.softmax(-1), v).reshape(B, s, H * hd)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("B,s,H,Hkv,hd", [(3, 7, 4, 2, 5), (5, 33, 2, 2, 16), (2, 1, 3, 1, 4), (4, 18, 4, 4, 40),
                                          (21, 9, 4, 2, 5), (16, 17, 2, 1, 16)])
def test_native_attention_against_float64(dtype, tol, B, s, H, Hkv, hd):
    """The native attention's output and q/k/v gradients against float64 autograd: GQA, head dims off the vector
    width, one position, positions past a vector of keys and off the query block; q, k, v packed (one gradient
    tensor) and separate; the slab's strides (batch innermost: from 16 rows (8 float64) on, blocks of rows as
    vectors, the rest row by row); left padding, a row all padding; 1 and 3 threads."""
    g = torch.Generator().manual_seed(s * hd + H)
    base = torch.randn(s, (H + 2 * Hkv) * hd, B, dtype=dtype, generator=g)
    x = base.permute(2, 0, 1).reshape(B, s, H + 2 * Hkv, hd).requires_grad_()
    valid = torch.arange(s)[None] >= torch.randint(0, s + 1, (B,), generator=g)[:, None]
    w = torch.randn(B, s, H * hd, dtype=dtype, generator=g)
    xd = x.detach().double().requires_grad_()
    for mask in (valid, None):
        (attention_reference(xd[:, :, :H], xd[:, :, H:H + Hkv], xd[:, :, H + Hkv:], mask, 0.37) * w).sum().backward()
        want, xd.grad = xd.grad, None
        ref = attention_reference(xd[:, :, :H], xd[:, :, H:H + Hkv], xd[:, :, H + Hkv:], mask, 0.37)
        for threads, packed in ((1, True), (3, False)):
            torch.set_num_threads(threads)
            try:
                qkv = x if packed else (x[:, :, :H], x[:, :, H:H + Hkv], x[:, :, H + Hkv:])
                o = native.attention(qkv, mask, 0.37, H, Hkv)
                (o * w).sum().backward()
            finally:
                torch.set_num_threads(1)
            assert o.shape == (B, s, H * hd) and o.dtype == dtype and o.is_contiguous()
            torch.testing.assert_close(o.double(), ref.detach(), atol=tol, rtol=tol)
            torch.testing.assert_close(x.grad.double(), want, atol=tol, rtol=tol)
            x.grad = None


def test_native_attention_declines_and_keeps_nan(monkeypatch):
    """Half precision, autocast or FDPG_CPU_DECODE=0 -> None (the torch attention runs); a NaN in one key gives NaN
    outputs for the queries that see it, not silent numbers."""
    q = torch.randn(2, 5, 2, 4)
    assert native.attention((q.bfloat16(), q.bfloat16(), q.bfloat16()), None, 0.5, 2, 2) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert native.attention((q, q, q), None, 0.5, 2, 2) is None
    k = q.clone()
    k[0, 2, 1, 3] = float("nan")
    o = native.attention((q, k, q), None, 0.5, 2, 2).view(2, 5, 2, 4)
    assert bool(o[0, 2:, 1].isnan().all()) and bool(torch.isfinite(o[0, :2]).all() and torch.isfinite(o[1]).all())
    assert bool(torch.isfinite(o[0, :, 0]).all())
    # the same through blocks of rows (the slab's layout, batch innermost)
    x = torch.randn(5, 6, 16).permute(2, 0, 1).reshape(16, 5, 6, 1).repeat_interleave(4, 3)   # [16, 5, 6, 4]
    x = x.permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)                                # (batch stride 1)
    x[0, 2, 3, 3] = float("nan")                                                              # a key of head 1
    o = native.attention(x, None, 0.5, 2, 2).view(16, 5, 2, 4)
    assert bool(o[0, 2:, 1].isnan().all()) and bool(torch.isfinite(o[0, :2]).all() and torch.isfinite(o[1:]).all())
    assert bool(torch.isfinite(o[0, :, 0]).all())
    monkeypatch.setenv("FDPG_CPU_DECODE", "0")
    assert native.attention((q, q, q), None, 0.5, 2, 2) is None


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 3e-6)])
@pytest.mark.parametrize("a_t", [False, True])
@pytest.mark.parametrize("M,K,N,threads", [(1, 1, 1, 1), (13, 7, 33, 2), (9, 300, 70, 1), (35, 520, 129, 3),
                                           (6, 31, 16, 2), (70, 5, 300, 3), (130, 9, 20, 2)])
def test_gemm_against_float64(dtype, tol, a_t, M, K, N, threads):
    """The library's GEMM (register tiles of 8/6, 4, 2, 1 rows by two vectors, the rest of the columns plainly, K in
    blocks of 256) over row tails, column tails and K past a block, A row-major or transposed, with and without C,
    on one thread and on several (the output cut by columns or by rows)."""
    g = torch.Generator().manual_seed(M * N + K)
    a = torch.randn(K, M, generator=g, dtype=dtype).t() if a_t else torch.randn(M, K, generator=g, dtype=dtype)
    w, c = torch.randn(K, N, generator=g, dtype=dtype), torch.randn(M, N, generator=g, dtype=dtype)
    want = a.double() @ w.double()
    got = native.gemm(a, w, threads=threads)
    assert got is not None and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol * K ** 0.5, rtol=0)
    out = c.clone()
    assert native.gemm(a, w, out, threads) is out
    torch.testing.assert_close(out.double(), want + c.double(), atol=tol * K ** 0.5, rtol=0)


def test_gemm_empty():
    """No rows or no columns: an empty result; no depth: zeros (or C unchanged)."""
    assert native.gemm(torch.randn(0, 5), torch.randn(5, 7)).shape == (0, 7)
    assert native.gemm(torch.randn(4, 5), torch.randn(5, 0)).shape == (4, 0)
    assert torch.equal(native.gemm(torch.randn(4, 0), torch.randn(0, 7)), torch.zeros(4, 7))
    c = torch.randn(4, 7)
    assert torch.equal(native.gemm(torch.randn(4, 0), torch.randn(0, 7), c.clone()), c)
