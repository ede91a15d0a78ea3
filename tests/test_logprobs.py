import math

import pytest
import torch

import fdpg

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ref64(logits, targets, tau=1.0):
    return torch.log_softmax(logits.double() / tau, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def rand_logits(shape, dtype, gen, scale=4.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 1, 1000), (7, 129)])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_token_logprobs_matches_float64(dtype, shape, tau, gen):
    logits = rand_logits(shape, dtype, gen)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    lp = fdpg.token_logprobs(logits, targets, temperature=tau)
    assert lp.dtype == torch.float32 and lp.shape == shape[:-1]
    torch.testing.assert_close(lp.double(), ref64(logits, targets, tau), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_gradient(dtype, gen):
    logits = rand_logits((2, 3, 50), dtype, gen).requires_grad_(True)
    targets = torch.randint(0, 50, (2, 3), generator=gen)
    g = torch.randn(2, 3, generator=gen)
    (fdpg.token_logprobs(logits, targets, temperature=1.3) * g).sum().backward()
    x = logits.detach().double().requires_grad_(True)
    (ref64(x, targets, 1.3) * g.double()).sum().backward()
    assert logits.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=tol, atol=tol)


def test_float64_and_noncontiguous_inputs(gen):
    logits = torch.randn(30, 4, 6, generator=gen, dtype=torch.float64).transpose(0, 2)  # [6, 4, 30], strided
    targets = torch.randint(0, 30, (4, 6), generator=gen).t()
    lp = fdpg.token_logprobs(logits, targets)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, ref64(logits.contiguous(), targets.contiguous()))


def test_neg_inf_logits_are_allowed_where_not_sampled(gen):
    logits = torch.randn(4, 10, generator=gen)
    logits[:, :3] = -math.inf  # e.g. banned tokens
    targets = torch.randint(3, 10, (4,), generator=gen)
    torch.testing.assert_close(fdpg.token_logprobs(logits, targets).double(), ref64(logits, targets))
    targets[0] = 1
    assert fdpg.token_logprobs(logits, targets)[0] == -math.inf


@pytest.mark.parametrize("dtype", DTYPES)
def test_paired_token_logprobs(dtype, gen):
    pol = rand_logits((3, 4, 77), dtype, gen).requires_grad_(True)
    pri = rand_logits((3, 4, 77), torch.float32, gen).requires_grad_(True)
    targets = torch.randint(0, 77, (3, 4), generator=gen)
    lp_pol, lp_pri = fdpg.paired_token_logprobs(pol, pri, targets, temperature=0.9)
    assert lp_pol.requires_grad and not lp_pri.requires_grad
    torch.testing.assert_close(lp_pol.double(), ref64(pol.detach(), targets, 0.9), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_pri.double(), ref64(pri.detach(), targets, 0.9), rtol=1e-5, atol=1e-5)
    (lp_pol.sum() + lp_pri.sum()).backward()
    assert pol.grad is not None and pri.grad is None


def test_sequence_logprobs_masks_exactly(gen):
    lp = -torch.rand(4, 6, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.4
    mask[0] = True
    mask[1] = False  # a fully masked row sums to 0
    lp[~mask] = -math.inf  # masked positions may hold anything
    out = fdpg.sequence_logprobs(lp, mask)
    expect = torch.tensor([sum(float(lp[i, j]) for j in range(6) if mask[i, j]) for i in range(4)])
    torch.testing.assert_close(out, expect)
    assert out[1] == 0.0
    torch.testing.assert_close(fdpg.sequence_logprobs(lp.masked_fill(~mask, 0), mask.float()), expect)
    with pytest.raises(ValueError, match="mask: every position"):
        fdpg.sequence_logprobs(lp, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="mask: expected shape"):
        fdpg.sequence_logprobs(lp, mask[:, :3])
    with pytest.raises(ValueError, match="token_lp: contains NaN"):
        fdpg.sequence_logprobs(torch.full((2, 3), math.nan), torch.ones(2, 3, dtype=torch.bool))


def test_completion_mask_by_position_pad_equals_eos():
    eos = 0
    tokens = torch.tensor([[5, 0, 0, 0],    # EOS at 1, then padding that is also EOS
                           [5, 6, 7, 8],    # no EOS: everything
                           [0, 0, 0, 0],    # EOS first
                           [9, 9, 9, 0]])
    m = fdpg.completion_mask(tokens, eos)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    m = fdpg.completion_mask(torch.tensor([[0, 3, 0, 0]]), eos, start=1)  # a prompt of one token that is EOS
    assert m.tolist() == [[0, 1, 1, 0]]
    lp, m = -torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    assert fdpg.sequence_logprobs(lp.to(torch.bfloat16), m).dtype == torch.float32
    lp[1, 2] = math.inf
    with pytest.raises(ValueError, match=r"token_lp: contains \+inf at an unmasked position"):
        fdpg.sequence_logprobs(lp, m)
    with pytest.raises(ValueError, match="mask: expected bool or 0/1 values"):
        fdpg.sequence_logprobs(-torch.rand(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="eos_token_id: expected None or a token id >= 0"):
        fdpg.completion_mask(torch.zeros(2, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="start: expected an int >= 0"):
        fdpg.completion_mask(torch.zeros(2, 3, dtype=torch.long), 0, start=-1)
    for bad in (torch.zeros(4, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"tokens: expected shape \[B, T\]"):
            fdpg.completion_mask(bad, eos)


def test_bad_inputs(gen):
    logits = torch.randn(2, 3, 11, generator=gen)
    targets = torch.randint(0, 11, (2, 3), generator=gen)
    with pytest.raises(TypeError, match="logits: expected a floating-point"):
        fdpg.token_logprobs(logits.long(), targets)
    with pytest.raises(TypeError, match="targets: expected an integer"):
        fdpg.token_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match=r"targets: expected shape \(2, 3\)"):
        fdpg.token_logprobs(logits, targets[:, :2])
    with pytest.raises(ValueError, match=r"targets: token ids must lie in \[0, 11\).*found 11"):
        fdpg.token_logprobs(logits, targets.clone().fill_(11))
    with pytest.raises(ValueError, match=r"found -1"):
        fdpg.token_logprobs(logits, targets.clone().fill_(-1))
    bad = logits.clone()
    bad[1, 2, 4] = math.nan
    with pytest.raises(ValueError, match=r"logits: .*index \(1, 2\).*NaN"):
        fdpg.token_logprobs(bad, targets)
    bad[1, 2, 4] = math.inf
    with pytest.raises(ValueError, match="logits: .*inf"):
        fdpg.token_logprobs(bad, targets)
    with pytest.raises(ValueError, match="prior_logits: vocabulary size 12 differs"):
        fdpg.paired_token_logprobs(logits, torch.randn(2, 3, 12), targets)
    with pytest.raises(ValueError, match="prior_logits: .*NaN"):
        fdpg.paired_token_logprobs(logits, torch.full_like(logits, math.nan), targets)
    with pytest.raises(ValueError, match="temperature"):
        fdpg.token_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        fdpg.token_logprobs(logits, targets, backend="fast")
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        fdpg.token_logprobs(logits.tolist(), targets)
    with pytest.raises(ValueError, match="targets: expected a tensor on cpu"):
        fdpg.token_logprobs(logits, targets.to("meta"))
    # validation off: no value checks (the GPU default), shapes still checked
    fdpg.token_logprobs(bad, targets, validate=False)
