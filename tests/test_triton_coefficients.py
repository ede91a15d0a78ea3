"""Triton backend of fdpg_coefficients and divergence_estimates (one launch each), under TRITON_INTERPRET=1,
against the float64 reference. Outputs are poisoned with NaN before each call."""
import math

import pytest
import torch

import fdpg
from fdpg import divergences, reference
from fdpg.ops import coefficients as ops

K = pytest.importorskip("fdpg.kernels.coefficients")

DIVS = ["forward_kl", "reverse_kl", "tv", "js", "hellinger", "chi2", "alpha:0.5", "alpha:-0.7", "alpha:2"]
BASELINES = ["batch", "none", 0.3, -1.0]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(K, "POISON", True)
    monkeypatch.setattr(K, "FORCE_BLOCK", 64)  # N = 150: two full blocks and a ragged third


def batch(gen, n=150, zeros=True):
    lq = -20 - torch.rand(n, generator=gen) * 20
    lpi = lq + torch.randn(n, generator=gen) * 1.5
    lP = lq + torch.randn(n, generator=gen) * 1.5 - 1.0
    if zeros:
        lP[::7] = -math.inf
    return lpi, lq, lP


def close(got, want, what, rtol=2e-5):
    """float32 kernel against float64: relative to the largest magnitude of the reference."""
    scale = float(want.abs().max()) if want.numel() and torch.isfinite(want).all() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * max(scale, 1.0), msg=what)


@pytest.mark.parametrize("div", DIVS)
def test_coefficients_match_float64(div, gen):
    d = divergences.get(div)
    lpi, lq, lP = batch(gen, zeros=d.is_bounded_at_inf())  # -inf target scores only where f'(inf) is finite
    lpi[5] = -math.inf  # pi(x) = 0: a zero coefficient, whatever f'(s = -inf) is
    for baseline in BASELINES:
        for log_z in (None, -0.7):
            out = fdpg.fdpg_coefficients(lpi, lq, lP, div, log_z=log_z, baseline=baseline, backend="triton")
            coef, lz, w, ess, b = reference.fdpg_coefficients(lpi.double(), lq.double(), lP.double(), div,
                                                               log_z, baseline)
            what = f"{div} baseline={baseline} log_z={log_z}"
            for t in (out.coef, out.weights, out.log_z, out.ess, out.baseline):
                assert t.dtype == torch.float32 and torch.isfinite(t).all(), what
            assert out.coef.shape == (150,) and out.log_z.shape == ()
            close(out.coef, coef, what)
            close(out.weights, w, what)
            close(out.log_z, lz, what)
            close(out.ess, ess, what)
            close(out.baseline, b, what)
            assert out.coef[5] == 0 and out.weights[5] == 0


@pytest.mark.parametrize("div", DIVS)
def test_a_sample_holding_nearly_all_the_weight(div, gen):
    """pi/q = e^gap for one sample (in the second block) over the others: float32 coefficients still at float32
    precision (the pairwise form for that sample), against the pairwise float64 value."""
    from test_coefficients import pairwise_coefficients

    lpi, lq, lP = batch(gen, zeros=False)
    lq[140], lP[140] = lq[77], lP[77]                        # a copy of the heaviest sequence, in the third block
    for gap in (10.0, 40.0, 80.0):
        lpi[77] = lpi[140] = lq[77] + gap
        want = pairwise_coefficients(lpi.double(), lq.double(), lP.double(), div)
        if float(want.abs().max()) > 1e30:
            continue
        for baseline in ("batch", "none"):
            out = fdpg.fdpg_coefficients(lpi, lq, lP, div, baseline=baseline, backend="triton")
            ref = want if baseline == "batch" else reference.fdpg_coefficients(
                lpi.double(), lq.double(), lP.double(), div, None, "none")[0]
            close(out.coef, ref, f"{div} gap={gap} baseline={baseline}", rtol=1e-5)


def test_half_inputs_many_blocks_and_single(gen, monkeypatch):
    monkeypatch.setattr(K, "FORCE_BLOCK", None)  # the heuristic: blocks of 2048 over 70 000 sequences
    lpi, lq, lP = batch(gen, n=70_000)
    out = fdpg.fdpg_coefficients(lpi, lq, lP, "js", backend="triton")
    ref = reference.fdpg_coefficients(lpi.double(), lq.double(), lP.double(), "js")
    for got, want in zip((out.coef, out.log_z, out.weights, out.ess, out.baseline), ref):
        close(got, want, "n=70000", rtol=1e-4)
    for dt in (torch.bfloat16, torch.float16):
        a, b, c = (t.to(dt) for t in batch(gen, n=33))
        out = fdpg.fdpg_coefficients(a, b, c, "hellinger", baseline="batch", backend="triton")
        ref = reference.fdpg_coefficients(a.double(), b.double(), c.double(), "hellinger")
        close(out.coef, ref[0], str(dt))
    one = fdpg.fdpg_coefficients(lpi[:1], lq[:1], lP[1:2], "forward_kl", backend="triton")
    close(one.coef, reference.fdpg_coefficients(lpi[:1].double(), lq[:1].double(), lP[1:2].double())[0], "n=1")


@pytest.mark.parametrize("prior", [True, False])
@pytest.mark.parametrize("log_z", [None, -1.2])
def test_estimates_match_float64(prior, log_z, gen):
    lpi, lq, lP = batch(gen)
    if prior:
        lpi[3] = -math.inf  # pi(x) = 0 where p(x) > 0: KL(p || pi) = inf
    la = lq + torch.randn(150, generator=gen) if prior else None
    est = fdpg.divergence_estimates(lpi, lq, lP, la, log_z, backend="triton")
    ref = reference.divergence_estimates(lpi.double(), lq.double(), lP.double(),
                                         None if la is None else la.double(), log_z)
    assert set(est) == set(ref)
    for k in ref:
        assert est[k].shape == () and est[k].dtype == torch.float32
        if math.isinf(ref[k]):
            assert est[k] == ref[k], k
        else:
            close(est[k], ref[k], k)
    # no sample with P = 0: every estimate finite
    lpi, lq, lP = batch(gen, zeros=False)
    est = fdpg.divergence_estimates(lpi, lq, lP, backend="triton")
    ref = reference.divergence_estimates(lpi.double(), lq.double(), lP.double())
    for k in ref:
        close(est[k], ref[k], k)


def test_divergence_spec_is_fprime():
    """The kernel's parameters of f' reproduce each built-in's f' (and only built-ins have them)."""
    s = torch.linspace(-6, 6, 41, dtype=torch.float64)
    s = torch.cat([s, torch.tensor([0.0, -1e-3, 1e-3], dtype=torch.float64)])
    for name in DIVS + ["alpha:0.123456789"]:
        d = divergences.get(name)
        ce, ae, k0, k1, k2, k3 = ops.divergence_spec(d)
        f = ce * torch.exp(ae * s) + k0 + k1 * s + k2 * torch.sign(s) + k3 * torch.nn.functional.softplus(-s)
        torch.testing.assert_close(f, d.fprime(s), msg=name)
    mine = divergences.Divergence("tv", f=lambda s: torch.expm1(s) ** 4)  # a built-in's name, another f
    assert ops.divergence_spec(mine) is None
    assert ops.divergence_spec(divergences.Divergence("quartic", f=lambda s: torch.expm1(s) ** 4)) is None


def test_user_divergence_and_dispatch(gen, monkeypatch):
    lpi, lq, lP = batch(gen, zeros=False)
    quartic = divergences.Divergence("quartic", f=lambda s: torch.expm1(s) ** 2 / 2)
    with pytest.raises(ValueError, match="backend: the Triton kernel knows only the built-in.*'quartic'"):
        fdpg.fdpg_coefficients(lpi, lq, lP, quartic, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        fdpg.fdpg_coefficients(lpi.double(), lq.double(), lP.double(), backend="triton")
    # "auto" where it would choose Triton (CUDA tensors): a user divergence falls back to the torch path
    calls = []
    real = ops._seq_coefficients

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ops.C, "backend", lambda name, dev, **kw: "triton")
    monkeypatch.setattr(torch.ops.fdpg, "seq_coefficients", spy, raising=False)
    out = fdpg.fdpg_coefficients(lpi, lq, lP, quartic, backend="auto")
    ref = reference.fdpg_coefficients(lpi.double(), lq.double(), lP.double(), quartic)
    close(out.coef, ref[0], "user divergence under auto", rtol=1e-4)
    assert calls == []
    out = fdpg.fdpg_coefficients(lpi, lq, lP, "chi2", backend="auto")
    assert calls == [1]
    close(out.coef, reference.fdpg_coefficients(lpi.double(), lq.double(), lP.double(), "chi2")[0], "chi2")
    # CPU tensors without the interpreter
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fdpg.divergence_estimates(lpi, lq, lP, backend="triton")


def test_library_ops_opcheck_and_compile(gen):
    lpi, lq, lP = batch(gen, n=40)
    spec = list(ops.divergence_spec(divergences.get("js")))
    torch.library.opcheck(torch.ops.fdpg.seq_coefficients, (lpi, lq, lP, None, spec, 1, 0.0))
    torch.library.opcheck(torch.ops.fdpg.seq_coefficients, (lpi, lq, lP, torch.tensor(-0.5), spec, 2, 0.3))
    torch.library.opcheck(torch.ops.fdpg.seq_estimates, (lpi, lq, lP, lq + 1.0, None))

    def step(lpi, lq, lP):
        out = fdpg.fdpg_coefficients(lpi, lq, lP, "hellinger", backend="triton", validate=False)
        est = fdpg.divergence_estimates(lpi, lq, lP, backend="triton", validate=False)
        return out.loss(lpi), est["kl_p_pi"]

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(lpi, lq, lP)
    want = step(lpi, lq, lP)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
