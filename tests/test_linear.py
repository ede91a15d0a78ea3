import math

import pytest
import torch

import fdpg


def ref64(h, w, b, y, tau=1.0):
    z = h.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    return torch.log_softmax(z / tau, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def make(gen, B=3, T=5, d=16, V=97, dtype=torch.float32, bias=True):
    h = (torch.randn(B, T, d, generator=gen)).to(dtype).requires_grad_(True)
    w = (torch.randn(V, d, generator=gen) / math.sqrt(d) * 3).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=gen)).to(dtype).requires_grad_(True) if bias else None
    y = torch.randint(0, V, (B, T), generator=gen)
    return h, w, b, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [None, 4])
def test_linear_token_logprobs_forward_backward(dtype, bias, chunk, gen):
    h, w, b, y = make(gen, dtype=dtype, bias=bias)
    g = torch.randn(3, 5, generator=gen)
    lp = fdpg.linear_token_logprobs(h, w, y, bias=b, temperature=0.8, chunk_size=chunk)
    assert lp.dtype == torch.float32 and lp.shape == (3, 5)
    params = [h, w] + ([b] if bias else [])
    grads = torch.autograd.grad((lp * g).sum(), params)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    lp64 = ref64(p64[0], p64[1], p64[2] if bias else None, y, 0.8)
    ref_grads = torch.autograd.grad((lp64 * g.double()).sum(), p64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_never_saves_the_logits(gen):
    """The torch backend's autograd keeps only inputs and per-row logsumexp: nothing of size N x V."""
    h, w, b, y = make(gen, B=4, T=8, d=8, V=301)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = fdpg.linear_token_logprobs(h, w, y, bias=b, chunk_size=5)
    assert max(sizes) <= max(301 * 8, 32 * 8), sizes  # the inputs themselves, nothing of N x V = 9632
    lp.sum().backward()
    assert h.grad is not None and w.grad is not None and b.grad is not None


def test_paired_linear(gen):
    h, w, b, y = make(gen, d=16)
    h2, w2, _, _ = make(gen, d=24, bias=False)
    lp, lp_prior = fdpg.paired_linear_token_logprobs(h, w, h2, w2, y, policy_bias=b)
    assert lp.requires_grad and not lp_prior.requires_grad
    torch.testing.assert_close(lp.double(), ref64(h, w, b, y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_prior.double(), ref64(h2, w2, None, y), rtol=1e-5, atol=1e-5)
    lp.sum().backward()
    assert w2.grad is None and h2.grad is None


def test_bad_inputs(gen):
    h, w, b, y = make(gen)
    with pytest.raises(ValueError, match=r"weight: hidden size 16 differs.*\[V, 17\]"):
        fdpg.linear_token_logprobs(torch.randn(3, 5, 17), w, y)
    with pytest.raises(ValueError, match=r"bias: expected shape \(97,\)"):
        fdpg.linear_token_logprobs(h, w, y, bias=torch.randn(96))
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, d\]"):
        fdpg.linear_token_logprobs(h, w[0], y)
    with pytest.raises(TypeError, match="hidden: expected a floating-point"):
        fdpg.linear_token_logprobs(h.detach().long(), w, y)
    with pytest.raises(ValueError, match=r"targets: token ids must lie in \[0, 97\)"):
        fdpg.linear_token_logprobs(h, w, torch.full_like(y, 97))
    with pytest.raises(ValueError, match="prior_weight: vocabulary size 98 differs"):
        fdpg.paired_linear_token_logprobs(h, w, h, torch.randn(98, 16), y)
    with pytest.raises(ValueError, match="prior_weight: hidden size"):
        fdpg.paired_linear_token_logprobs(h, w, h, torch.randn(97, 8), y)
    with pytest.raises(ValueError, match="hidden/weight/bias .*holds NaN or \\+inf"):
        fdpg.linear_token_logprobs(h.detach().clone().fill_(math.nan), w, y)
    bias = torch.zeros(97)
    bias[5] = math.inf   # +inf logits: every log-prob -inf or NaN, caught by the logsumexp check
    with pytest.raises(ValueError, match="hidden/weight/bias .*holds NaN or \\+inf"):
        fdpg.linear_token_logprobs(h, w, y, bias=bias, backend="torch")
    for bad in (-1, 0, 2.5):
        with pytest.raises(ValueError, match="chunk_size: expected None or a positive int"):
            fdpg.linear_token_logprobs(h, w, y, chunk_size=bad)
    with pytest.raises(ValueError, match="hidden: expected a hidden size d >= 1"):
        fdpg.linear_token_logprobs(torch.randn(3, 0), torch.randn(97, 0), y[:3])
