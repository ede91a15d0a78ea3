"""kernels/norms.py (the decoding step's residual add + norm + cast) against torch, under the interpreter on CPU."""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from fdpg.kernels.norms import add_norm  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DEV = "cuda" if torch.cuda.is_available() else "cpu"              # CPU: under the interpreter (conftest.py)
ULP = {F32: 0.0, BF16: 2.0 ** -7, F16: 2.0 ** -10}               # relative spacing (at most) of each dtype


def reference(x, delta, w, b, eps, rms, out_dtype):
    """What the decoder computes unfused: torch's add, then LayerNorm or Hugging Face's LlamaRMSNorm, then the cast."""
    s = x if delta is None else x + delta                          # x's dtype (delta is never wider)
    if rms:
        s32 = s.float()
        n = (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
        y = w * n
    else:
        y = F.layer_norm(s.float(), (s.shape[-1],), w.float(), None if b is None else b.float(), eps)
    return s, y.to(out_dtype)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("xdt, odt", [(F32, BF16), (BF16, BF16), (F32, F32), (F16, F16)])
@pytest.mark.parametrize("M, n", [(1, 1), (5, 37), (3, 300), (4, 1000)])
def test_matches_torch(gen, rms, xdt, odt, M, n):
    x = (torch.randn(M, n, generator=gen) * 3 + 1).to(DEV, xdt)
    delta = torch.randn(M, n, generator=gen).to(DEV, odt)
    w = (torch.rand(n, generator=gen) + 0.5).to(DEV, xdt)
    b = None if rms else torch.randn(n, generator=gen).to(DEV, xdt)
    s_ref, y_ref = reference(x, delta, w, b, 1e-5, rms, odt)
    s, y = add_norm(x, delta, w, b, 1e-5, rms=rms, out_dtype=odt)
    assert s.dtype == xdt and y.dtype == odt and y.shape == (M, n)
    # the add is torch's; the interpreter rounds float32 to bf16/fp16 toward zero (a GPU to nearest): 1 ulp there
    torch.testing.assert_close(s, s_ref, atol=0, rtol=ULP[xdt])
    # the output's rounding, and a 1-ulp different sum (interpreter) carried through the norm: ulps of the largest
    big = y_ref.float().abs().max().item()
    tol = dict(atol=1e-5, rtol=1e-5) if odt == F32 else dict(atol=4 * ULP[xdt if xdt != F32 else odt] * big,
                                                             rtol=2 * ULP[odt])
    if n == 1 and not rms:
        torch.testing.assert_close(y.float(), y_ref.float(), atol=1e-6, rtol=0)   # x - mean = 0: the bias
    else:
        torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    # no delta: the norm of x alone
    _, y0 = add_norm(x, None, w, b, 1e-5, rms=rms, out_dtype=odt)
    torch.testing.assert_close(y0.float(), reference(x, None, w, b, 1e-5, rms, odt)[1].float(), **tol)


def test_in_place_and_strided_rows(gen):
    base = torch.randn(6, 80, generator=gen).to(DEV)
    x = base[::2, :64]                                             # rows 160 floats apart
    keep, other = x.clone(), base.clone()
    delta = torch.randn(3, 64, generator=gen).to(DEV, BF16)
    w, b = (torch.rand(64, generator=gen) + 0.5).to(DEV), torch.randn(64, generator=gen).to(DEV)
    s_ref, y_ref = reference(keep, delta, w, b, 1e-5, False, BF16)
    s, y = add_norm(x, delta, w, b, 1e-5, rms=False, out_dtype=BF16, inplace=True)
    assert s.data_ptr() == x.data_ptr() and torch.equal(x, s_ref)   # written into x's rows (float32: exact)
    assert torch.equal(base[1::2], other[1::2]) and torch.equal(base[::2, 64:], other[::2, 64:])   # nothing else
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0, rtol=2 * ULP[BF16])
    s2, _ = add_norm(keep, delta, w, b, 1e-5, rms=False, out_dtype=BF16)
    assert s2.data_ptr() != keep.data_ptr() and torch.equal(s2, s_ref)   # not in place: x untouched


def test_empty_and_bad_inputs():
    w = torch.ones(8, device=DEV)
    s, y = add_norm(torch.empty(0, 8, device=DEV), torch.empty(0, 8, device=DEV), w, None, 1e-5, rms=True,
                    out_dtype=BF16)
    assert s.shape == y.shape == (0, 8)
    with pytest.raises(ValueError, match="delta"):
        add_norm(torch.ones(2, 8), torch.ones(2, 7), w, None, 1e-5, rms=True, out_dtype=F32)
    with pytest.raises(ValueError, match="weight"):
        add_norm(torch.ones(2, 8), None, torch.ones(7), None, 1e-5, rms=True, out_dtype=F32)
    with pytest.raises(ValueError, match="bias"):
        add_norm(torch.ones(2, 8), None, w, torch.ones(8), 1e-5, rms=True, out_dtype=F32)
    with pytest.raises(ValueError, match="x: the sum is written into x in place"):   # (a copy would be updated)
        add_norm(torch.ones(8, 2, device=DEV).t(), torch.ones(2, 8, device=DEV), w, None, 1e-5, rms=True,
                 out_dtype=F32, inplace=True)
