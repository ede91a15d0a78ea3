"""Targets P(x) = a(x) b(x): constraints, features and lambda fitting, reward tilts, products, floors."""
import math

import pytest
import torch

from fdpg.config import ConfigError, FeatureSpec, TargetConfig
from fdpg.targets import (SeqBatch, Target, build_target, contains_token, fit_lambdas, from_callable, length,
                          regex, resolve_callable, token_count)

torch.set_num_threads(1)


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>")


def batch(rows, tokenizer=None, eos=0):
    """Token lists padded with EOS; the mask covers each list (EOS, where a list has one, ends it)."""
    T = max(len(r) for r in rows)
    tokens = torch.tensor([r + [eos] * (T - len(r)) for r in rows])
    mask = torch.tensor([[j < len(r) for j in range(T)] for r in rows])
    return SeqBatch(tokens, mask, tokenizer=tokenizer)


def test_contains_and_count_respect_the_mask():
    b = batch([[1, 3, 0], [3, 3, 2], [0], [2, 2, 2]])
    assert contains_token(3)(b).tolist() == [True, True, False, False]
    assert contains_token(3, negate=True)(b).tolist() == [False, False, True, True]
    assert token_count(3, weight=0.5)(b).tolist() == [0.5, 1.0, 0.0, 0.0]
    assert length()(b).tolist() == [3.0, 3.0, 1.0, 3.0]
    # padding after the end is never counted, whatever its token
    after = SeqBatch(torch.tensor([[1, 0, 3, 3]]), torch.tensor([[True, True, False, False]]))
    assert contains_token(3)(after).tolist() == [False] and token_count(3)(after).tolist() == [0.0]


def test_regex_on_decoded_text():
    b = batch([[1, 2, 0], [2, 1, 0], [3]], tokenizer=word_tokenizer())
    assert b.texts == ["a b", "b a", "c"]
    assert regex(r"^a b$")(b).tolist() == [True, False, False]
    assert regex(r"a", negate=True)(b).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="tokenizer"):
        regex("a")(batch([[1]]))


def test_callable_gets_sequences_texts_and_contexts():
    seen = {}

    def fn(sequences, texts, contexts):
        seen.update(sequences=sequences, texts=texts, contexts=contexts)
        return [len(s) == 2 for s in sequences]

    import fdpg

    tokens = torch.tensor([[1, 0, 0], [2, 3, 4]])
    b = SeqBatch(tokens, fdpg.completion_mask(tokens, 0), context_ids=torch.tensor([[0, 5], [0, 4]]),
                 tokenizer=word_tokenizer())
    out = from_callable(fn, "f", "bool")(b)
    assert out.tolist() == [True, False]
    assert seen["sequences"] == [[1, 0], [2, 3, 4]]          # EOS included, padding dropped
    assert seen["texts"] == ["a", "b c d"]
    assert seen["contexts"] == [[0, 5], [0, 4]]
    # a function taking only the sequences gets only them
    assert from_callable(lambda sequences: [1.5, -2.0], "g", "float", weight=2.0)(b).tolist() == [3.0, -4.0]


def test_callable_bad_outputs():
    b = batch([[1], [2]])
    with pytest.raises(ValueError, match="2 values"):
        from_callable(lambda s: [True], "f", "bool")(b)
    with pytest.raises(ValueError, match="booleans"):
        from_callable(lambda s: [0.5, 1.0], "f", "bool")(b)
    with pytest.raises(ValueError, match=r"r: returned inf \(not finite\) for sequence 1 of the batch \(\[2\]\)"):
        from_callable(lambda s: [1.0, float("inf")], "r", "float")(b)


def test_resolve_callable(tmp_path):
    (tmp_path / "user_mod_t.py").write_text("def f(seqs):\n    return [True] * len(seqs)\nX = 3\n")
    fn = resolve_callable("user_mod_t:f", "k", search=[tmp_path])
    assert fn([[1], [2]]) == [True, True]
    with pytest.raises(ConfigError) as e:
        resolve_callable("user_mod_t:g", "target.reward.function", search=[tmp_path])
    assert e.value.key == "target.reward.function"
    with pytest.raises(ConfigError, match="not callable"):
        resolve_callable("user_mod_t:X", "k", search=[tmp_path])
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_callable("no_such_module_zz:f", "k")


def test_score_product_and_floor():
    b = batch([[3, 2, 0], [1, 1, 0], [3, 3, 3]])
    t = Target(constraints=[contains_token(3)], features=[contains_token(2)], mu_bar=[0.5],
               reward=token_count(3, weight=1.0), beta=2.0)
    t.set_lambdas([0.7])
    s = t.score(b)
    assert s.satisfied.tolist() == [True, False, True]
    # log b = log 1[c] + lambda phi + r / beta
    assert s.log_b[0].item() == pytest.approx(0.7 + 1 / 2)
    assert s.log_b[1].item() == -math.inf
    assert s.log_b[2].item() == pytest.approx(3 / 2)
    assert s.reward.tolist() == [1.0, 0.0, 3.0] and s.features[:, 0].tolist() == [1.0, 0.0, 0.0]
    t.log_b_floor = math.log(1e-3)
    s2 = t.score(b)
    assert s2.log_b[1].item() == pytest.approx(math.log(1e-3)) and s2.log_b_raw[1].item() == -math.inf
    assert torch.equal(s2.log_b[[0, 2]], s.log_b[[0, 2]])
    with pytest.raises(RuntimeError, match="lambdas"):
        Target(features=[contains_token(2)], mu_bar=[0.5]).score(b)


def test_fit_lambdas_single_feature_closed_form(gen):
    # prior samples with a binary feature of empirical mean m: lambda = logit(mu) - logit(m)
    phi = (torch.rand(5000, 1, generator=gen) < 0.3).double()
    m = phi.mean().item()
    lam, mom, ok = fit_lambdas(phi, torch.zeros(5000, dtype=torch.float64), [0.6], lr=2.0, tol=1e-9, steps=5000)
    assert ok
    logit = lambda x: math.log(x / (1 - x))  # noqa: E731
    assert lam.item() == pytest.approx(logit(0.6) - logit(m), abs=1e-6)
    assert mom.item() == pytest.approx(0.6, abs=1e-8)


def test_fit_lambdas_and_target_bad_inputs():
    phi, lw = torch.tensor([[0.0], [1.0], [2.0]]), torch.zeros(3)
    with pytest.raises(ValueError, match="log_w: contains NaN or \\+inf"):
        fit_lambdas(phi, torch.tensor([0.0, math.nan, 0.0]), [1.0])
    with pytest.raises(ValueError, match="mu_bar: contains NaN"):
        fit_lambdas(phi, lw, [math.inf])
    with pytest.raises(ValueError, match=r"mu_bar: expected shape \(1,\)"):
        fit_lambdas(phi, lw, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"log_w: expected shape \(3,\)"):
        fit_lambdas(phi, torch.zeros(2), [1.0])
    with pytest.raises(ValueError, match=r"init: expected shape \(1,\)"):
        fit_lambdas(phi, lw, [1.0], init=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"phi: expected a tensor \[N, K\]"):
        fit_lambdas(phi[:, 0], lw, [1.0])
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="beta: expected a finite number > 0"):
            Target(reward=length(), beta=bad)
    with pytest.raises(ValueError, match="log_b_floor: expected None or a finite number <= 0"):
        Target(log_b_floor=1.0)
    with pytest.raises(ValueError, match="mu_bar: expected one target moment per feature"):
        Target(features=[contains_token(2)])


def test_fit_lambdas_exact_on_a_listed_space(gen):
    # the whole space as the "sample", weighted by a(x) and a pointwise constraint: E_p[phi] = mu_bar exactly
    N, K = 60, 2
    log_a = torch.log_softmax(torch.randn(N, generator=gen, dtype=torch.float64), 0)
    phi = torch.randn(N, K, generator=gen, dtype=torch.float64)
    ok_mask = torch.rand(N, generator=gen) < 0.7
    log_w = torch.where(ok_mask, log_a, torch.full_like(log_a, -math.inf))
    p0 = torch.softmax(log_w, 0)
    mu = (p0 @ phi + torch.tensor([0.3, -0.2], dtype=torch.float64)).tolist()
    lam, mom, ok = fit_lambdas(phi, log_w, mu, lr=0.5, steps=20000, tol=1e-10)
    assert ok
    p = torch.softmax(log_w + phi @ lam, 0)
    torch.testing.assert_close(p @ phi, torch.tensor(mu, dtype=torch.float64), atol=1e-9, rtol=0)
    assert p[~ok_mask].sum().item() == 0.0
    with pytest.raises(ValueError, match="zero weight"):
        fit_lambdas(phi, torch.full((N,), -math.inf, dtype=torch.float64), mu)


def test_fit_lambdas_unreachable_moment_reports_not_converged():
    phi = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    lam, mom, ok = fit_lambdas(phi, torch.zeros(2, dtype=torch.float64), [1.5], steps=50)
    assert not ok and mom.item() < 1.0


def test_build_target_from_config(tmp_path):
    (tmp_path / "rew_mod_t.py").write_text("def r(sequences):\n    return [float(len(s)) for s in sequences]\n")
    cfg = TargetConfig(constraints=[FeatureSpec("contains_token", token_id=3)],
                       features=[FeatureSpec("token_count", token_id=2, mu_bar=0.4)],
                       reward=FeatureSpec("callable", function="rew_mod_t:r", weight=0.5), beta=0.5, lambdas=[0.1])
    t = build_target(cfg, log_b_floor=-5.0, vocab_size=6, search=[tmp_path])
    s = t.score(batch([[3, 2, 0], [1, 1]]))
    assert s.reward.tolist() == [1.5, 1.0]
    assert s.log_b[0].item() == pytest.approx(0.1 + 1.5 / 0.5)
    assert s.log_b[1].item() == -5.0
    with pytest.raises(ConfigError) as e:
        build_target(TargetConfig(constraints=[FeatureSpec("contains_token", token_id=6)]), vocab_size=6)
    assert e.value.key == "target.constraints[0].token_id"
    with pytest.raises(ConfigError) as e:
        build_target(TargetConfig(reward=FeatureSpec("regex", pattern="a")))
    assert e.value.key == "target.reward.pattern"
    t = build_target(TargetConfig(constraints=[FeatureSpec("regex", pattern="^a")]), tokenizer=word_tokenizer())
    assert t.score(batch([[1, 2, 0], [2, 1]], tokenizer=word_tokenizer())).satisfied.tolist() == [True, False]
