"""The trainers on a GPU (skipped without one): bf16 autocast over float32 master weights, the static decoder with
its CUDA graph, the fused output layer against the logits path, the CUDA/Triton kernels picked by "auto", a Llama
loaded from a local path, and the Q-learning trainer. Small models; what the CPU tests cannot reach."""
import math

import pytest
import torch

from fdpg.config import from_dict
from fdpg.trainer import Trainer

pytestmark = pytest.mark.gpu

PRIOR = {"tiny": {"vocab_size": 300, "n_layer": 2, "n_embd": 64, "seed": 0, "eos_token_id": 0,
                  "initializer_range": 0.1}}


def quiet(msg):
    pass


def config(tmp_path, name, **kw):
    d = {"prior": PRIOR, "max_length": 12, "batch_size": 16, "lr": 1e-3, "seed": 0, "steps": 3, "device": "cuda",
         "target": {"constraints": [{"type": "contains_token", "token_id": 3, "negate": True}]},
         "eval": {"exact": False}, "progress": False, "output_dir": str(tmp_path / name)}
    d.update(kw)
    return from_dict(d)


@pytest.mark.parametrize("output_layer", ["auto", "fused", "logits"])
def test_steps_on_gpu(tmp_path, output_layer):
    tr = Trainer(config(tmp_path, output_layer, output_layer=output_layer), log=quiet)
    assert tr.amp_dtype == torch.bfloat16 and next(tr.policy.parameters()).dtype == torch.float32
    assert tr.fused == (output_layer == "fused")     # auto: these logits fit, so the logits path
    w0 = [p.detach().clone() for p in tr.policy.parameters()]
    for _ in range(3):
        tr.train_step()
    assert all(torch.isfinite(p).all() for p in tr.policy.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(tr.policy.parameters(), w0))
    assert math.isfinite(float(tr.log_z().max()))


def test_fused_and_logits_scoring_agree(tmp_path):
    """One batch scored through the fused output layer and through the logits: the same log-probs to bf16
    rounding, the fused op's operands in bf16 (not the float32 master weights)."""
    tr = Trainer(config(tmp_path, "agree", output_layer="fused"), log=quiet)
    s = tr.next_batch()
    a = tr.score(s, grad=False)
    tr.fused = False
    b = tr.score(s, grad=False)
    torch.testing.assert_close(a.policy_lp, b.policy_lp, rtol=2e-2, atol=0.2)
    torch.testing.assert_close(a.prior_lp, b.prior_lp, rtol=2e-2, atol=0.2)


def test_sampling_casts_the_master_weights_once_per_pass(tmp_path):
    """Under bf16 autocast a decoding step launches no weight cast: the pass cast them once."""
    from fdpg.decode import _FastDecoder

    tr = Trainer(config(tmp_path, "cast"), log=quiet)
    seen = []
    real = _FastDecoder.cast_gemm_weights
    _FastDecoder.cast_gemm_weights = lambda self, dt: (seen.append(dt), real(self, dt))[1]
    try:
        s = tr.next_batch()
    finally:
        _FastDecoder.cast_gemm_weights = real
    assert seen == [torch.bfloat16] and s.tokens.is_cuda and bool((s.tokens >= 0).all())


def test_llama_from_a_local_path(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, bos_token_id=0))
    m.save_pretrained(tmp_path / "llama")
    tr = Trainer(config(tmp_path, "llama", prior=str(tmp_path / "llama")), log=quiet)
    for _ in range(2):
        tr.train_step()
    assert all(torch.isfinite(p).all() for p in tr.policy.parameters())


def test_psi_learning_on_gpu(tmp_path):
    import json

    from fdpg.qtrainer import QTrainer

    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(64):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        toks = torch.randint(1, 300, (n,), generator=gen).tolist()
        rows.append({"tokens": toks, "reward": float(toks.count(2))})
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, "psi", algorithm="psi_learning", offline=str(path), mc_dropout=2,
                 prior={"tiny": dict(PRIOR["tiny"], dropout=0.1)},
                 target={"reward": {"type": "token_count", "token_id": 2, "weight": 1.0}, "beta": 1.0})
    tr = QTrainer(cfg, log=quiet)
    for _ in range(3):
        tr.train_step()
    assert all(torch.isfinite(p).all() for p in tr.policy.parameters())
