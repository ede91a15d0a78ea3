"""fdpg.cpu_gemm: its float32 GEMMs (the native kernel, oneDNN) on the CPU against float64, in every layout the
library passes."""
import pytest
import torch

from fdpg import cpu_gemm

pytestmark = pytest.mark.skipif(cpu_gemm.onednn_reason() is not None, reason=str(cpu_gemm.onednn_reason()))


@pytest.fixture(params=["native", "onednn"])
def always(monkeypatch, request):
    """The fast routes at every size (the tests' shapes are below MIN_FLOPS): the native kernel where the layouts
    allow it, else oneDNN ("native"), or oneDNN alone ("onednn")."""
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    if request.param == "onednn":
        monkeypatch.setattr(cpu_gemm, "_native_reason", lambda: "off")
    elif cpu_gemm._native_reason() is not None:
        pytest.skip(cpu_gemm._native_reason())
    return request.param


def _close(got, want, tol=2e-6):
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max().clamp_min(1)
    assert ((got.double() - want).abs().max() / scale).item() < tol


def _taken(monkeypatch):
    """The calls that went past torch.mm, by name (so a test fails if its GEMMs silently went to torch)."""
    calls = []
    for owner, name in ((cpu_gemm, "_lin"), (cpu_gemm, "_wgrad"), (cpu_gemm.cpu_decode, "gemm")):
        f = getattr(owner, name)

        def spy(*a, _f=f, _name=name, **k):
            out = _f(*a, **k)
            if out is not None:
                calls.append(_name)
            return out

        monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (37, 53, 29), (130, 7, 257)])
@pytest.mark.parametrize("layout", ["contiguous", "b transposed", "a transposed", "both transposed", "a sliced"])
def test_mm(always, monkeypatch, M, K, N, layout):
    calls = _taken(monkeypatch)
    g = torch.Generator().manual_seed(M * K + N)
    a = torch.randn(M, K + 3, generator=g)[:, 1:K + 1] if layout == "a sliced" else torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g)
    if "a transposed" in layout or layout == "both transposed":
        a = a.t().contiguous().t()
    if layout in ("b transposed", "both transposed"):
        b = b.t().contiguous().t()
    _close(cpu_gemm.mm(a, b), a.double() @ b.double())
    native = always == "native" and b.is_contiguous()       # (every form of a here is one it takes)
    assert len(calls) == 1 and ("gemm" in calls) == native


@pytest.mark.parametrize("w_out_in", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(41,), (3, 1, 17), (1,)])
def test_linear_and_its_gradients(always, monkeypatch, w_out_in, bias, lead):
    calls = _taken(monkeypatch)
    g = torch.Generator().manual_seed(len(lead) + 2 * bias + w_out_in)
    K, N = 33, 70
    x = torch.randn(*lead, K, generator=g, requires_grad=True)
    w = torch.randn(*((N, K) if w_out_in else (K, N)), generator=g, requires_grad=True)
    b = torch.randn(N, generator=g, requires_grad=True) if bias else None
    y = cpu_gemm.linear(x, w, b, w_out_in=w_out_in)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = x64 @ (w64.t() if w_out_in else w64)
    y64 = y64 + b64 if bias else y64
    y64.backward(dy.double())
    _close(y.detach(), y64.detach())
    _close(x.grad, x64.grad)
    _close(w.grad, w64.grad)
    if bias:
        _close(b.grad, b64.grad)
    assert len(calls) == 3                          # forward, input and weight gradients: the native kernel for the
    assert calls.count("gemm") == (2 if always == "native" else 0)   # two whose right factor is contiguous


def test_linear_grads_asked_for(always):
    g = torch.Generator().manual_seed(5)
    dy, x, w = torch.randn(9, 4, generator=g), torch.randn(9, 6, generator=g), torch.randn(4, 6, generator=g)
    dx, dw, db = cpu_gemm.linear_grads(dy, x, w, True, (False, True, False))
    assert dx is None and db is None
    _close(dw, dy.double().t() @ x.double())


def test_below_the_threshold_and_elsewhere_torch(monkeypatch):
    calls = _taken(monkeypatch)
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    _close(cpu_gemm.mm(a, b), a.double() @ b.double())                      # below MIN_FLOPS
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    assert cpu_gemm.mm(a.double(), b.double()).dtype == torch.float64      # float64: torch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_gemm.linear(a, b).dtype == torch.bfloat16              # autocast decides, as for F.linear
    assert not calls


def test_switched_off(monkeypatch):
    calls = _taken(monkeypatch)
    monkeypatch.setenv("FDPG_CPU_GEMM", "torch")
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    assert cpu_gemm.onednn_reason() == cpu_gemm._native_reason() == "FDPG_CPU_GEMM=torch"
    a = torch.randn(8, 8)
    cpu_gemm.mm(a, a)
    cpu_gemm.linear(a, a)
    assert not calls


def test_double_backward_through_torch(always):
    """With create_graph the gradients are torch ops (differentiable again): second derivatives against float64."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(11, 6, generator=g, requires_grad=True)
    w = torch.randn(5, 6, generator=g, requires_grad=True)
    y = cpu_gemm.linear(x, w)
    (gx,) = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.sum(), w)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(((x64 @ w64.t()) ** 2).sum(), x64, create_graph=True)
    (gw64,) = torch.autograd.grad(gx64.sum(), w64)
    _close(gx.detach(), gx64.detach())
    _close(gw, gw64)
