"""The YAML schema: defaults, types, overrides, and bad configurations stopped before training, naming the key."""
import math

import pytest
import torch
import yaml

from fdpg.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict

torch.set_num_threads(1)

TINY = {"tiny": {"vocab_size": 6, "n_layer": 1, "n_embd": 16, "seed": 0}}


def base(**kw):
    d = {"prior": TINY, "max_length": 3, "steps": 2, "batch_size": 8, "eval": {"every": 1}, "progress": False}
    d.update(kw)
    return d


def error_key(data) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert str(e.value).startswith(e.value.key)
    return e.value.key


def test_defaults_and_round_trip():
    cfg = from_dict(base())
    assert isinstance(cfg, Config)
    assert cfg.algorithm == "fdpg" and cfg.divergence == "forward_kl" and cfg.baseline == "batch"
    assert cfg.prior.tiny.vocab_size == 6 and cfg.prior.path is None
    assert cfg.eval.exact == "auto" and cfg.proposal.update == "on_policy"
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert from_dict(base(prior="some/dir")).prior.path == "some/dir"


def test_issue_example_parses(tmp_path):
    text = """
prior: {tiny: {vocab_size: 6, n_layer: 2, n_embd: 32, seed: 0}}
max_length: 6
target:
  constraints:
    - {type: contains_token, token_id: 3}
divergence: js
baseline: batch
proposal: {update: kl_adaptive, every: 10}
steps: 300
batch_size: 64
lr: 1.0e-3
seed: 0
eval: {exact: true, every: 50}
output_dir: runs/example
"""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    cfg = load_config(p)
    assert cfg.divergence == "js" and cfg.proposal.every == 10 and cfg.eval.exact is True and cfg.lr == 1e-3


def test_numbers_as_strings_and_baseline_number():
    cfg = from_dict(base(lr="1e-3", baseline=-1, log_b_floor="-6.9"))
    assert cfg.lr == 1e-3 and cfg.baseline == -1.0 and cfg.log_b_floor == -6.9


@pytest.mark.parametrize("data,key", [
    (base(stepz=3), "stepz"),
    (base(eval={"evry": 3}), "eval.evry"),
    (base(target={"constraints": [{"type": "contains_token", "tokn_id": 3}]}), "target.constraints[0].tokn_id"),
    (base(prior={"tiny": {"vocab_size": 6, "layers": 2}}), "prior.tiny.layers"),
    (base(prior={"tiny": TINY["tiny"], "path": "x"}), "prior.path"),
])
def test_unknown_key(data, key):
    assert error_key(data) == key


@pytest.mark.parametrize("data,key", [
    (base(steps="ten"), "steps"),
    (base(batch_size=1.5), "batch_size"),
    (base(eval={"exact": "yes"}), "eval.exact"),
    (base(baseline="mean"), "baseline"),
    (base(target={"constraints": {"type": "contains_token"}}), "target.constraints"),
    (base(target={"constraints": [{"type": "contains_token", "token_id": "three"}]}),
     "target.constraints[0].token_id"),
    (base(prior=3), "prior"),
    (base(grad_clip=True), "grad_clip"),
    (base(dtype="float16"), "dtype"),
])
def test_wrong_type(data, key):
    assert error_key(data) == key


@pytest.mark.parametrize("data,key", [
    ({"max_length": 3}, "prior"),
    (base(steps=0), "steps"),
    (base(lr=-1.0), "lr"),
    (base(divergence="kl_div"), "divergence"),
    (base(algorithm="psi_learning"), "offline"),
    (base(algorithm="ppo"), "algorithm"),
    (base(proposal={"update": "sometimes"}), "proposal.update"),
    (base(target={"constraints": [{"type": "contains_token"}]}), "target.constraints[0].token_id"),
    (base(target={"constraints": [{"type": "token_count", "token_id": 1}]}), "target.constraints[0].type"),
    (base(target={"constraints": [{"type": "contains", "token_id": 1}]}), "target.constraints[0].type"),
    (base(target={"constraints": [{"type": "regex", "pattern": "("}]}), "target.constraints[0].pattern"),
    (base(target={"constraints": [{"type": "callable", "function": "nocolon"}]}),
     "target.constraints[0].function"),
    (base(target={"constraints": [{"type": "contains_token", "token_id": 1, "pattern": "a"}]}),
     "target.constraints[0].pattern"),
    (base(target={"features": [{"type": "contains_token", "token_id": 1}]}), "target.features[0].mu_bar"),
    (base(target={"beta": 0}), "target.beta"),
    (base(target={"features": [{"type": "token_count", "token_id": 1, "mu_bar": 0.5}], "lambdas": [1, 2]}),
     "target.lambdas"),
    (base(divergence="reverse_kl", target={"constraints": [{"type": "contains_token", "token_id": 1}]}),
     "log_b_floor"),
    (base(log_b_floor=1.0), "log_b_floor"),
    (base(eos_token_id=-1), "eos_token_id"),
    (base(target={"reward": {"type": "length", "weight": math.nan}}), "target.reward.weight"),
    (base(target={"reward": {"type": "length", "weight": math.inf}}), "target.reward.weight"),
    (base(target={"features": [{"type": "token_count", "token_id": 1, "mu_bar": math.nan}]}),
     "target.features[0].mu_bar"),
    (base(target={"features": [{"type": "token_count", "token_id": 1, "mu_bar": 0.5}], "lambdas": [math.nan]}),
     "target.lambdas"),
    (base(prompts=[[1, 2]], samples_per_context=3), "samples_per_context"),
    (base(samples_per_context=2), "samples_per_context"),
    (base(device="tpu"), "device"),
])
def test_bad_values(data, key):
    assert error_key(data) == key


def test_unbounded_divergence_with_floor_is_fine():
    cfg = from_dict(base(divergence="reverse_kl", log_b_floor=math.log(1e-3),
                         target={"constraints": [{"type": "contains_token", "token_id": 1}]}))
    assert cfg.log_b_floor == pytest.approx(math.log(1e-3))
    # bounded divergences need no floor
    from_dict(base(divergence="js", target={"constraints": [{"type": "contains_token", "token_id": 1}]}))


def test_overrides(tmp_path):
    d = apply_overrides(base(), ["eval.every=7", "lr=1e-3", "target.beta=2", "proposal={update: kl_adaptive}",
                                 "log_b_floor=-5", "divergence=alpha:0.5", "eval.exact=false"])
    cfg = from_dict(d)
    assert cfg.eval.every == 7 and cfg.lr == 1e-3 and cfg.target.beta == 2.0 and cfg.eval.exact is False
    assert cfg.proposal.update == "kl_adaptive" and cfg.log_b_floor == -5.0 and cfg.divergence == "alpha:0.5"
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base()))
    assert load_config(p, ["steps=5"]).steps == 5
    with pytest.raises(ConfigError) as e:
        apply_overrides(base(), ["steps.x=3"])
    assert e.value.key == "steps"
    with pytest.raises(ConfigError):
        apply_overrides(base(), ["steps"])
    with pytest.raises(ConfigError) as e:
        load_config(p, ["eval.evry=3"])
    assert e.value.key == "eval.evry"


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("prior: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


# ---- checks that need the models: they stop before training (no metrics written) -------------------------------

def trainer_error(tmp_path, **kw) -> ConfigError:
    from fdpg.trainer import Trainer

    cfg = from_dict(base(output_dir=str(tmp_path / "run"), **kw))
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, log=lambda m: None).train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    return e.value


def test_missing_model_path(tmp_path):
    e = trainer_error(tmp_path, prior=str(tmp_path / "nowhere"))
    assert e.key == "prior" and "nowhere" in str(e)
    e = trainer_error(tmp_path, policy=str(tmp_path / "nowhere"))
    assert e.key == "policy"


def test_vocabulary_mismatch(tmp_path):
    from fdpg.models import build_tiny

    build_tiny(7, 1, 16, seed=0).save_pretrained(tmp_path / "other")
    e = trainer_error(tmp_path, policy=str(tmp_path / "other"))
    assert e.key == "policy" and "vocabulary" in str(e)


def test_unsatisfiable_constraint(tmp_path):
    # a token the vocabulary lacks
    e = trainer_error(tmp_path, target={"constraints": [{"type": "contains_token", "token_id": 9}]})
    assert e.key == "target.constraints[0].token_id"
    # a user constraint that no sample of the prior meets: every sample has P = 0
    mod = tmp_path / "never_mod.py"
    mod.write_text("def never(seqs):\n    return [False] * len(seqs)\n\n"
                   "def half(seqs):\n    return [0.5] * len(seqs)\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        e = trainer_error(tmp_path, target={"constraints": [
            {"type": "contains_token", "token_id": 2}, {"type": "callable", "function": "never_mod:never"}]})
        bad = trainer_error(tmp_path, target={"constraints": [{"type": "callable", "function": "never_mod:half"}]})
    finally:
        sys.path.remove(str(tmp_path))
    assert e.key == "target.constraints[1]" and "P(x) = 0" in str(e)
    assert bad.key == "target.constraints[0].function" and "must return booleans" in str(bad)


def test_incompatible_constraints(tmp_path):
    e = trainer_error(tmp_path, target={"constraints": [
        {"type": "contains_token", "token_id": 2}, {"type": "contains_token", "token_id": 2, "negate": True}]})
    assert e.key == "target.constraints"


def test_other_model_checks(tmp_path):
    e = trainer_error(tmp_path, target={"constraints": [{"type": "regex", "pattern": "a"}]})
    assert e.key == "target.constraints[0].pattern" and "tokenizer" in str(e)
    e = trainer_error(tmp_path, target={"constraints": [{"type": "callable", "function": "no_such_mod_x:f"}]})
    assert e.key == "target.constraints[0].function"
    e = trainer_error(tmp_path, max_length=10, eval={"exact": True, "max_space": 100})
    assert e.key == "eval.exact"
    e = trainer_error(tmp_path, max_length=200)
    assert e.key == "max_length"
    e = trainer_error(tmp_path, policy={"tiny": {"vocab_size": 6, "n_positions": 2}})
    assert e.key == "max_length" and "the policy's 2 positions" in str(e)
    e = trainer_error(tmp_path, prior={"tiny": {"vocab_size": 6, "n_embd": 16, "n_head": 3}})
    assert e.key == "prior.tiny.n_head"
    for key, value in (("n_layer", 0), ("n_embd", 0), ("initializer_range", -1.0), ("initializer_range", math.nan)):
        e = trainer_error(tmp_path, prior={"tiny": {"vocab_size": 6, key: value}})
        assert e.key == f"prior.tiny.{key}", (key, value)
    # a local model whose EOS / BOS lies outside its vocabulary (GPT2Config's default 50256 with a small vocabulary)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=7, n_layer=1, n_embd=16, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "m")
    e = trainer_error(tmp_path, prior=str(tmp_path / "m"))
    assert e.key == "prior" and "eos_token_id 50256 is outside its vocabulary [0, 7)" in str(e)


def test_integers_written_in_scientific_notation():
    import yaml

    from fdpg.config import from_dict

    cfg = from_dict(yaml.safe_load("prior: {tiny: {vocab_size: 6}}\neval: {max_space: 1e6, n_samples: 1e3}"))
    assert cfg.eval.max_space == 1_000_000 and cfg.eval.n_samples == 1000
    with pytest.raises(ConfigError, match="eval.n_samples"):
        from_dict(yaml.safe_load("prior: {tiny: {vocab_size: 6}}\neval: {n_samples: 2.5e0}"))
