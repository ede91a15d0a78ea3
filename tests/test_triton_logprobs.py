"""Triton backend of the per-token log-prob ops (paired_token_stats, token_logprobs, paired_token_logprobs),
run under TRITON_INTERPRET=1 on CPU against float64 references. Outputs are poisoned with NaN before each call."""
import math

import pytest
import torch

import fdpg
from fdpg import reference
from fdpg.ops import logprobs as ops

K = pytest.importorskip("fdpg.kernels.logprobs")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf - inf lanes


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(K, "POISON", True)


def rand_logits(shape, dtype, gen, scale=4.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def ref64(pol, pri, y, mask=None, tau=1.0, entropy=True, kl=True):
    """Float64 reference with autograd to the policy logits (a fresh leaf, returned first)."""
    x = pol.detach().double().requires_grad_(True)
    d = reference.paired_token_stats(x, None if pri is None else pri.double(), y, mask, entropy, kl, tau)
    return x, d


def loss_of(st, w):
    """A scalar touching every differentiable output, weighted by the random ``w``."""
    total = (st["policy_lp"] * w["lp"]).sum() + (st["policy_lse"] * w["lse"]).sum()
    if st.get("entropy") is not None:
        total = total + (st["entropy"] * w["ent"]).sum()
    if st.get("kl") is not None:
        total = total + (st["kl"] * w["kl"]).sum()
    if st.get("policy_seq") is not None:
        total = total + (st["policy_seq"] * w["seq"]).sum()
    return total


def weights(shape, gen):
    return {k: torch.randn(shape if k != "seq" else shape[:-1], generator=gen, dtype=torch.float64)
            for k in ("lp", "lse", "ent", "kl", "seq")}


def check_stats(st, d, tol=(1e-5, 3e-5)):
    for k in ("policy_lp", "prior_lp", "policy_lse", "prior_lse", "entropy", "kl", "policy_seq", "prior_seq",
              "policy_max", "prior_max"):
        got, want = getattr(st, k), d[k]
        if want is None:
            assert got is None, k
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape, k
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol[0], atol=tol[1], msg=k)


def stats_and_grads_match(pol, pri, y, mask, tau, gen, tol):
    """The Triton op with entropy and KL against float64: every output, and the gradient of a random weighting of
    them with respect to the policy logits (``pol``, read with its own strides, not modified) to ``tol``."""
    x = pol.detach().requires_grad_(True)
    assert x.stride() == pol.stride()
    st = ops.paired_token_stats(x, pri, y, mask=mask, entropy=True, kl=True, temperature=tau, backend="triton")
    x64, d = ref64(pol, pri, y, mask, tau)
    check_stats(st, d)
    w = weights(y.shape, gen)
    loss_of(st._asdict(), w).backward()
    loss_of(d, w).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)


# (V, config (ROWS, BLOCK_V) or None for the interpreter's heuristic, temperature)
CASES = [(1, None, 1.0), (37, (4, 16), 0.7), (1000, (2, 128), 1.3), (333, (1, 64), 1.0), (517, None, 0.6)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,config,tau", CASES)
def test_stats_forward_backward_match_float64(dtype, V, config, tau, gen, monkeypatch):
    monkeypatch.setattr(K, "FORCE_CONFIG", config)
    B, T = 3, 5
    pol = rand_logits((B, T, V), dtype, gen).requires_grad_(True)
    pri = rand_logits((B, T, V), torch.float32 if dtype != torch.float32 else torch.bfloat16, gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0] = True
    mask[1] = False  # a fully masked sequence sums to exactly 0
    st = ops.paired_token_stats(pol, pri, y, mask=mask, entropy=True, kl=True, temperature=tau, backend="triton")
    x, d = ref64(pol, pri, y, mask, tau)
    check_stats(st, d)
    assert st.policy_seq[1] == 0 and st.prior_seq[1] == 0
    assert not any(t.requires_grad for t in (st.prior_lp, st.prior_lse, st.prior_seq, st.policy_max))
    w = weights((B, T), gen)
    loss_of(st._asdict(), w).backward()
    loss_of(d, w).backward()
    assert pol.grad.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(pol.grad.double(), x.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("parts", ["lp", "entropy", "kl", "seq"])
def test_each_gradient_alone(parts, gen):
    """Each output's gradient on its own (the others' upstream gradients are None in the Function)."""
    B, T, V = 2, 3, 45
    pol = rand_logits((B, T, V), torch.float32, gen).requires_grad_(True)
    pri = rand_logits((B, T, V), torch.float32, gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.5
    mask[:, 0] = True
    st = ops.paired_token_stats(pol, pri, y, mask=mask, entropy=True, kl=True, temperature=0.9, backend="triton")
    x, d = ref64(pol, pri, y, mask, 0.9)
    key = {"lp": "policy_lp", "entropy": "entropy", "kl": "kl", "seq": "policy_seq"}[parts]
    g = torch.randn(getattr(st, key).shape, generator=gen)
    (getattr(st, key) * g).sum().backward()
    (d[key] * g.double()).sum().backward()
    torch.testing.assert_close(pol.grad.double(), x.grad, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("T", [1, 4])
def test_policy_only_and_t1(T, gen):
    B, V = 5, 130
    pol = rand_logits((B, T, V), torch.bfloat16, gen).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.float32)  # 0/1 numbers work as a mask
    mask[2] = 0
    st = ops.paired_token_stats(pol, None, y, mask=mask, entropy=True, backend="triton")
    x, d = ref64(pol, None, y, mask, 1.0, kl=False)
    check_stats(st, d)
    assert st.prior_lp is None and st.kl is None and st.prior_seq is None
    w = weights((B, T), gen)
    loss_of(st._asdict(), w).backward()
    loss_of(d, w).backward()
    torch.testing.assert_close(pol.grad.double(), x.grad, rtol=1e-2, atol=1e-2)


def test_banned_tokens_and_all_minus_inf_first_tile(gen, monkeypatch):
    """-inf logits (banned tokens) in whole tiles: no NaN, entropy/KL over the allowed tokens, exact gradients."""
    monkeypatch.setattr(K, "FORCE_CONFIG", (2, 16))
    B, T, V = 2, 3, 70
    pol = rand_logits((B, T, V), torch.float32, gen)
    pri = rand_logits((B, T, V), torch.float32, gen)
    pol[..., :20] = -math.inf   # the first tile, and part of the second, of every row
    pri[..., :10] = -math.inf   # the prior bans a subset of what the policy bans: KL stays finite
    pol[0, 1, 40:] = -math.inf
    pol.requires_grad_(True)
    y = torch.randint(20, 40, (B, T), generator=gen)
    st = ops.paired_token_stats(pol, pri, y, entropy=True, kl=True, backend="triton")
    x, d = ref64(pol, pri, y)
    for t in (st.policy_lp, st.entropy, st.kl, st.policy_lse):
        assert torch.isfinite(t).all()
    check_stats(st, d)
    w = weights((B, T), gen)
    loss_of(st._asdict(), w).backward()
    loss_of(d, w).backward()
    assert torch.isfinite(pol.grad).all() and (pol.grad[..., :20] == 0).all()
    torch.testing.assert_close(pol.grad.double(), x.grad, rtol=2e-5, atol=2e-5)
    # a target the policy bans: log-prob -inf, still a finite gradient
    y[0, 0] = 3
    st = ops.paired_token_stats(pol, pri, y, backend="triton")
    assert st.policy_lp[0, 0] == -math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_the_logits(dtype, gen):
    """The gradient lands in the logits' own buffer: no new B x T x V tensor in backward."""
    B, T, d, V = 2, 4, 8, 77
    h = torch.randn(B, T, d, generator=gen, dtype=dtype, requires_grad=True)
    W = (torch.randn(V, d, generator=gen) * 2).to(dtype)
    pri = rand_logits((B, T, V), torch.float32, gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    seen = []
    logits = h @ W.t()
    logits.register_hook(lambda g: seen.append(g))
    ptr = logits.data_ptr()
    st = ops.paired_token_stats(logits, pri, y, entropy=True, kl=True, backend="triton", inplace_backward=True)
    x, dref = ref64(logits, pri, y)  # a float64 copy, taken before backward overwrites the logits
    w = weights((B, T), gen)
    loss_of(st._asdict(), w).backward()
    assert len(seen) == 1 and seen[0].data_ptr() == ptr and seen[0].dtype == dtype
    # the buffer now holds the gradient, equal to the reference's
    loss_of(dref, w).backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.detach().double(), x.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(h.grad.double(), (x.grad @ W.double()), rtol=tol * 5, atol=tol * 5)


def test_inplace_backward_falls_back_where_it_would_be_wrong(gen):
    """Policy and prior logits in one buffer at different rows (the backward reads prior rows while writing the
    gradient), and create_graph (the in-place gradient is not differentiable): the out-of-place kernel runs, the
    gradient is right, and a second derivative raises instead of being silently 0."""
    B, T, V = 2, 9, 300
    full = rand_logits((B, T + 1, V), torch.float32, gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    w = weights((B, T), gen)
    ref = full.clone().double().requires_grad_(True)
    loss_of(reference.paired_token_stats(ref[:, 1:], ref[:, :-1].detach(), y, None, True, True, 1.0), w).backward()
    for inplace in (False, True):
        leaf = full.clone().requires_grad_(True)
        x = leaf * 1.0
        st = ops.paired_token_stats(x[:, 1:], x[:, :-1].detach(), y, entropy=True, kl=True, backend="triton",
                                    inplace_backward=inplace)
        loss_of(st._asdict(), {k: v.float() for k, v in w.items()}).backward()
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=2e-5, atol=2e-5)
    leaf = full[:, 1:].clone().requires_grad_(True)
    st = ops.paired_token_stats(leaf * 1.0, None, y, entropy=True, backend="triton", inplace_backward=True)
    (g,) = torch.autograd.grad(st.entropy.sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad((g * g).sum(), leaf)


def test_inplace_backward_into_a_strided_slice(gen):
    """``logits[:, :-1]`` (strided rows) is read without a copy and its gradient written in place; positions
    outside the slice are untouched."""
    B, T, V = 3, 5, 50
    full = rand_logits((B, T + 1, V), torch.float32, gen)
    keep = full[:, -1].clone()
    leaf = full[:, :-1].clone().requires_grad_(True)  # the reference's input
    full.requires_grad_(True)
    sl = full[:, :-1]
    y = torch.randint(0, V, (B, T), generator=gen)
    seen = []
    sl.register_hook(lambda g: seen.append(g.data_ptr()))
    lp = fdpg.token_logprobs(sl, y, temperature=0.8, backend="triton", inplace_backward=True)
    g = torch.randn(B, T, generator=gen)
    (lp * g).sum().backward()
    assert seen == [sl.data_ptr()]
    (reference.token_logprobs(leaf.double(), y, 0.8) * g.double()).sum().backward()
    torch.testing.assert_close(full.detach()[:, :-1].double(), leaf.grad.double(), rtol=2e-5, atol=2e-5)
    assert torch.equal(full.detach()[:, -1], keep)


def test_noncontiguous_inputs(gen):
    B, T, V = 3, 4, 61
    base = rand_logits((T, B, 2 * V), torch.float32, gen)
    pol = base.transpose(0, 1)[..., ::2]            # strided rows and a column stride of 2
    pri = rand_logits((B, V, T), torch.float16, gen).transpose(1, 2)   # column stride T
    y = torch.randint(0, V, (T, B), generator=gen).t()
    mask = (torch.rand(T, B, generator=gen) > 0.3).t()
    assert not pol.is_contiguous() and not pri.is_contiguous() and not y.is_contiguous()
    stats_and_grads_match(pol, pri, y, mask, 1.1, gen, 2e-5)
    # more than two leading dims that do not merge: copied, still right
    z4 = rand_logits((2, 3, 4, 2 * V), torch.float32, gen)[..., :V].permute(2, 0, 1, 3)
    y4 = torch.randint(0, V, z4.shape[:-1], generator=gen)
    torch.testing.assert_close(fdpg.token_logprobs(z4, y4, backend="triton").double(),
                               reference.token_logprobs(z4.double(), y4), rtol=1e-5, atol=1e-5)


def test_token_and_paired_logprobs_triton(gen):
    B, T, V = 2, 3, 211
    pol = rand_logits((B, T, V), torch.float16, gen).requires_grad_(True)
    pri = rand_logits((B, T, V), torch.float32, gen).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=gen)
    a, b = fdpg.paired_token_logprobs(pol, pri, y, temperature=0.9, backend="triton")
    assert a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a.double(), reference.token_logprobs(pol.detach().double(), y, 0.9), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(b.double(), reference.token_logprobs(pri.detach().double(), y, 0.9), rtol=1e-5,
                               atol=1e-5)
    lp = fdpg.token_logprobs(pol, y, temperature=0.9, backend="triton")
    torch.testing.assert_close(lp, a)
    g = torch.randn(B, T, generator=gen)
    (lp * g).sum().backward()
    x = pol.detach().double().requires_grad_(True)
    (reference.token_logprobs(x, y, 0.9) * g.double()).sum().backward()
    torch.testing.assert_close(pol.grad.double(), x.grad, rtol=1e-2, atol=1e-2)
    assert pri.grad is None


def test_torch_compile_fullgraph(gen):
    B, T, V = 2, 3, 40
    pol = rand_logits((B, T, V), torch.float32, gen)
    pri = rand_logits((B, T, V), torch.float32, gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    w = weights((B, T), gen)

    def step(pol, inplace, backend):
        logits = pol * 1.0  # a non-leaf, dead after the loss
        st = ops.paired_token_stats(logits, pri, y, mask=mask, entropy=True, kl=True, temperature=0.9,
                                     backend=backend, validate=False, inplace_backward=inplace)
        return loss_of(st._asdict(), {k: v.float() for k, v in w.items()})

    x, d = ref64(pol, pri, y, mask, 0.9)
    loss_of(d, w).backward()
    for backend, inplace in (("torch", False), ("triton", False), ("triton", True)):
        torch._dynamo.reset()
        p = pol.clone().requires_grad_(True)
        out = torch.compile(step, fullgraph=True, backend="aot_eager")(p, inplace, backend)
        out.backward()
        torch.testing.assert_close(out.double(), loss_of(d, w).detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(p.grad.double(), x.grad, rtol=2e-5, atol=2e-5)


def test_library_ops_opcheck(gen):
    B, T, V = 2, 3, 20
    pol = rand_logits((B, T, V), torch.float32, gen)
    pri = rand_logits((B, T, V), torch.bfloat16, gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    fwd = torch.ops.fdpg.token_stats_fwd
    torch.library.opcheck(fwd, (pol, pri, y, mask, 0.8, True, True))
    torch.library.opcheck(fwd, (pol, None, y, None, 1.0, False, False))
    outs = fwd(pol, pri, y, mask, 0.8, True, True)
    lse, ent, kl, plse = outs[1], outs[3], outs[4], outs[7]
    g = [torch.randn(B, T, generator=gen) for _ in range(4)] + [torch.randn(B, generator=gen)]
    args = (pol, pri, y, mask, lse, ent, kl, plse, *g, 0.8)
    torch.library.opcheck(torch.ops.fdpg.token_stats_bwd, args)
    torch.library.opcheck(torch.ops.fdpg.token_stats_bwd_inplace, (pol.clone(), *args[1:]))
    # the fake kernels agree with the real ones on shapes and dtypes
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fp, fa, fy, fm = (mode.from_tensor(t) for t in (pol, pri, y, mask))
        st = ops.paired_token_stats(fp, fa, fy, mask=fm, entropy=True, kl=True, backend="triton", validate=False)
    real = ops.paired_token_stats(pol, pri, y, mask=mask, entropy=True, kl=True, backend="triton")
    for a, b in zip(st, real):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_bad_inputs(gen, monkeypatch):
    pol = torch.randn(2, 3, 11, generator=gen)
    y = torch.randint(0, 11, (2, 3), generator=gen)
    with pytest.raises(ValueError, match="prior_logits: vocabulary size 12 differs"):
        ops.paired_token_stats(pol, torch.randn(2, 3, 12), y, backend="triton")
    with pytest.raises(ValueError, match="kl: .*needs prior_logits"):
        ops.paired_token_stats(pol, None, y, kl=True, backend="triton")
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 3\)"):
        ops.paired_token_stats(pol, None, y, mask=torch.ones(2, 2, dtype=torch.bool), backend="triton")
    with pytest.raises(ValueError, match="mask: every position"):
        ops.paired_token_stats(pol, None, y, mask=torch.zeros(2, 3, dtype=torch.bool), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        ops.paired_token_stats(pol.double(), None, y, backend="triton")
    with pytest.raises(TypeError, match="inplace_backward: expected a bool"):
        fdpg.token_logprobs(pol, y, backend="torch", inplace_backward="yes")
    with pytest.raises(ValueError, match=r"targets: token ids must lie in \[0, 11\)"):
        fdpg.token_logprobs(pol, y.clone().fill_(11), backend="triton")
    bad = pol.clone()
    bad[1, 2, 4] = math.nan
    with pytest.raises(ValueError, match=r"policy_logits: .*index \(1, 2\)"):
        ops.paired_token_stats(bad, pol, y, backend="triton")
    # without validation an out-of-range id reads nothing out of bounds and gives NaN, not a number
    yy = y.clone()
    yy[0, 0] = 11
    lp = fdpg.token_logprobs(pol, yy, backend="triton", validate=False)
    assert torch.isnan(lp[0, 0]) and torch.isfinite(lp.flatten()[1:]).all()
    # CPU tensors without the interpreter: "triton" raises clearly, "auto" runs the torch reference
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors.*TRITON_INTERPRET"):
        ops.paired_token_stats(pol, pol, y, backend="triton")
    torch.testing.assert_close(fdpg.token_logprobs(pol, y), reference.token_logprobs(pol, y))


@pytest.mark.gpu
@pytest.mark.parametrize("V", [50257, 128256])
def test_gpu_large_vocab_auto_dispatch_and_inplace(V):
    """On CUDA: "auto" runs the fused kernels (CUDA C++ where the extension is built, else Triton); large
    vocabularies in bf16 against float64; in-place backward."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T = 4, 16
    pol = (torch.randn(B, T, V, device="cuda", generator=g) * 3).bfloat16()
    pri = (torch.randn(B, T, V, device="cuda", generator=g) * 3).bfloat16()
    y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.2
    x, d = ref64(pol, pri, y, mask, 0.9)
    w = weights((B, T), torch.Generator().manual_seed(1))
    w = {k: v.cuda() for k, v in w.items()}
    logits = pol.clone().requires_grad_(True)
    work = logits * 1  # a non-leaf whose buffer takes the gradient
    st = ops.paired_token_stats(work, pri, y, mask=mask, entropy=True, kl=True, temperature=0.9,
                                inplace_backward=True)
    assert type(st.policy_lp.grad_fn).__name__ == "_TokenStatsBackward"
    check_stats(st, d, tol=(1e-5, 1e-4))
    loss_of(st._asdict(), w).backward()
    loss_of(d, w).backward()
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(work.detach().double(), x.grad, rtol=1e-2, atol=1e-2)


# One row per program over contiguous columns: a masked head up to the row's first 16-byte-aligned column, unmasked
# full tiles, a masked tail (so that GPU loads are 16-byte vectors whatever V is).
ALIGN_CASES = [
    ("odd V, [:, :-1] view", 333, "view", "contiguous"),     # rows start at varying offsets mod 8
    ("V < 8", 5, "contiguous", "contiguous"),                 # the head alone
    ("V a multiple of the tile", 192, "contiguous", "view"),  # rows a multiple of 8 apart either way
    ("prior misaligned", 130, "contiguous", "view"),         # prior rows at other offsets mod 8 than the policy's
    ("fp32 policy", 201, "contiguous", "contiguous"),
]


@pytest.mark.parametrize("name,V,pol_kind,pri_kind", ALIGN_CASES, ids=[c[0] for c in ALIGN_CASES])
def test_aligned_row_path(name, V, pol_kind, pri_kind, gen, monkeypatch):
    monkeypatch.setattr(K, "FORCE_CONFIG", (1, 64))
    B, T = 2, 5
    dt = torch.float32 if name == "fp32 policy" else torch.bfloat16

    def logits(kind, dtype):
        full = rand_logits((B, T + 1, V), dtype, gen)
        return full[:, :-1] if kind == "view" else full[:, :-1].contiguous()

    pol, pri = logits(pol_kind, dt), logits(pri_kind, torch.float16)
    z, *zl = K.row_layout(pol)
    zp, *zpl = K.row_layout(pri)
    align, prior_aligned = K._alignment(1, (z, zl), (zp, zpl))
    assert align == 8 and prior_aligned == (pol_kind == pri_kind or V % 8 == 0)
    y = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    stats_and_grads_match(pol, pri, y, mask, 0.8, gen, 2e-5 if dt == torch.float32 else 1e-2)


def test_alignment_of_other_row_layouts():
    """Rows of a second tensor are taken as aligned with the main tensor's only when they start at the same offset
    modulo 16 bytes for every row, whichever way each merges its leading dims."""
    def lay(t):
        x, *rest = K.row_layout(t)
        return x, rest

    V, B, T = 20, 3, 4
    full = torch.zeros(B, T + 1, V, dtype=torch.bfloat16)
    view, cont = full[:, :-1], torch.zeros(B, T, V, dtype=torch.bfloat16)   # 2-level (T, (T+1)V) and 1-level
    assert K._alignment(1, lay(view), lay(view)) == (8, True)
    # row r of the view starts at (r // T)(T+1)V + (r % T)V, of the contiguous tensor at rV: (r // T)V = 20 (r // T)
    # apart, not a multiple of 8 for odd r // T
    assert K._alignment(1, lay(view), lay(cont)) == (8, False)
    w = torch.zeros(B, T + 1, 24, dtype=torch.bfloat16)
    assert K._alignment(1, lay(w[:, :-1]), lay(torch.zeros(B, T, 24, dtype=torch.bfloat16))) == (8, True)
    assert K._alignment(2, lay(view), lay(view)) == (1, False)                # several rows per program: tiled
    assert K._alignment(1, lay(view[..., ::2]), lay(view)) == (1, False)      # strided columns
    assert K._alignment(1, lay(view), None) == (8, False)


def test_strided_prior_columns_take_the_tiled_path(gen, monkeypatch):
    """A prior (or output) whose columns are not contiguous keeps the launch on the tiled loop, and is read right."""
    monkeypatch.setattr(K, "FORCE_CONFIG", (1, 64))
    B, T, V = 2, 3, 150
    pol = rand_logits((B, T, V), torch.bfloat16, gen)
    pri = rand_logits((B, T, 2 * V), torch.float32, gen)[..., ::2]
    z, *zl = K.row_layout(pol)
    zp, *zpl = K.row_layout(pri)
    assert K._alignment(1, (z, zl), (zp, zpl)) == (1, False)
    y = torch.randint(0, V, (B, T), generator=gen)
    stats_and_grads_match(pol, pri, y, None, 1.0, gen, 1e-2)
