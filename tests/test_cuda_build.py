"""The CUDA extension (csrc/) builds, links, loads and traces on a machine without a GPU (CI).

Every .cu file is compiled by nvcc for sm_80 and sm_90 (a syntax or template error fails CI), the binding against
the installed torch; the library is linked and loaded, and its ops' schemas, fake kernels and torch.compile tracing
are checked with fake/meta tensors. Nothing CUDA runs here (tests/test_cuda_ops.py does that on a GPU). The compile
steps run in parallel once per module (about 30 s of CPU).
"""
import importlib.util
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fdpg
from fdpg import _cuda, divergences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("_fdpg_cuda_build", os.path.join(ROOT, "csrc", "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

ARCHS = ("80", "90")
NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA build checks need the CUDA toolkit")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every .cu file (sm_80 + sm_90) and the binding in parallel: {source: (object path, error)}."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    d = str(tmp_path_factory.mktemp("fdpg_cuda_build"))
    cmds = {k: build.nvcc_command(os.path.join(build.CSRC, k), os.path.join(d, k + ".o"), ARCHS, NVCC)
            for k in build.KERNELS}
    home = build.cuda_home(NVCC)
    if home is not None:
        cmds[build.BINDING] = build.binding_command(os.path.join(build.CSRC, build.BINDING),
                                                    os.path.join(d, build.BINDING + ".o"), build.torch_paths(), home)

    def one(cmd):
        try:
            build.run(cmd)
            return cmd[cmd.index("-o") + 1], None
        except Exception as e:
            return None, str(e)

    with ThreadPoolExecutor(max_workers=max(2, min(len(cmds), os.cpu_count() or 1))) as ex:
        futures = {k: ex.submit(one, c) for k, c in cmds.items()}
        out = {k: f.result() for k, f in futures.items()}
    out["_dir"] = (d, None)
    out["_home"] = (home, None)
    return out


@needs_nvcc
@pytest.mark.parametrize("source", build.KERNELS)
def test_kernel_compiles_for_sm80_and_sm90(compiled, source):
    obj, err = compiled[source]
    assert err is None, err
    assert os.path.getsize(obj) > 0
    cmd = build.nvcc_command("x.cu", "x.o", ARCHS, NVCC)
    assert "arch=compute_80,code=sm_80" in cmd and "arch=compute_90,code=sm_90" in cmd


@needs_nvcc
def test_binding_compiles_against_installed_torch(compiled):
    if compiled["_home"][0] is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime.h) not found next to nvcc")
    obj, err = compiled[build.BINDING]
    assert err is None, err


@pytest.fixture(scope="module")
def library(compiled):
    """The linked extension, loaded into this process (or the one fdpg already loaded, e.g. on a GPU machine)."""
    if any(compiled[k][1] for k in (*build.KERNELS, build.BINDING) if k in compiled) or build.BINDING not in compiled:
        pytest.skip("the sources did not compile (see the compile tests)")
    home = compiled["_home"][0]
    if build.cudart_dir(home) is None:
        pytest.skip(f"libcudart.so not found under {home}: cannot link the extension here")
    d = compiled["_dir"][0]
    objs = [compiled[k][0] for k in (*build.KERNELS, build.BINDING)]
    path = build.link(objs, os.path.join(d, build.LIB_NAME + ".so"))
    if _cuda.loaded_path() is None:
        _cuda.load_library(path)
    return path


EXPECTED_SCHEMAS = {
    "paired_logprobs_fwd_on_stream":
        "fdpg_cuda::paired_logprobs_fwd_on_stream(Tensor policy_logits, Tensor? prior_logits, Tensor targets, "
        "float temperature, bool with_entropy, bool with_kl, int stream) -> (Tensor policy_lp, Tensor policy_lse, "
        "Tensor policy_max, Tensor prior_lp, Tensor prior_lse, Tensor prior_max, Tensor entropy, Tensor kl)",
    "paired_logprobs_bwd_on_stream":
        "fdpg_cuda::paired_logprobs_bwd_on_stream(Tensor policy_logits, Tensor? prior_logits, Tensor targets, "
        "Tensor policy_lse, Tensor? prior_lse, Tensor? grad_lp, Tensor? grad_lse, Tensor? grad_entropy, "
        "Tensor? grad_kl, Tensor? entropy, Tensor? kl, float temperature, int stream) -> Tensor",
    "paired_logprobs_bwd_inplace_on_stream":
        "fdpg_cuda::paired_logprobs_bwd_inplace_on_stream(Tensor(a!) policy_logits, Tensor? prior_logits, "
        "Tensor targets, Tensor policy_lse, Tensor? prior_lse, Tensor? grad_lp, Tensor? grad_lse, "
        "Tensor? grad_entropy, Tensor? grad_kl, Tensor? entropy, Tensor? kl, float temperature, int stream) -> ()",
    "sequence_sums_on_stream":
        "fdpg_cuda::sequence_sums_on_stream(Tensor token_lp, Tensor? token_lp2, Tensor mask, int stream) "
        "-> (Tensor, Tensor)",
    "coefficients_on_stream":
        "fdpg_cuda::coefficients_on_stream(Tensor policy_logprob, Tensor proposal_logprob, Tensor target_logscore, "
        "Tensor? log_z, float[] exp_coef, float[] exp_rate, float[] rest, int baseline_mode, float baseline_value, "
        "int stream) -> (Tensor coef, Tensor log_z, Tensor weights, Tensor ess, Tensor baseline)",
    "estimates_on_stream":
        "fdpg_cuda::estimates_on_stream(Tensor policy_logprob, Tensor proposal_logprob, Tensor target_logscore, "
        "Tensor? prior_logprob, Tensor? log_z, int stream) -> Tensor",
}
PY_OPS = ("paired_logprobs_fwd", "paired_logprobs_bwd", "paired_logprobs_bwd_inplace", "sequence_sums",
          "coefficients", "estimates")


def test_ops_registered_with_cuda_kernels(library):
    for name, schema in EXPECTED_SCHEMAS.items():
        op = getattr(torch.ops.fdpg_cuda, name).default
        assert str(op._schema) == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
    for name in PY_OPS:  # the stream-free custom ops that torch.compile sees
        op = getattr(torch.ops.fdpg_cuda, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name


@pytest.mark.parametrize("policy_dtype,prior_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                                      (torch.float16, None)])
def test_fake_kernels_shapes_and_dtypes(library, policy_dtype, prior_dtype):
    with FakeTensorMode():
        x = torch.empty(2, 3, 37, device="cuda", dtype=policy_dtype)
        q = None if prior_dtype is None else torch.empty(2, 3, 37, device="cuda", dtype=prior_dtype)
        t = torch.empty(2, 3, device="cuda", dtype=torch.int32)
        has = q is not None
        out = _cuda.paired_logprobs_fwd(x, q, t, 0.7, True, has)
        for o, want in zip(out, (True, True, has, has, True, has)):
            assert (o is not None) == want
            if o is not None:
                assert o.shape == (2, 3) and o.dtype == torch.float32 and o.device.type == "cuda"
        raw = torch.ops.fdpg_cuda.paired_logprobs_fwd_on_stream(x, q, t, 1.0, False, False, 0)
        p = (2, 3) if has else (0,)
        assert [tuple(o.shape) for o in raw] == [(2, 3), (2, 3), (2, 3), p, p, p, (0,), (0,)]
        lp, lse = out[0], out[1]
        g = _cuda.paired_logprobs_bwd(x, q, t, lse, out[3], torch.ones_like(lp), torch.ones_like(lp),
                                      torch.ones_like(lp) if has else None, out[4], out[5], 0.7)
        assert g.shape == x.shape and g.dtype == policy_dtype
        assert _cuda.paired_logprobs_bwd(x, q, t, lse, None, lp, inplace=True) is x
        s = _cuda.sequence_sums(lp, torch.empty(2, 3, device="cuda", dtype=torch.bool))
        assert s.shape == (2,) and s.dtype == torch.float32
        # like logits[:, :2] of a [2, 3, 37] tensor (slicing a fake CUDA tensor needs CUDA)
        xs = torch.empty_strided((2, 2, 37), (3 * 37, 37, 1), device="cuda", dtype=policy_dtype)
        qs = torch.empty_strided((2, 2, 37), (3 * 37, 37, 1), device="cuda", dtype=prior_dtype) if has else None
        st = _cuda.token_stats_forward(xs, qs, torch.empty(2, 2, device="cuda", dtype=torch.long), 1.0, False, has)
        assert set(st) == ({"lp", "lse", "max", "prior_lp", "prior_lse", "prior_max", "kl"} if has
                           else {"lp", "lse", "max"})
        assert all(v.shape == (2, 2) and v.dtype == torch.float32 for v in st.values())
        g = _cuda.token_stats_backward(x, q, t, lse, grad_lse=lse, grad_seq=torch.empty(2, device="cuda"),
                                      mask=t > 0, out=x)
        assert g is x
        s1, s2 = _cuda.masked_row_sums(lp, t > 0, lp)
        assert s1.shape == s2.shape == (2,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_sequence_ops(library, dtype):
    with FakeTensorMode():
        v = torch.empty(11, device="cuda", dtype=dtype)
        coef, lz, w, ess, b = _cuda.coefficients(v, v, v, "alpha", 0.5, -1.5, "value", 0.3)
        assert coef.shape == w.shape == (11,) and lz.shape == ess.shape == b.shape == ()
        assert {t.dtype for t in (coef, lz, w, ess, b)} == {dtype}
        est = _cuda.estimates(v, v, v, v, None)
        assert list(est) == ["kl_p_pi", "kl_pi_p", "tv", "js", "kl_pi_a", "ess", "log_z"]
        assert all(e.shape == () and e.dtype == dtype for e in est.values())
        assert "kl_pi_a" not in _cuda.estimates(v, v, v)


def test_torch_compile_traces_the_ops(library):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(policy, prior, targets, lpi, lq, lP):
        lp, lse, qlp, qlse, ent, kl = _cuda.paired_logprobs_fwd(policy, prior, targets, 0.8, True, True)
        g = _cuda.paired_logprobs_bwd(policy, prior, targets, lse, qlse, torch.ones_like(lp), ent, kl, ent, kl, 0.8,
                                      inplace=True)
        seq = _cuda.sequence_sums(lp.view(2, 3), targets.view(2, 3) > 0)
        coef = _cuda.coefficients(lpi, lq, lP, "js")[0]
        return seq + qlp.view(2, 3).sum(-1), g.sum(), coef * _cuda.estimates(lpi, lq, lP, None, -2.0)["kl_pi_p"]

    args = (torch.randn(6, 37, device="meta", dtype=torch.bfloat16), torch.randn(6, 37, device="meta"),
            torch.zeros(6, device="meta", dtype=torch.long), *(torch.randn(4, device="meta") for _ in range(3)))
    seq, gsum, coef = torch.compile(step, backend=record, fullgraph=True)(*args)
    assert seq.shape == (2,) and gsum.shape == () and coef.shape == (4,)
    called = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {f"fdpg_cuda.{n}" for n in PY_OPS if n != "paired_logprobs_bwd"} <= called, called
    # through AOTAutograd (functionalisation of the in-place backward) too
    seq2, _, _ = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    assert seq2.shape == (2,)


def test_wrappers_reject_bad_input(library):
    with FakeTensorMode():
        x = torch.empty(4, 9, device="cuda", dtype=torch.bfloat16)
        t = torch.empty(4, device="cuda", dtype=torch.long)
        x8 = torch.empty(4, 8, device="cuda", dtype=torch.bfloat16)  # (slicing a fake CUDA tensor needs CUDA)
        t3 = torch.empty(3, device="cuda", dtype=torch.long)
        with pytest.raises(TypeError, match="policy_logits"):
            _cuda.paired_logprobs_fwd(x.double(), None, t)
        with pytest.raises(ValueError, match="prior_logits"):
            _cuda.paired_logprobs_fwd(x, x8, t)
        with pytest.raises(ValueError, match="targets"):
            _cuda.paired_logprobs_fwd(x, None, t3)
        with pytest.raises(TypeError, match="targets"):
            _cuda.paired_logprobs_fwd(x, None, t.float())
        with pytest.raises(ValueError, match="with_kl"):
            _cuda.paired_logprobs_fwd(x, None, t, with_kl=True)
        with pytest.raises(ValueError, match="temperature"):
            _cuda.paired_logprobs_fwd(x, None, t, temperature=0.0)
        with pytest.raises(ValueError, match="grad_kl"):
            _cuda.paired_logprobs_bwd(x, None, t, t.float(), None, t.float(), grad_kl=t.float())
        with pytest.raises(ValueError, match="grad_lp"):
            _cuda.paired_logprobs_bwd(x, None, t, t.float(), None, t3.float())
        v, v4 = torch.empty(5, device="cuda"), torch.empty(4, device="cuda")
        with pytest.raises(ValueError, match="proposal_logprob"):
            _cuda.coefficients(v, v4, v)
        with pytest.raises(ValueError, match="baseline_mode"):
            _cuda.coefficients(v, v, v, baseline_mode="mean")
    with pytest.raises(ValueError, match="CUDA tensors"):
        _cuda.paired_logprobs_fwd(torch.randn(2, 5), None, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tv", "js", "hellinger", "chi2", "alpha:0.5",
                                  "alpha:-0.7", "alpha:2"])
def test_divergence_parameters_reproduce_f_prime(name):
    """The kernel's f'(s) = sum_k c_k exp(a_k s) + r0 + r1 s + r2 sign(s) + r3 softplus(-s) is the library's f'."""
    coef, rate, rest = _cuda.divergence_params(name)
    s = torch.cat([torch.linspace(-30, 30, 601, dtype=torch.float64), torch.tensor([0.0, math.inf])])
    got = torch.zeros_like(s)
    if rest:  # only nonzero terms, as the kernel does (0 * inf would be NaN)
        r0, r1, r2, r3 = rest
        got = got + r0
        if r1:
            got = got + r1 * s
        if r2:
            got = got + r2 * torch.sign(s)
        if r3:
            got = got + r3 * torch.nn.functional.softplus(-s)
    for c, a in zip(coef, rate):
        got = got + c * torch.exp(a * s)
    torch.testing.assert_close(got, divergences.get(name).fprime(s), rtol=1e-12, atol=1e-12)


def test_divergence_parameters_reject_user_divergences():
    d = divergences.Divergence("mine_cuda_test", f=lambda s: torch.expm1(s) ** 4)
    with pytest.raises(ValueError, match="built-in"):
        _cuda.divergence_params(d)
    with pytest.raises(ValueError, match="alpha"):
        _cuda.divergence_params("alpha")
    assert _cuda.divergence_params("alpha", 0.5) == _cuda.divergence_params("alpha:0.5")


def test_import_never_raises_and_reports_why_unavailable():
    assert fdpg is not None
    if not torch.cuda.is_available():
        assert _cuda.available() is False
        assert "CUDA" in _cuda.load_error()


def test_auto_backend_prefers_a_built_cuda_extension(monkeypatch):
    """"auto" on CUDA tensors: the CUDA kernel where the op has one and the extension is ready (never a JIT build),
    else Triton; the torch reference on the CPU."""
    from fdpg.ops import _checks as C

    cuda = torch.device("cuda")
    monkeypatch.setattr(C, "triton_available", lambda: True)
    monkeypatch.setattr(C, "cuda_extension_ready", lambda: True)
    assert C.backend("auto", cuda, cuda_ok=True) == "cuda"
    assert C.backend("auto", cuda) == "triton"  # an op without a CUDA kernel (the fused output layer)
    assert C.backend("auto", torch.device("cpu"), cuda_ok=True) == "torch"
    monkeypatch.setattr(C, "cuda_extension_ready", lambda: False)
    assert C.backend("auto", cuda, cuda_ok=True) == "triton"
    monkeypatch.setattr(C, "triton_available", lambda: False)
    assert C.backend("auto", cuda, cuda_ok=True) == "torch"


def test_ready_never_builds(monkeypatch):
    from fdpg import _cuda

    monkeypatch.setattr(_cuda, "_state", {})
    monkeypatch.setattr(_cuda, "_prebuilt", lambda: [])
    monkeypatch.setattr(_cuda, "_try_load", lambda: pytest.fail("ready() must not try a build"))
    assert _cuda.ready() is False
