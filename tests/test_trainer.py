"""The training loop on tiny models, CPU: convergence, the baseline's variance reduction, every method of the
issue (DPG with the KL-adaptive proposal, f-DPG, KL-control, offline, conditional, distributional), checkpoints
(atomic, exact resume)."""
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from fdpg.config import ConfigError, from_dict
from fdpg.trainer import TIMING_KEYS, Trainer, train

torch.set_num_threads(1)

PRIOR = {"tiny": {"vocab_size": 6, "n_layer": 2, "n_embd": 32, "seed": 0, "eos_token_id": 0,
                  "initializer_range": 0.3}}
CONTAINS_3 = {"constraints": [{"type": "contains_token", "token_id": 3}]}


def config(tmp_path, name="run", **kw):
    d = {"prior": PRIOR, "max_length": 4, "target": CONTAINS_3, "steps": 20, "batch_size": 32, "lr": 3e-3,
         "seed": 0, "eval": {"exact": True, "every": 10}, "progress": False, "output_dir": str(tmp_path / name)}
    d.update(kw)
    return d


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def quiet(msg):
    pass


REQUIRED = ("step", "samples", "kl_p_pi", "kl_pi_p", "kl_pi_a", "tv", "js", "constraint_satisfaction", "log_z",
            "ess", "exact", "samples_per_s", "tokens_per_s")


def test_forward_kl_with_baseline_drives_exact_kl_under_10_percent(tmp_path):
    run = train(config(tmp_path, steps=100, batch_size=64, lr_schedule="cosine", divergence="forward_kl",
                       baseline="batch", eval={"exact": True, "every": 50}), log=quiet)
    m = metrics(run)
    assert [r["step"] for r in m] == [0, 50, 100]
    for r in m:
        assert all(k in r for k in REQUIRED) and r["exact"] is True
    start, end = m[0]["kl_p_pi"], m[-1]["kl_p_pi"]
    assert start == pytest.approx(-m[0]["log_z"], rel=1e-6)     # pi = a at the start: KL(p||a) = -log Z
    assert end < 0.1 * start, (start, end)
    assert m[-1]["constraint_satisfaction"] > 0.95 > m[0]["constraint_satisfaction"]
    assert m[-1]["samples"] == 100 * 64 and m[-1]["samples_per_s"] > 0 and m[-1]["tokens_per_s"] > 0
    assert (run / "policy" / "model.safetensors").exists() and (run / "config.yaml").exists()


def gradient_estimates(tmp_path, baseline, n_batches=60):
    """Gradient estimates of n_batches fresh batches at the same parameters (the prior's), flattened."""
    tr = Trainer(from_dict(config(tmp_path, name=f"g{baseline}", baseline=baseline, batch_size=16)), log=quiet)
    la, ts = tr._exact_cache[0]               # log Z fixed at its exact value for both
    tr.z_logsum = torch.logsumexp(la + ts.log_b.double(), 0).reshape(1)
    tr.z_count = torch.ones(1, dtype=torch.float64)
    params = [p for p in tr.policy.parameters() if p.requires_grad]
    grads = []
    for _ in range(n_batches):
        loss, _, _ = tr.batch_loss(tr.next_batch(), update_log_z=False)
        g = torch.autograd.grad(loss, params)
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(grads).double()


def test_baseline_reduces_gradient_variance(tmp_path):
    # the same parameters (the prior's) and the same, exact log Z for both; only the baseline differs
    g_none = gradient_estimates(tmp_path, "none")
    g_batch = gradient_estimates(tmp_path, "batch")
    var = lambda g: ((g - g.mean(0)) ** 2).sum(1).mean().item()  # noqa: E731   trace of the covariance
    v_none, v_batch = var(g_none), var(g_batch)
    assert v_batch < 0.6 * v_none, (v_batch, v_none)
    # both estimate the same gradient: the means agree within their standard errors
    se = math.sqrt((v_none + v_batch) / g_none.shape[0])
    assert (g_none.mean(0) - g_batch.mean(0)).norm().item() < 4 * se


@pytest.mark.parametrize("div,extra", [
    ("js", {}),
    ("reverse_kl", {"log_b_floor": math.log(1e-3)}),
    ("tv", {"baseline": "none"}),
    ("forward_kl", {"baseline": -1.0}),          # GDC++'s exact baseline for forward KL
    ("hellinger", {}),
])
def test_other_divergences_decrease_kl(tmp_path, div, extra):
    m = metrics(train(config(tmp_path, divergence=div, steps=30, lr_schedule="cosine", **extra), log=quiet))
    assert m[-1]["kl_p_pi"] < 0.5 * m[0]["kl_p_pi"], (div, m[0]["kl_p_pi"], m[-1]["kl_p_pi"])


def test_dpg_kl_adaptive_proposal(tmp_path):
    # DPG / GDC: forward KL, no baseline, off-policy q replaced by pi when pi is closer to p
    run = train(config(tmp_path, divergence="forward_kl", baseline="none", steps=40, lr=5e-3,
                       proposal={"update": "kl_adaptive", "every": 5}, eval={"exact": True, "every": 20}),
                log=quiet)
    m = metrics(run)
    assert m[-1]["proposal_updates"] >= 1 and m[-1]["kl_p_q"] is not None
    assert m[-1]["kl_p_pi"] < 0.6 * m[0]["kl_p_pi"]
    assert 1 <= m[-1]["ess"] <= 32


def test_kl_control_reverse_kl_logs_reward_and_kl_to_prior(tmp_path):
    target = {"reward": {"type": "token_count", "token_id": 5, "weight": 1.0}, "beta": 0.5}
    m = metrics(train(config(tmp_path, target=target, divergence="reverse_kl", steps=30, lr_schedule="cosine"),
                      log=quiet))
    assert m[0]["kl_pi_a"] == pytest.approx(0.0, abs=1e-9)
    assert m[-1]["reward"] > m[0]["reward"] + 0.2
    assert m[-1]["kl_pi_a"] > 0.05
    assert m[-1]["kl_pi_p"] < 0.5 * m[0]["kl_pi_p"]
    # KL-control: the objective E_pi[r] - beta KL(pi||a) = beta (log Z - KL(pi||p)) rises toward beta log Z
    obj = [r["reward"] - 0.5 * r["kl_pi_a"] for r in m]
    for r, o in zip(m, obj):
        assert o == pytest.approx(0.5 * (r["log_z"] - r["kl_pi_p"]), abs=1e-6)
    assert obj[-1] > obj[0]


def write_offline(tmp_path, n=256):
    """Samples of the prior with their log-probs, as `fdpg sample` would write them."""
    from fdpg.models import build_tiny
    from fdpg.sampling import sample

    prior = build_tiny(**PRIOR["tiny"])
    s = sample(prior, n, 4, eos_token_id=0, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "batch.jsonl"
    with open(path, "w") as f:
        for toks, k, lp in zip(s.tokens.tolist(), s.mask.sum(1).tolist(), s.logprob.tolist()):
            f.write(json.dumps({"tokens": toks[:k], "logprob": lp}) + "\n")
    return path, s


def test_offline_jsonl_training(tmp_path):
    path, _ = write_offline(tmp_path)
    m = metrics(train(config(tmp_path, offline=str(path), steps=30, lr_schedule="cosine"), log=quiet))
    assert m[-1]["samples"] == 30 * 32
    assert m[-1]["kl_p_pi"] < 0.6 * m[0]["kl_p_pi"]
    assert m[-1]["ess"] < 32                               # q fixed: the weights pi/q drift from 1


def test_offline_tensor_file_and_bad_files(tmp_path):
    _, s = write_offline(tmp_path, n=64)
    pt = tmp_path / "batch.pt"
    torch.save({"tokens": s.tokens, "logprob": s.logprob}, pt)
    m = metrics(train(config(tmp_path, offline=str(pt), steps=4, eval={"exact": True, "every": 4}), log=quiet))
    assert len(m) == 2
    bad = tmp_path / "bad.jsonl"
    cases = [
        ("", "empty"),
        ('{"tokens": [1, 0], "logprob": -1.0}\n{"logprob": -2.0}\n', "line 2: missing 'tokens'"),
        ('{"tokens": [1, 9], "logprob": -1.0}\n', "line 1: token id 9"),
        ('{"tokens": [1, 2, 3, 4, 5], "logprob": -1.0}\n', "longer than max_length"),
        ('{"tokens": [1, 0, 2], "logprob": -1.0}\n', "after EOS"),
        ('{"tokens": [1, 0], "logprob": NaN}\n', "line 1: 'logprob' must be a number"),
        ('{"tokens": [1, 0], "logprob": -1.0, "reward": NaN}\n', "line 1: 'reward' must be a number"),
        ('{"tokens": [1, 0]}\n', "line 1: missing 'logprob'"),
        ('{"tokens": [1, 0], "logprob": -1.0}\n{"tokens": [1, 2], "logprob": -1.0}\n',
         "line 2: a row of 2 tokens ends without EOS (0) before max_length (4): a prefix"),
    ]
    for text, msg in cases:
        bad.write_text(text)
        with pytest.raises(ConfigError) as e:
            Trainer(from_dict(config(tmp_path, offline=str(bad))), log=quiet)
        assert e.value.key == "offline" and str(bad) in str(e.value) and msg in str(e.value), (msg, str(e.value))
    T = torch.tensor
    tok, lp = T([[1, 2, 0, 0], [3, 3, 3, 3]]), T([-1.0, -2.0])
    cases = [({"tokens": tok.bool(), "logprob": lp}, "'tokens' must be an integer tensor"),
             ({"tokens": tok, "logprob": lp, "mask": [[1, 1, 1, 0], [1, 1, 1, 1]]}, "'mask' must be a tensor"),
             ({"tokens": tok, "logprob": lp, "mask": T([[1, 0, 1, 0], [1, 1, 1, 1]])}, "'mask' must cover a prefix"),
             ({"tokens": tok, "logprob": lp, "mask": T([[1, 1, 1, 1], [1, 1, 1, 1]])}, "continue after EOS"),
             ({"tokens": tok, "logprob": lp, "mask": T([[1, 1, 1, 0], [1, 1, 0, 0]])}, "a row of 2 tokens ends"),
             ({"tokens": tok[:, :3], "logprob": lp}, "a row of 3 tokens ends without EOS"),
             ({"tokens": tok, "logprob": lp, "reward": [1.0, 2.0]}, "'reward' must be a finite tensor")]
    for d, msg in cases:
        torch.save(d, pt)
        with pytest.raises(ConfigError) as e:
            Trainer(from_dict(config(tmp_path, offline=str(pt))), log=quiet)
        assert e.value.key == "offline" and msg in str(e.value), (msg, str(e.value))


def test_conditional_target_with_prompts(tmp_path):
    prompts = [[0], [0, 3], [0, 1, 2]]
    tr = Trainer(from_dict(config(tmp_path, prompts=prompts, samples_per_context=4, batch_size=24, steps=40,
                                  target={"constraints": [{"type": "contains_token", "token_id": 5}]},
                                  lr_schedule="cosine")), log=quiet)
    assert len(tr._exact_cache) == 3
    m = metrics(tr.train())
    assert m[-1]["kl_p_pi"] < 0.6 * m[0]["kl_p_pi"]
    # one running log Z per context, near each context's exact log Z
    exact_lz = torch.tensor([torch.logsumexp(la + ts.log_b, 0).item() for la, ts in tr._exact_cache])
    assert torch.isfinite(tr.log_z()).all()
    torch.testing.assert_close(tr.log_z().float(), exact_lz.float(), atol=0.5, rtol=0)


def test_distributional_constraint_fits_lambda(tmp_path):
    target = {"features": [{"type": "contains_token", "token_id": 5, "mu_bar": 0.5}],
              "lambda_fit": {"n_samples": 4096}}
    tr = Trainer(from_dict(config(tmp_path, target=target, steps=20, lr_schedule="cosine")), log=quiet)
    assert tr.fit_report["converged"] and tr.fit_report["moments"][0] == pytest.approx(0.5, abs=1e-3)
    # the fitted target's exact moment is near mu_bar (lambda was fitted on 4096 samples: standard error ~0.015)
    la, ts = tr._exact_cache[0]
    p = torch.softmax(la + ts.log_b.double(), 0)
    assert (p @ ts.features[:, 0].double()).item() == pytest.approx(0.5, abs=0.06)
    m = metrics(tr.train())
    assert m[0]["moments"][0] < 0.3 and abs(m[-1]["moments"][0] - 0.5) < 0.5 * abs(m[0]["moments"][0] - 0.5)
    report = json.loads((tmp_path / "run" / "target.json").read_text())
    assert report["lambdas"] == tr.fit_report["lambdas"]


def test_grad_accum_schedule_and_loaded_prior(tmp_path):
    from fdpg.models import build_tiny

    build_tiny(**PRIOR["tiny"]).save_pretrained(tmp_path / "prior")
    cfg = config(tmp_path, prior=str(tmp_path / "prior"), grad_accum=2, lr_schedule="linear", warmup_steps=2,
                 steps=6, eval={"exact": True, "every": 3}, output_layer="fused", z_estimate="batch")
    m = metrics(train(cfg, log=quiet))
    assert [r["step"] for r in m] == [0, 3, 6] and m[-1]["samples"] == 6 * 2 * 32
    assert m[-1]["lr"] == pytest.approx(0.0)
    # the loaded prior is the tiny one: the same start
    m2 = metrics(train(config(tmp_path, name="r2", steps=1, eval={"exact": True, "every": 1}), log=quiet))
    assert m[0]["kl_p_pi"] == pytest.approx(m2[0]["kl_p_pi"], abs=1e-9)


def test_estimated_metrics_when_not_listing(tmp_path):
    m = metrics(train(config(tmp_path, steps=2, eval={"exact": False, "every": 2, "n_samples": 256}), log=quiet))
    exact = metrics(train(config(tmp_path, name="ex", steps=2, eval={"exact": True, "every": 2}), log=quiet))
    assert m[0]["exact"] is False and m[0]["ess"] is None
    assert m[0]["kl_p_pi"] == pytest.approx(exact[0]["kl_p_pi"], abs=0.25)
    assert m[0]["constraint_satisfaction"] == pytest.approx(exact[0]["constraint_satisfaction"], abs=0.1)
    assert m[0]["kl_pi_p"] is None          # infinite: pi puts mass where P = 0


# ---- checkpoints ----------------------------------------------------------------------------------------------

def resume_config(tmp_path, name, steps=8):
    # KL-adaptive proposal and estimated metrics: every RNG stream and every piece of state takes part
    return config(tmp_path, name=name, steps=steps, batch_size=16, checkpoint_every=3,
                  proposal={"update": "kl_adaptive", "every": 2},
                  eval={"exact": False, "every": 2, "n_samples": 32})


def strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


class Killed(Exception):
    pass


def test_interrupted_and_resumed_run_gives_the_same_metrics(tmp_path, monkeypatch):
    full = metrics(train(resume_config(tmp_path, "full"), log=quiet))
    assert [r["step"] for r in full] == [0, 2, 4, 6, 8]

    real_step = Trainer.train_step

    def dying_step(self):
        if self.step == 5:          # killed after step 5; the last checkpoint is step 3
            raise Killed()
        real_step(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        train(resume_config(tmp_path, "cut"), log=quiet)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    ck = tmp_path / "cut" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-00000003"
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [0, 2, 4]
    with pytest.raises(ConfigError) as e:               # not silently overwritten
        train(resume_config(tmp_path, "cut"), log=quiet)
    assert e.value.key == "output_dir"
    resumed = metrics(train(resume_config(tmp_path, "cut"), resume=True, log=quiet))
    assert strip(resumed) == strip(full)
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-00000006", "step-00000008"]   # keep_checkpoints 2


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    cfg = config(tmp_path, steps=3, batch_size=8, checkpoint_every=3, eval={"exact": True, "every": 3})
    train(cfg, log=quiet)
    ck = tmp_path / "run" / "checkpoints"
    before = {p.name: p.stat().st_size for p in (ck / "step-00000003").iterdir()}

    real_save = torch.save

    def crash(obj, f, *a, **k):     # the policy is written, then the process dies while writing the state
        real_save({"partial": True}, f)
        raise Killed()

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(Killed):
        train(dict(cfg, steps=6), resume=True, log=quiet)
    monkeypatch.setattr(torch, "save", real_save)
    assert (ck / "latest").read_text().strip() == "step-00000003"
    assert not (ck / "step-00000006").exists()
    assert {p.name: p.stat().st_size for p in (ck / "step-00000003").iterdir()} == before
    # the leftover temporary directory is ignored, and the run resumes from step 3 to the end
    assert any(p.name.startswith(".tmp-") for p in ck.iterdir())
    m = metrics(train(dict(cfg, steps=6), resume=True, log=quiet))
    assert [r["step"] for r in m] == [0, 3, 6]
    assert (ck / "latest").read_text().strip() == "step-00000006"


def test_resume_without_checkpoint_starts_afresh(tmp_path):
    msgs = []
    m = metrics(train(config(tmp_path, steps=2, eval={"exact": True, "every": 2}), resume=True, log=msgs.append))
    assert [r["step"] for r in m] == [0, 2] and any("no checkpoint" in s for s in msgs)


def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    tr = Trainer(from_dict(config(tmp_path, steps=4)), log=quiet)
    tr.train_step()
    ckpt = tr.save_checkpoint()
    with torch.no_grad():
        next(tr.policy.parameters()).fill_(math.nan)
    with pytest.raises(FloatingPointError, match="training diverged at step 1: sample: the model's logits hold NaN"):
        tr.train_step()                  # values checked (the CPU's default): the sampler finds NaN logits
    os.environ["FDPG_VALIDATE"] = "0"    # unchecked (a GPU's default): the next evaluation finds the NaN loss
    try:
        tr.train_step()
        with pytest.raises(FloatingPointError, match="training diverged: the loss is nan at step 2"):
            tr.record()
    finally:
        del os.environ["FDPG_VALIDATE"]
    assert ckpt.exists() and (ckpt / "trainer.pt").exists()


def test_a_diverged_run_writes_no_checkpoint(tmp_path):
    """Checkpoints between evaluations: the one after the weights went NaN is refused, the good ones are kept, and
    the run stops there (train() with eval.every beyond the divergence)."""
    cfg = config(tmp_path, steps=6, checkpoint_every=1, keep_checkpoints=2, eval={"exact": False, "every": 6})
    tr = Trainer(from_dict(cfg), log=quiet)
    real, calls = tr.train_step, []

    def step():
        real()
        calls.append(tr.step)
        if tr.step == 3:
            with torch.no_grad():
                next(tr.policy.parameters()).fill_(math.nan)
    tr.train_step = step
    with pytest.raises(FloatingPointError, match="a policy weight is not finite at step 3 .*none was written"):
        tr.train()
    ck = Path(cfg["output_dir"]) / "checkpoints"
    assert calls == [1, 2, 3] and (ck / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-00000001", "step-00000002"]
    state = torch.load(ck / "step-00000002" / "trainer.pt", weights_only=False)
    assert state["step"] == 2


def test_resume_refuses_a_different_problem(tmp_path):
    cfg = config(tmp_path, steps=2, checkpoint_every=2)
    train(cfg, log=quiet)
    with pytest.raises(ConfigError, match="divergence: differs from the checkpoint's"):
        train({**cfg, "steps": 4, "divergence": "js"}, resume=True, log=quiet)
    # how the run is observed may change
    run = train({**cfg, "steps": 4, "eval": {"exact": True, "every": 1}}, resume=True, log=quiet)
    assert metrics(run)[-1]["step"] == 4


@pytest.mark.parametrize("prompts", [None, [[0], [0, 3], [0, 1, 2]]])
def test_replayed_sampling_pass_gives_the_forward_pass_gradient(tmp_path, prompts):
    """On-policy on the CPU the policy's scoring pass is replayed from the recorded sampling pass: the same log pi
    and the same gradient as a fresh forward pass; a weight update voids the recording."""
    kw = dict(prompts=prompts, samples_per_context=4, batch_size=24) if prompts else {}
    tr = Trainer(from_dict(config(tmp_path, max_length=6, eval={"exact": False}, **kw)), log=quiet)
    s = tr.next_batch()
    assert s.replay is not None and (s.context_mask is not None) == bool(prompts)

    def grads(samples):
        tr.optimizer.zero_grad(set_to_none=True)
        loss, _, sc = tr.batch_loss(samples, update_log_z=False)
        loss.backward()
        return sc.policy_lp.detach(), {n: p.grad.clone() for n, p in tr.policy.named_parameters()}

    lp_replay, g_replay = grads(s)
    lp_fwd, g_fwd = grads(dataclasses.replace(s, replay=None))
    torch.testing.assert_close(lp_replay, lp_fwd, atol=1e-5, rtol=1e-5)
    assert g_replay.keys() == g_fwd.keys()
    for n in g_fwd:
        torch.testing.assert_close(g_replay[n], g_fwd[n], atol=1e-6, rtol=1e-4, msg=n)
    tr._optimizer_step()
    assert s.replay() is None                     # the recording belongs to the weights before the step
    assert tr.next_batch().replay is not None


def test_fast_cpu_gemms_give_torchs_gradient(tmp_path, monkeypatch):
    """Every GEMM of the scoring passes and the backward through fdpg.cpu_gemm's native kernel and oneDNN (forced
    at the tiny sizes), against torch.mm's (FDPG_CPU_GEMM=torch) on the same batch: log pi, log a and every
    gradient to float32 rounding."""
    from fdpg import cpu_gemm

    if cpu_gemm.onednn_reason() is not None or cpu_gemm._native_reason() is not None:
        pytest.skip("no fast CPU GEMM here")
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    calls = []
    lin = cpu_gemm._lin
    monkeypatch.setattr(cpu_gemm, "_lin", lambda *a: calls.append(1) or lin(*a))
    tr = Trainer(from_dict(config(tmp_path, max_length=6, eval={"exact": False})), log=quiet)
    s = tr.next_batch()

    def grads():
        tr.optimizer.zero_grad(set_to_none=True)
        loss, _, sc = tr.batch_loss(s, update_log_z=False)
        loss.backward()
        return sc.policy_lp.detach(), sc.prior_lp, {n: p.grad.clone() for n, p in tr.policy.named_parameters()}

    fast = grads()
    assert calls
    monkeypatch.setenv("FDPG_CPU_GEMM", "torch")
    calls.clear()
    slow = grads()
    assert not calls
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-5, rtol=1e-5)
    for n in slow[2]:
        torch.testing.assert_close(fast[2][n], slow[2][n], atol=1e-6, rtol=1e-4, msg=n)


class _SyncOps(TorchDispatchMode):
    """Records the ops that make the host wait for the device (a value read, or an output sized by the data)."""

    SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
            "unique_dim", "repeat_interleave", "equal"}

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNC:
            self.hits.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [{}, {"prompts": [[0], [0, 3], [0, 1, 2]], "samples_per_context": 4, "batch_size": 24},
                                {"baseline": "none", "proposal": {"update": "kl_adaptive", "every": 1000}},
                                {"divergence": "reverse_kl", "target": {"constraints": []}, "log_b_floor": -5.0}],
                         ids=["on-policy", "prompts", "proposal", "kl-control"])
def test_no_host_sync_in_a_step_past_sampling(tmp_path, kw):
    """Scoring, log Z, coefficients, backward, clipping and AdamW read no value back to the host (on a GPU each
    would stall the stream); the ops are the same on the CPU, where this counts them."""
    tr = Trainer(from_dict(config(tmp_path, max_length=6, eval={"exact": False}, **kw)), log=quiet)
    tr.train_step()
    s = tr.next_batch()
    with _SyncOps() as mode:
        loss, _, _ = tr.batch_loss(s)
        loss.backward()
        tr._optimizer_step()
    assert mode.hits == []


def test_eos_token_id_chooses_among_the_models_eos_tokens(tmp_path):
    """A model listing several EOS tokens (a chat model's end-of-text and end-of-turn): the first ends sequences
    unless ``eos_token_id`` names another; the log says so; a token outside the vocabulary is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path / "llama"
    cfg = LlamaConfig(vocab_size=7, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1,
                      eos_token_id=[0, 6], pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    msgs = []
    base = config(tmp_path, prior=str(path), max_length=6, eval={"exact": False}, steps=1)
    tr = Trainer(from_dict(base), log=msgs.append)
    assert tr.eos == 0 and any("lists EOS tokens [0, 6]; sequences end at the first, 0" in m for m in msgs)
    tr = Trainer(from_dict({**base, "eos_token_id": 6, "output_dir": str(tmp_path / "six")}), log=quiet)
    s = tr.next_batch()
    assert tr.eos == 6
    for row, m in zip(s.tokens.tolist(), s.mask.tolist()):
        n = sum(m)
        assert 6 not in row[:n - 1] and (n == len(row) or row[n - 1] == 6)   # ends at its first 6, or runs full
    assert any(6 in row for row in s.tokens.tolist())
    with pytest.raises(ConfigError, match=r"eos_token_id: token id 9 is outside the vocabulary \[0, 7\)"):
        Trainer(from_dict({**base, "eos_token_id": 9, "output_dir": str(tmp_path / "nine")}), log=quiet)


def test_kl_adaptive_estimate_with_a_batch_log_z(tmp_path):
    """z_estimate: batch keeps no running log Z: the proposal's KL(p || q) estimate takes log Z from its own
    samples (it used Z = 1 and logged negative KLs); at step 0 (q = pi) it estimates the exact KL(p || pi)."""
    tr = Trainer(from_dict(config(tmp_path, z_estimate="batch", eval={"exact": True},
                                  proposal={"update": "kl_adaptive", "every": 1000, "n_samples": 6000})), log=quiet)
    tr._update_proposal()
    exact = tr.evaluate()["kl_p_pi"]
    assert tr.last_kl_p_q == pytest.approx(exact, abs=0.1 * max(exact, 0.2))
