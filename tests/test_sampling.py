"""Ancestral sampling with the KV cache: masks, the proposal's log-probs, the distribution, contexts."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdpg
from fdpg.exact import enumerate_space, space_logprobs
from fdpg.models import build_tiny, model_inputs, score_tokens
from fdpg.sampling import cat_samples, left_pad, sample

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return build_tiny(5, n_layer=2, n_embd=16, seed=3, eos_token_id=0, initializer_range=0.4)


def rescore(model, s):
    inp = model_inputs(s.context_ids, s.context_mask, s.tokens)
    lp, _ = score_tokens(model, None, inp, s.tokens, fused=False, with_prior=False, policy_grad=False)
    return fdpg.sequence_logprobs(lp, s.mask)


def test_mask_eos_and_padding(model):
    s = sample(model, 256, 6, eos_token_id=0, generator=torch.Generator().manual_seed(0))
    assert s.tokens.shape[0] == 256 and s.tokens.shape[1] <= 6 and s.tokens.dtype == torch.long
    n = s.mask.sum(1)
    assert bool((n >= 1).all())
    for row, m, k in zip(s.tokens.tolist(), s.mask.tolist(), n.tolist()):
        assert m == [True] * k + [False] * (len(m) - k)           # a prefix
        body = row[:k]
        assert 0 not in body[:-1]                                 # EOS only as the last token
        assert body[-1] == 0 or k == 6                            # ends at EOS or at the limit
        assert all(t == 0 for t in row[k:])                       # padding
    assert bool((s.token_logprob[~s.mask] == 0).all())
    assert bool((n < 6).any()) and bool((n == 6).any() or s.tokens.shape[1] < 6)


def test_logprob_from_the_sampling_pass_matches_a_full_forward(model):
    s = sample(model, 64, 5, eos_token_id=0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s.logprob, rescore(model, s), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.logprob, s.token_logprob.sum(1))


def test_samples_follow_the_model_distribution(model):
    space = enumerate_space(5, 3, 0)
    p = space_logprobs(model, space).exp()
    n = 20000
    s = sample(model, n, 3, eos_token_id=0, generator=torch.Generator().manual_seed(2))
    index = {tuple(r[:k]): i for i, (r, k) in enumerate(zip(space.tokens.tolist(), space.mask.sum(1).tolist()))}
    idx = torch.tensor([index[tuple(r[:k])] for r, k in zip(s.tokens.tolist(), s.mask.sum(1).tolist())])
    freq = torch.bincount(idx, minlength=len(space)).double() / n
    # chi-square against the exact probabilities: mean ~ dof (len - 1), sd ~ sqrt(2 dof)
    chi2 = (n * (freq - p) ** 2 / p).sum().item()
    dof = len(space) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)


def test_no_eos_gives_full_length(model):
    s = sample(model, 16, 4, eos_token_id=None, bos_token_id=0, generator=torch.Generator().manual_seed(0))
    assert s.tokens.shape == (16, 4) and bool(s.mask.all())


def test_seeded_generator_is_reproducible(model):
    a = sample(model, 32, 5, eos_token_id=0, generator=torch.Generator().manual_seed(7))
    b = sample(model, 32, 5, eos_token_id=0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprob, b.logprob)


def test_left_padded_contexts(model):
    contexts = [[0, 3, 2], [0], [0, 4]]
    ids, mask = left_pad(contexts, pad_id=0)
    assert ids.tolist() == [[0, 3, 2], [0, 0, 0], [0, 0, 4]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    reps = 8
    ids, mask = ids.repeat_interleave(reps, 0), mask.repeat_interleave(reps, 0)
    idx = torch.arange(3).repeat_interleave(reps)
    s = sample(model, 3 * reps, 4, eos_token_id=0, context_ids=ids, context_mask=mask, context_index=idx,
               generator=torch.Generator().manual_seed(3))
    assert torch.equal(s.context_index, idx)
    # the sampling pass's log q equals each continuation scored after its unpadded context
    for i in range(3 * reps):
        c = torch.tensor([contexts[i // reps]])
        k = int(s.mask[i].sum())
        toks = s.tokens[i:i + 1, :k]
        inp = model_inputs(c, None, toks)
        lp, _ = score_tokens(model, None, inp, toks, fused=False, with_prior=False, policy_grad=False)
        assert s.logprob[i].item() == pytest.approx(lp.sum().item(), abs=1e-5)
    # and the padded batch scored in one pass agrees as well
    torch.testing.assert_close(s.logprob, rescore(model, s), atol=1e-5, rtol=0)
    assert left_pad([[1, 2], [3, 4]], 0)[1] is None
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], 0)


def test_cat_samples(model):
    g = torch.Generator().manual_seed(4)
    a = sample(model, 8, 2, eos_token_id=0, generator=g)
    b = sample(model, 8, 5, eos_token_id=0, generator=g)
    c = cat_samples([a, b], pad_id=0)
    assert len(c) == 16 and c.tokens.shape[1] == max(a.tokens.shape[1], b.tokens.shape[1])
    torch.testing.assert_close(c.logprob, rescore(model, c), atol=1e-5, rtol=0)


def test_all_done_decides_the_early_stop(model):
    """``all_done`` (FSDP: all ranks agree) decides when decoding stops; the draws do not depend on it."""
    calls = []

    def never(local):                      # another rank is still decoding
        calls.append(local)
        return False

    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    short = sample(model, 8, 30, eos_token_id=0, generator=g())
    full = sample(model, 8, 30, eos_token_id=0, generator=g(), all_done=never)
    assert full.tokens.shape[1] == 30 and len(calls) == 29
    T = short.tokens.shape[1]
    assert torch.equal(full.tokens[:, :T], short.tokens) and bool((full.tokens[:, T:] == 0).all())
    assert torch.equal(full.mask[:, :T], short.mask) and not bool(full.mask[:, T:].any())
    torch.testing.assert_close(full.logprob, short.logprob)
    # stopping at the first check, whatever this batch says
    assert sample(model, 8, 30, eos_token_id=0, generator=g(), all_done=lambda local: True).tokens.shape[1] == 1
    assert torch.equal(sample(model, 8, 30, eos_token_id=0, generator=g(), all_done=lambda local: local).tokens,
                       short.tokens)


def test_fused_scoring_casts_the_output_layer_like_autocast(model, monkeypatch):
    """Under autocast the fused output-layer op gets the hidden states and weights in the autocast dtype (as
    F.linear would), with the gradient flowing back to the float32 weight; the logits path agrees."""
    s = sample(model, 8, 5, eos_token_id=0, generator=torch.Generator().manual_seed(2))
    inp = model_inputs(s.context_ids, s.context_mask, s.tokens)
    seen = []
    real = fdpg.paired_linear_token_logprobs

    def spy(h, w, ha, wa, *a, **k):
        seen.append((h.dtype, w.dtype, ha.dtype, wa.dtype))
        return real(h, w, ha, wa, *a, **k)

    monkeypatch.setattr(fdpg, "paired_linear_token_logprobs", spy)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, la = score_tokens(model, model, inp, s.tokens, fused=True)
        ref, _ = score_tokens(model, model, inp, s.tokens, fused=False)
    assert seen == [(torch.bfloat16,) * 4]
    m = s.mask
    torch.testing.assert_close(lp[m], ref[m].float(), rtol=0, atol=0.05)
    torch.testing.assert_close(la[m], lp[m].detach())
    lp[m].sum().backward()
    w = model.get_output_embeddings().weight
    assert w.dtype == torch.float32 and w.grad is not None and w.grad.dtype == torch.float32
    assert bool(torch.isfinite(w.grad).all()) and float(w.grad.abs().sum()) > 0
    model.zero_grad()
    seen.clear()
    score_tokens(model, model, inp, s.tokens, fused=True, policy_grad=False)  # no autocast: unchanged dtypes
    assert seen == [(torch.float32,) * 4]


def test_output_layer_auto_takes_the_logits_path_where_they_fit(model, monkeypatch):
    """output_layer "auto" on a GPU: the fused op only where three [rows, V] float32 buffers would take more than a
    quarter of the GPU's memory; "fused"/"logits" as asked; the CPU never fuses under "auto"."""
    from types import SimpleNamespace

    from fdpg.models import use_fused_output

    V = model.get_output_embeddings().weight.shape[0]

    class OnGPU(torch.nn.Module):  # the real model, its parameters reported on a CUDA device
        def __init__(self):
            super().__init__()
            self.m = model
            self.config, self.base_model = model.config, model.base_model

        def get_output_embeddings(self):
            return model.get_output_embeddings()

        def parameters(self, recurse=True):
            return iter([SimpleNamespace(device=torch.device("cuda"))])

    total = 3 * 1000 * V * 4 * 4  # a GPU on which 1000 rows take exactly a quarter
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=total))
    gpu = OnGPU()
    assert use_fused_output(gpu, "auto", 1000) is False
    assert use_fused_output(gpu, "auto", 1001) is True
    assert use_fused_output(gpu, "auto") is True
    assert use_fused_output(gpu, "logits", 10**9) is False
    assert use_fused_output(gpu, "fused", 1) is True
    assert use_fused_output(model, "auto", 10**9) is False  # on the CPU


def test_scoring_forward_stops_at_the_last_scored_position(model):
    """A causal model's hidden states at positions < stop need no later token: the eval-mode forward runs on the
    first ``stop`` positions only, padded contexts included, and agrees with the full forward there."""
    from fdpg.models import _hidden

    gen = torch.Generator().manual_seed(5)
    ctx = torch.randint(1, 5, (3, 4), generator=gen)
    cmask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    toks = torch.randint(0, 5, (3, 6), generator=gen)
    inp = model_inputs(ctx, cmask, toks)
    model.eval()
    with torch.no_grad():
        full = _hidden(model, inp)
        part = _hidden(model, inp, 9)
    assert full.shape[1] == 10 and part.shape[1] == 9
    keep = inp.attention_mask[:, :9].bool()
    torch.testing.assert_close(part[keep], full[:, :9][keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_autocast_pass_casts_the_gemm_weights_once(family, monkeypatch):
    """Under autocast the fast decoder takes the GEMM weights cast once for the pass (not at every step): the same
    draws and log-probs as autocast casting them at every step, and the model's own weights untouched."""
    from fdpg.decode import _FastDecoder

    if family == "gpt2":
        m = build_tiny(7, n_layer=2, n_embd=32, seed=4, eos_token_id=0, initializer_range=0.3).eval()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(4)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=7, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=0,
                                         bos_token_id=0, initializer_range=0.3)).eval()
    before = [p.detach().clone() for p in m.parameters()]
    casts = []
    real = _FastDecoder.cast_gemm_weights

    def spy(self, dtype):
        casts.append(dtype)
        real(self, dtype)
        assert all(b[j].weight.dtype == dtype for b in self.blocks for j in self._GEMMS)

    class Casts(TorchDispatchMode):     # the dtype conversions autocast and the decoder make
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ == "_to_copy"
            return func(*args, **(kwargs or {}))

    def draw(cast):
        monkeypatch.setattr(_FastDecoder, "cast_gemm_weights", spy if cast else (lambda self, dtype: None))
        with Casts() as c:
            s = sample(m, 16, 6, eos_token_id=None, generator=torch.Generator().manual_seed(1),
                       autocast_dtype=torch.bfloat16)
        return s, c.n

    (a, n_cast), (b, n_each) = draw(True), draw(False)
    assert casts == [torch.bfloat16]
    # the prefill and 5 steps each cast at least 2 layers x 4 GEMM weights when the pass does not cast them once
    assert n_each - n_cast >= 5 * 2 * 4
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.token_logprob, b.token_logprob, rtol=0, atol=0)
    assert all(torch.equal(p, q) and p.dtype == torch.float32 for p, q in zip(m.parameters(), before))


# the Triton draw on CPU tensors (the interpreter, in CI) and on a GPU (the gpu marker: the GPU session's tests)
DRAW_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _triton_on(dev):
    import os

    pytest.importorskip("triton")
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)")


@pytest.mark.parametrize("dev", DRAW_DEVICES)
@pytest.mark.parametrize("kw", [dict(eos_token_id=0), dict(eos_token_id=0, stop_check_every=3),
                                dict(eos_token_id=None), dict(eos_token_id=0, padded=True)])
def test_fused_draw_samples_as_the_torch_draw(model, kw, dev, monkeypatch):
    """The sampling loop's draw in one Triton kernel (a GPU's default) against _draw's torch ops and the loop's
    masking: the same tokens, mask and generator state, log-probs to float32 rounding. Hugging Face's forward
    (fast=False): GPT-2 on the CPU would take the native loop."""
    import fdpg.sampling as S

    _triton_on(dev)
    kw = dict(kw)
    B = 40
    m = model.to(dev)
    if kw.pop("padded", False):
        g = torch.Generator().manual_seed(9)
        ids, mask = left_pad([torch.randint(1, 5, (1 + i % 4,), generator=g).tolist() for i in range(B)], 0)
        kw.update(context_ids=ids.to(dev), context_mask=mask.to(dev))
    out = {}
    for setting in ("off", "always"):
        monkeypatch.setattr(S, "FUSED_DRAW", setting)
        g = torch.Generator(dev).manual_seed(4)
        s = sample(m, B, 7, generator=g, fast=False, **kw)
        out[setting] = s, torch.rand(2, generator=g, device=dev)
    (a, ua), (b, ub) = out["off"], out["always"]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(ua, ub)
    torch.testing.assert_close(b.token_logprob, a.token_logprob, atol=2e-6, rtol=0)
    if kw["eos_token_id"] is not None:
        assert bool((~a.mask).any())                              # some rows ended before the others
    monkeypatch.setattr(S, "FUSED_DRAW", "sometimes")
    with pytest.raises(ValueError, match="FUSED_DRAW"):
        sample(m, 2, 2, eos_token_id=0, fast=False)
    model.to("cpu")


@pytest.mark.parametrize("dev", DRAW_DEVICES)
@pytest.mark.filterwarnings("ignore:invalid value encountered")      # the interpreter's numpy on the NaN row
def test_fused_draw_kernel_edges(dev):
    """kernels/sampling.draw on rows the loop can meet: -inf logits (never drawn), one token, a vocabulary over
    several tiles (odd size), half-precision logits, strided rows, NaN/+inf rows (token 0, NaN), EOS bookkeeping."""
    _triton_on(dev)
    from fdpg.kernels.sampling import draw

    gen = torch.Generator().manual_seed(0)
    for V, dt in ((1, torch.float32), (7, torch.float32), (2049, torch.float32), (3001, torch.bfloat16),
                  (1000, torch.float16)):
        B = 16
        z = (torch.randn(B, V + 3, generator=gen) * 3).to(dt)[:, 1:V + 1]               # strided rows
        if V > 1:
            z[0, :V - 1] = float("-inf")                                                # one token left
            z[1, 1::2] = float("-inf")
        u = torch.rand(B, 1, generator=gen, dtype=torch.float64)
        u[2] = 1 - 2 ** -53                                                            # the top of [0, 1)
        u[3] = 0.0
        tok, lp = draw(z.to(dev), u.to(dev))
        assert tok.shape == (B, 1) and tok.dtype == torch.long and lp.dtype == torch.float32
        tok, lp = tok.cpu(), lp.cpu()
        assert bool(torch.isfinite(z.float().gather(1, tok)).all())                   # never a -inf logit
        torch.testing.assert_close(lp, torch.log_softmax(z.double(), -1).gather(1, tok).float(), atol=2e-6, rtol=0)
        if V > 1:
            assert int(tok[0]) == V - 1 and int(tok[1]) % 2 == 0
        # the inverse CDF of _draw's law (in float64 here), with the same uniforms
        p = torch.softmax(z.double(), -1)
        want = torch.searchsorted(p.cumsum(-1), u * p.sum(-1, keepdim=True), right=True).clamp_max(V - 1)
        assert torch.equal(tok, want)
    z = torch.randn(4, 50, generator=gen)
    z[2, 5], z[3, 7] = float("nan"), float("inf")
    tok, lp = draw(z.to(dev), torch.full((4, 1), 0.5, dtype=torch.float64, device=dev))
    assert tok[2:].tolist() == [[0], [0]] and bool(lp[2:].isnan().all()) and bool(lp[:2].isfinite().all())
    # EOS: done rows get the pad and 0; a row drawing EOS becomes done
    z = torch.full((3, 6), float("-inf"))
    z[:, 4] = 0.0                                                                   # token 4 only
    done = torch.tensor([[True], [False], [False]], device=dev)
    tok, lp = draw(z.to(dev), torch.rand(3, 1, dtype=torch.float64).to(dev), done, pad=1, eos=4)
    assert tok.view(-1).tolist() == [1, 4, 4] and lp.view(-1).tolist() == [0.0, 0.0, 0.0]
    assert done.view(-1).tolist() == [True, True, True]
    with pytest.raises(ValueError, match="u: expected"):
        draw(z, torch.rand(3, 1))
    with pytest.raises(ValueError, match="done"):
        draw(z, torch.rand(3, 1, dtype=torch.float64), None, eos=4)


def test_sample_bad_arguments():
    """Clear errors naming the argument, never a crash in the C loop (stop_check_every = 0 divided by zero there)."""
    from fdpg.models import build_tiny

    model = build_tiny(vocab_size=12, n_layer=1, n_embd=16)
    ctx = torch.ones(2, 3, dtype=torch.long)
    cases = [(dict(stop_check_every=0), "stop_check_every: expected an int >= 1, got 0"),
             (dict(stop_check_every=-2), "stop_check_every"),
             (dict(batch_size=0), "batch_size: expected an int >= 1"),
             (dict(max_length=0), "max_length: expected an int >= 1"),
             (dict(bos_token_id=12), r"bos_token_id: expected a token id in \[0, 12\)"),
             (dict(eos_token_id=-1), r"eos_token_id: expected a token id in \[0, 12\)"),
             (dict(context_ids=ctx[0]), r"context_ids: expected an integer tensor \[batch_size, P\]"),
             (dict(context_ids=ctx[:1]), r"context_ids: expected shape \(2, P\)"),
             (dict(context_ids=ctx + 20), r"context_ids: token ids must lie in \[0, 12\)"),
             (dict(context_ids=ctx, context_mask=torch.ones(2, 2, dtype=torch.bool)), "context_mask: expected shape"),
             (dict(context_ids=ctx, context_mask=torch.tensor([[True] * 3, [False] * 3])),
              "context_mask: every row needs at least one context token")]
    for kw, msg in cases:
        args = dict(batch_size=2, max_length=4, eos_token_id=0, generator=torch.Generator().manual_seed(0))
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            sample(model, args.pop("batch_size"), args.pop("max_length"), **args)
