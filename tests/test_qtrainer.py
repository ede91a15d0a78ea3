"""Psi-learning and KL-control Q-learning from a fixed batch (fdpg.qtrainer) on tiny GPT-2 priors, CPU: the offline
batch written by `fdpg sample`, convergence to p_beta on a listed space, the two routes (on-policy reverse-KL f-DPG
and offline Psi-learning) to one target, the Monte-Carlo dropout lower bound, the TD terms against the
straightforward full-softmax implementation, the target network (Polyak, checkpointed, exact resume), bad input."""
import json
import math

import pytest
import torch
import yaml

from fdpg import exact, qlearning as Q
from fdpg.cli import main
from fdpg.config import ConfigError, from_dict
from fdpg.models import _logits, build_tiny, model_inputs
from fdpg.qtrainer import QTrainer, sample_batch
from fdpg.trainer import TIMING_KEYS, train

torch.set_num_threads(1)

PRIOR = {"tiny": {"vocab_size": 5, "n_layer": 2, "n_embd": 32, "seed": 0, "initializer_range": 0.3}}
REWARD = {"reward": {"type": "token_count", "token_id": 2, "weight": 1.0}, "beta": 1.0}


def quiet(msg):
    pass


def psi_config(tmp, name="psi", **kw):
    d = {"algorithm": "psi_learning", "prior": PRIOR, "max_length": 4, "target": REWARD, "offline": None,
         "gamma": 1.0, "target_update": 0.05, "steps": 200, "batch_size": 64, "lr": 3e-3, "seed": 0,
         "eval": {"exact": True, "every": 50}, "progress": False, "output_dir": str(tmp / name)}
    d.update(kw)
    return d


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("q")


@pytest.fixture(scope="module")
def batch(work):
    """2000 prior samples with rewards, written by `fdpg sample`."""
    cfg = work / "psi.yaml"
    cfg.write_text(yaml.safe_dump(psi_config(work, offline=str(work / "batch.jsonl"))))
    assert main(["sample", str(cfg), "--n", "2000", "--out", str(work / "batch.jsonl"), "--seed", "1"]) == 0
    return work / "batch.jsonl"


@pytest.fixture(scope="module")
def psi_run(work, batch):
    return train(psi_config(work, offline=str(batch)), log=quiet)


@pytest.fixture(scope="module")
def fdpg_run(work):
    cfg = {"prior": PRIOR, "max_length": 4, "target": REWARD, "divergence": "reverse_kl", "steps": 100,
           "batch_size": 64, "lr": 3e-3, "lr_schedule": "cosine", "seed": 0, "eval": {"exact": True, "every": 50},
           "progress": False, "output_dir": str(work / "fdpg")}
    return train(cfg, log=quiet)


# ---- the offline batch -----------------------------------------------------------------------------------------

def test_sample_writes_prior_samples_with_logprob_and_reward(batch):
    rows = [json.loads(line) for line in open(batch)]
    assert len(rows) == 2000 and all(set(r) == {"tokens", "logprob", "reward"} for r in rows)
    prior = build_tiny(**PRIOR["tiny"])
    space = exact.enumerate_space(5, 4, 0)
    la = exact.space_logprobs(prior, space)
    index = {tuple(t[:int(m.sum())]): i for i, (t, m) in enumerate(zip(space.tokens.tolist(), space.mask))}
    for r in rows[:200]:
        assert r["reward"] == r["tokens"].count(2)
        assert r["logprob"] == pytest.approx(float(la[index[tuple(r["tokens"])]]), abs=1e-4)
    # the draws follow the prior: the empirical mean of log a(x) is close to its exact mean (minus entropy)
    mean_lp = sum(r["logprob"] for r in rows) / len(rows)
    exact_mean = float((la.exp() * la).sum())
    assert abs(mean_lp - exact_mean) < 0.15


# ---- convergence, two routes, dropout ---------------------------------------------------------------------------

def test_psi_learning_from_prior_samples_drives_exact_kl_under_10_percent(psi_run):
    m = metrics(psi_run)
    assert [r["step"] for r in m] == [0, 50, 100, 150, 200] and all(r["exact"] for r in m)
    start, end = m[0]["kl_p_pi"], m[-1]["kl_p_pi"]
    assert m[0]["kl_pi_a"] == pytest.approx(0.0, abs=1e-9)             # the Q-network starts as the prior
    assert end < 0.1 * start, (start, end)
    assert m[-1]["kl_pi_p"] < 0.1 * m[0]["kl_pi_p"]
    # V(s_0) approaches its fixed point log Z; the TD loss falls; E_pi[R] rises toward E_p[R]
    assert abs(m[-1]["v0_minus_log_z"]) < 0.1 < abs(m[0]["v0_minus_log_z"])
    assert m[-1]["v0"] - m[-1]["log_z"] == pytest.approx(m[-1]["v0_minus_log_z"])
    assert m[-1]["td_loss"] < 0.2 * m[1]["td_loss"]
    assert m[-1]["reward"] > m[0]["reward"] + 0.3
    for k in ("q_mean", "kl_pi_a", "samples_per_s", "tokens_per_s", "lr"):
        assert m[-1][k] is not None
    assert (psi_run / "policy" / "model.safetensors").exists()


def test_two_routes_one_target(psi_run, fdpg_run, work, capsys):
    on, off = metrics(fdpg_run), metrics(psi_run)
    assert on[0]["log_z"] == pytest.approx(off[0]["log_z"], abs=1e-9)          # one target p_beta
    assert on[0]["kl_p_pi"] == pytest.approx(off[0]["kl_p_pi"], abs=1e-9)      # from one prior
    for m in (on, off):
        assert m[-1]["kl_p_pi"] < 0.1 * m[0]["kl_p_pi"] and m[-1]["kl_pi_p"] < 0.1 * m[0]["kl_pi_p"]
    png = work / "two_routes.png"
    assert main(["plot", str(fdpg_run), str(psi_run), "--out", str(png), "--label", "reverse-KL f-DPG (on-policy)",
                 "--label", "Psi-learning (offline)", "--title", "KL(p_beta || pi), exact"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(fdpg_run), str(psi_run), "--out", str(png), "--label", "one"]) == 2
    assert "--label" in capsys.readouterr().err


def test_mc_dropout_lower_bound_reduces_overestimation(work, capsys):
    # a batch of 300 samples covers the 1,111 sequences (vocabulary 6, length 4) poorly
    prior = {"tiny": {**PRIOR["tiny"], "vocab_size": 6, "dropout": 0.1}}
    path = sample_batch(psi_config(work, prior=prior, offline="x"), 300, work / "small.jsonl", seed=3)
    over = {}
    for M in (0, 4):
        run = train(psi_config(work, f"mc{M}", prior=prior, offline=str(path), mc_dropout=M, steps=100,
                               eval={"exact": True, "every": 100}), log=quiet)
        m = metrics(run)
        over[M] = m[-1]["v0_minus_log_z"]
        assert m[0]["v0_minus_log_z"] == pytest.approx(metrics(run)[0]["v0"] - m[0]["log_z"])
    with capsys.disabled():
        print(f"\nmean V(s_0) - log Z after 100 steps on 300 samples: {over[0]:.4f} without dropout, "
              f"{over[4]:.4f} with the MC-dropout lower bound (M = 4, p = 0.1)")
    assert over[0] > 0.05, over                        # over-estimation without the bound
    assert over[4] < over[0] - 0.1, over               # the bound removes a measurable part of it


# ---- the TD step against the straightforward implementation ----------------------------------------------------

@pytest.fixture(scope="module")
def small_batch(work):
    return sample_batch(psi_config(work, offline="x"), 64, work / "b64.jsonl", seed=7)


def q_trainer(work, small_batch, name, **kw):
    prior = {"tiny": {**PRIOR["tiny"], "dropout": 0.1}}
    return QTrainer(from_dict(psi_config(work, name, **{"prior": prior, "offline": str(small_batch),
                                                        "batch_size": 24, **kw})), log=quiet)


@pytest.mark.parametrize("kw", [
    {"algorithm": "psi_learning"},
    {"algorithm": "psi_learning", "mc_dropout": 3, "gamma": 0.9, "loss": "mse"},
    {"algorithm": "q_learning", "kl_reward": {"kind": "sampled", "weight": 0.3}, "mc_dropout": 2},
    {"algorithm": "q_learning", "kl_reward": {"kind": "exact"}},
    {"algorithm": "q_learning", "loss": "mse"},
], ids=["psi", "psi-mc-mse", "q-sampled-mc", "q-exact", "q-none"])
def test_td_terms_match_the_straightforward_implementation(work, small_batch, kw):
    tr = q_trainer(work, small_batch, "td", **kw)
    for p in tr.target_net.parameters():     # a target network that differs from the policy
        p.data.add_(0.05 * torch.randn_like(p))
    s, reward = tr.next_batch()
    torch.manual_seed(11)
    terms = tr.td_terms(s, reward)
    params = [p for p in tr.policy.parameters() if p.requires_grad]
    g = torch.autograd.grad(terms.loss, params)

    inp = model_inputs(s.context_ids, s.context_mask, s.tokens)
    sl = slice(inp.P - 1, inp.P + s.tokens.shape[1] - 1)
    z_pi, z_a = _logits(tr.policy, inp)[:, sl], _logits(tr.prior, inp)[:, sl].detach()
    torch.manual_seed(11)
    M = tr.cfg.mc_dropout
    tr.target_net.train(M > 1)
    with torch.no_grad():
        z_t = [_logits(tr.target_net, inp)[:, sl] for _ in range(max(M, 1))]
    tr.target_net.eval()
    if M > 1:
        assert not torch.equal(z_t[0], z_t[1])            # dropout acts in the Monte-Carlo passes only
    ref, q_ref, y_ref = Q.reference_td_loss(z_pi, z_a, z_t, s.tokens, s.mask, reward, algorithm=tr.cfg.algorithm,
                                           beta=tr.cfg.target.beta, gamma=tr.cfg.gamma, kl_kind=tr.kl_kind,
                                           kl_weight=tr.kl_weight, loss=tr.cfg.loss)
    m = s.mask
    torch.testing.assert_close(terms.targets[m], y_ref[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.q_taken[m], q_ref[m].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    g_ref = torch.autograd.grad(ref, params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if tr.kl_kind == "exact":
        assert tr.kl_weight == tr.cfg.target.beta          # the KL weight defaults to beta


@pytest.mark.parametrize("algorithm", ["psi_learning", "q_learning"])
def test_fused_output_layer_gives_the_same_td_terms(work, small_batch, algorithm):
    tr = q_trainer(work, small_batch, "fused", algorithm=algorithm, output_layer="fused", mc_dropout=2,
                   **({"kl_reward": {"kind": "sampled"}} if algorithm == "q_learning" else {}))
    assert tr.fused
    s, reward = tr.next_batch()
    torch.manual_seed(3)
    fused = tr.td_terms(s, reward)
    tr.fused = False
    torch.manual_seed(3)
    plain = tr.td_terms(s, reward)
    m = s.mask
    torch.testing.assert_close(fused.targets[m], plain.targets[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)


def test_target_network_is_a_polyak_average_and_the_prior_stays_frozen(work, small_batch):
    tr = q_trainer(work, small_batch, "polyak", target_update=0.25, mc_dropout=2)
    prior0 = {k: v.clone() for k, v in tr.prior.state_dict().items()}
    pol0 = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    for a, b in zip(tr.target_net.parameters(), tr.policy.parameters()):
        assert torch.equal(a, b)                               # Q-network and target start as the prior
    tgt0 = [p.clone() for p in tr.target_net.parameters()]
    tr.train_step()
    for t0, t1, p in zip(tgt0, tr.target_net.parameters(), tr.policy.parameters()):
        torch.testing.assert_close(t1, 0.25 * p.detach() + 0.75 * t0)
    assert any(not torch.equal(pol0[k], v) for k, v in tr.policy.state_dict().items())
    assert all(torch.equal(prior0[k], v) for k, v in tr.prior.state_dict().items())
    assert not tr.prior.training and not tr.policy.training and not tr.target_net.training


def test_interrupted_and_resumed_run_gives_the_same_metrics(work, small_batch):
    kw = dict(prior={"tiny": {**PRIOR["tiny"], "dropout": 0.1}}, offline=str(small_batch), mc_dropout=2,
              batch_size=24, steps=4, checkpoint_every=2, eval={"exact": True, "every": 1})
    full = metrics(train(psi_config(work, "whole", **kw), log=quiet))
    train(psi_config(work, "parts", **{**kw, "steps": 2}), log=quiet)
    ckpt = work / "parts" / "checkpoints" / "step-00000002"
    assert (ckpt / "target" / "model.safetensors").exists() and (ckpt / "policy" / "model.safetensors").exists()
    resumed = metrics(train(psi_config(work, "parts", **kw), resume=True, log=quiet))
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_KEYS}  # noqa: E731
    assert [strip(r) for r in resumed] == [strip(r) for r in full]


# ---- bad input ---------------------------------------------------------------------------------------------------

GOOD = '{"tokens": [1, 2, 0], "logprob": -3.0, "reward": 1.0}'


@pytest.mark.parametrize("lines,line,what", [
    ([], None, "empty"),
    ([GOOD, '{"logprob": -1.0, "reward": 0.0}'], 2, "missing 'tokens'"),
    ([GOOD, GOOD, '{"tokens": [1, 0], "logprob": -1.0}'], 3, "'reward' missing"),
    ([GOOD, '{"tokens": [1, 7, 0], "logprob": -1.0, "reward": 0.0}'], 2, "outside the vocabulary"),
    ([GOOD, '{"tokens": [1, 0], "logprob": -1.0, "reward": NaN}'], 2, "'reward' must be a number"),
    ([GOOD, '{"tokens": [1, 1, 1, 1, 1], "logprob": -1.0, "reward": 0.0}'], 2, "longer than max_length"),
])
def test_bad_offline_file_stops_naming_file_and_line(work, lines, line, what):
    path = work / "bad.jsonl"
    path.write_text("".join(f"{x}\n" for x in lines))
    out = work / "bad_run"
    with pytest.raises(ConfigError) as e:
        QTrainer(from_dict(psi_config(work, "bad_run", offline=str(path))), log=quiet)
    msg = str(e.value)
    assert e.value.key == "offline" and str(path) in msg and what in msg, msg
    if line is not None:
        assert f"line {line}" in msg, msg
    assert not (out / "metrics.jsonl").exists()


def test_q_learning_without_any_reward_stops_before_training(work, capsys):
    path = work / "noreward.jsonl"
    path.write_text('{"tokens": [1, 2, 0], "logprob": -3.0}\n{"tokens": [3, 0], "logprob": -2.0}\n')
    cfg = psi_config(work, "noreward", algorithm="q_learning", offline=str(path), target={"beta": 1.0})
    with pytest.raises(ConfigError) as e:
        train(cfg, log=quiet)
    assert e.value.key == "target.reward" and f"{path}, line 1" in str(e.value)
    assert not (work / "noreward" / "metrics.jsonl").exists()
    p = work / "noreward.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(p)]) == 2
    assert capsys.readouterr().err.startswith("fdpg: error: target.reward:")


def test_rewards_come_from_the_file_or_the_config(work):
    path = work / "rw.jsonl"
    path.write_text('{"tokens": [2, 2, 0], "logprob": -3.0, "reward": 5.0}\n{"tokens": [3, 0], "logprob": -2.0, '
                    '"reward": -1.0}\n')
    msgs = []
    tr = QTrainer(from_dict(psi_config(work, "rw", offline=str(path))), log=msgs.append)
    assert tr.rewards.tolist() == [5.0, -1.0]                          # the file's rewards are the data
    assert any("differ from target.reward" in m for m in msgs)
    path.write_text('{"tokens": [2, 2, 0], "logprob": -3.0}\n{"tokens": [3, 0], "logprob": -2.0}\n')
    tr = QTrainer(from_dict(psi_config(work, "rw2", offline=str(path))), log=quiet)
    assert tr.rewards.tolist() == [2.0, 0.0]                           # else target.reward on the batch


@pytest.mark.parametrize("kw,key", [
    ({"target": {**REWARD, "beta": 0.0}}, "target.beta"),
    ({"target": {**REWARD, "beta": -1.0}}, "target.beta"),
    ({"offline": None}, "offline"),
    ({"kl_reward": {"kind": "sampled"}}, "kl_reward"),
    ({"algorithm": "q_learning", "kl_reward": {"kind": "maybe"}}, "kl_reward.kind"),
    ({"algorithm": "q_learning", "kl_reward": {"kind": "exact", "weight": -1}}, "kl_reward.weight"),
    ({"gamma": 0.0}, "gamma"),
    ({"gamma": 1.5}, "gamma"),
    ({"target_update": 0.0}, "target_update"),
    ({"mc_dropout": -1}, "mc_dropout"),
    ({"loss": "l1"}, "loss"),
    ({"target": {"constraints": [{"type": "contains_token", "token_id": 2}]}}, "target.constraints"),
    ({"algorithm": "fdpg", "gamma": 0.9}, "gamma"),
    ({"algorithm": "fdpg", "mc_dropout": 4}, "mc_dropout"),
    ({"prior": {"tiny": {**PRIOR["tiny"], "dropout": 1.0}}}, "prior.tiny.dropout"),
])
def test_bad_configuration_stops_before_training(work, kw, key):
    cfg = psi_config(work, "badcfg", **{"offline": str(work / "missing.jsonl"), **kw})
    if cfg["algorithm"] == "fdpg":
        del cfg["target_update"]
    with pytest.raises(ConfigError) as e:
        train(cfg, log=quiet)
    assert e.value.key == key, str(e.value)
    assert not (work / "badcfg" / "metrics.jsonl").exists()


def test_mc_dropout_without_dropout_in_the_model_stops(work, small_batch):
    with pytest.raises(ConfigError) as e:
        train(psi_config(work, "nodrop", offline=str(small_batch), mc_dropout=4), log=quiet)
    assert e.value.key == "mc_dropout" and "dropout" in str(e.value)
    assert not (work / "nodrop" / "metrics.jsonl").exists()


# ---- the command line ------------------------------------------------------------------------------------------

def test_cli_trains_q_learning_and_samples_from_a_model_and_prompts(work, small_batch, capsys):
    cfg = work / "q.yaml"
    cfg.write_text(yaml.safe_dump(psi_config(work, "cli_q", algorithm="q_learning", offline=str(small_batch),
                                             kl_reward={"kind": "exact", "weight": 0.5}, steps=2,
                                             batch_size=16, eval={"exact": True, "every": 2})))
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "td_loss" in out and "v0" in out and "kl_p_pi" in out
    m = metrics(work / "cli_q")
    assert [r["step"] for r in m] == [0, 2] and m[-1]["td_loss"] is not None and "v0_minus_log_z" not in m[-1]
    # sample from the trained model: log-probs under that model
    model_dir = work / "cli_q" / "policy"
    assert main(["sample", str(cfg), "--n", "5", "--out", str(work / "m.jsonl"), "--model", str(model_dir)]) == 0
    rows = [json.loads(line) for line in open(work / "m.jsonl")]
    from fdpg.models import load_model
    pol, _ = load_model(str(model_dir))
    space = exact.enumerate_space(5, 4, 0)
    lp = exact.space_logprobs(pol, space)
    index = {tuple(t[:int(mk.sum())]): i for i, (t, mk) in enumerate(zip(space.tokens.tolist(), space.mask))}
    for r in rows:
        assert r["logprob"] == pytest.approx(float(lp[index[tuple(r["tokens"])]]), abs=1e-4)
    # prompts: each row carries its context; an f-DPG config without a reward writes no reward
    p2 = work / "prompts.yaml"
    p2.write_text(yaml.safe_dump({"prior": PRIOR, "max_length": 3, "prompts": [[0, 1], [0, 3, 4]]}))
    assert main(["sample", str(p2), "--n", "6", "--out", str(work / "c.jsonl")]) == 0
    rows = [json.loads(line) for line in open(work / "c.jsonl")]
    assert len(rows) == 6 and all(r["context"] in ([0, 1], [0, 3, 4]) and "reward" not in r for r in rows)
    assert main(["sample", str(p2), "--n", "0", "--out", str(work / "c.jsonl")]) == 2


def test_conditional_batch_and_estimated_metrics(work):
    # contexts from the offline file (written by `fdpg sample` with prompts): rewards, V(s_0) and the exact
    # metrics are per context (averaged); without listing, the metrics are estimates and V(s_0) is still logged
    cfg = {"prior": PRIOR, "max_length": 4, "target": REWARD, "prompts": [[0, 1], [0, 3, 4]], "seed": 2}
    path = sample_batch(cfg, 400, work / "ctx.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert {tuple(r["context"]) for r in rows} == {(0, 1), (0, 3, 4)}
    run = train(psi_config(work, "ctx", offline=str(path), steps=30, eval={"exact": True, "every": 30}), log=quiet)
    m = metrics(run)
    assert m[-1]["kl_p_pi"] < 0.7 * m[0]["kl_p_pi"] and m[0]["kl_pi_a"] == pytest.approx(0.0, abs=1e-9)
    tr = QTrainer(from_dict(psi_config(work, "ctx2", offline=str(path))), log=quiet)
    assert tr.conditional and len(tr.contexts) == 2
    vals = []
    for c in tr.contexts:
        with torch.no_grad():
            vals.append(float(torch.logsumexp(tr.policy(input_ids=torch.tensor([c])).logits[0, -1], -1)))
    assert tr.initial_value() == pytest.approx(sum(vals) / 2, abs=1e-5)
    est = metrics(train(psi_config(work, "est", offline=str(path), steps=2, eval={"exact": False, "every": 2,
                                                                                  "n_samples": 64}), log=quiet))
    assert est[-1]["exact"] is False and est[-1]["v0"] is not None and "v0_minus_log_z" not in est[-1]
    assert est[-1]["td_loss"] is not None and est[-1]["kl_pi_a"] is not None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter evaluates masked lanes too
@pytest.mark.parametrize("kw", [
    {"algorithm": "psi_learning", "mc_dropout": 2},
    {"algorithm": "q_learning", "kl_reward": {"kind": "exact"}},
    {"algorithm": "psi_learning", "output_layer": "fused"},
], ids=["psi-logits", "q-exact-logits", "psi-fused"])
def test_td_terms_through_the_triton_kernels(work, small_batch, monkeypatch, kw):
    """The GPU path (Triton kernels; the interpreter on CPU) gives the torch path's TD terms and gradients."""
    import fdpg

    tr = q_trainer(work, small_batch, "triton", batch_size=6, **kw)
    s, reward = tr.next_batch()
    params = [p for p in tr.policy.parameters() if p.requires_grad]

    def run():
        torch.manual_seed(5)
        t = tr.td_terms(s, reward)
        return t, torch.autograd.grad(t.loss, params)

    ref, g_ref = run()
    for name in ("paired_token_stats", "linear_token_logprobs", "paired_linear_token_logprobs"):
        fn = getattr(fdpg, name)
        monkeypatch.setattr(fdpg, name, lambda *a, _fn=fn, **k: _fn(*a, **{**k, "backend": "triton"}))
    got, g = run()
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.targets[s.mask], ref.targets[s.mask], rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_offline_file_without_logprob_serves_q_learning_not_fdpg(work, batch):
    """Q-learning reads no log q: its offline files may leave ``logprob`` out (JSONL and tensor files); f-DPG's
    importance weights need it, and its trainer says which line lacks it."""
    rows = [json.loads(line) for line in open(batch)][:256]
    path = work / "no_logprob.jsonl"
    path.write_text("".join(json.dumps({"tokens": r["tokens"], "reward": r["reward"]}) + "\n" for r in rows))
    pt = work / "no_logprob.pt"
    toks = torch.zeros(len(rows), 4, dtype=torch.long)
    for i, r in enumerate(rows):
        toks[i, :len(r["tokens"])] = torch.tensor(r["tokens"])
    torch.save({"tokens": toks, "reward": torch.tensor([float(r["reward"]) for r in rows])}, pt)
    for f in (path, pt):
        run = train(psi_config(work, f"nolp-{f.suffix[1:]}", offline=str(f), steps=3, eval={"exact": False}),
                    log=quiet)
        m = metrics(run)
        assert m[-1]["step"] == 3 and math.isfinite(m[-1]["td_loss"])
    fdpg_cfg = {"prior": PRIOR, "max_length": 4, "target": REWARD, "divergence": "reverse_kl", "steps": 2,
                "batch_size": 16, "offline": str(path), "progress": False, "output_dir": str(work / "nolp-fdpg")}
    with pytest.raises(ConfigError, match="line 1: missing 'logprob'"):
        train(fdpg_cfg, log=quiet)
