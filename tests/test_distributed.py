"""Data-parallel training under torchrun (fdpg.distributed): 2 ranks with gloo on the CPU, tiny GPT-2.

One ``torchrun --standalone --nproc_per_node 2`` launch runs every scenario of tests/dist_worker.py (DDP and FSDP2);
each is run again here in one process with the global batch on the same samples (offline data, or a fixed pool of
sequences standing in for sampling), and the two are compared: every global statistic of every batch, every
logged metric, the first step's gradients and the parameters after the run. Checkpoints are resumed by new
trainers on every rank. A second launch runs the CLI as the README shows it.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dist_worker as W
from fdpg import distributed
from fdpg.config import ConfigError, from_dict
from fdpg.models import build_tiny
from fdpg.trainer import TIMING_KEYS

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

ROOT = Path(__file__).resolve().parent.parent
EQUAL_NAMES = ["ddp_offline", "ddp_kl_adaptive", "fsdp_kl_adaptive", "fsdp_offline"]
RESUME_NAMES = ["ddp_resume", "fsdp_resume"]


def torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"torchrun failed ({p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(out, data, {scenario: [rank 0 results, rank 1 results]})`` of one 2-rank launch."""
    out = tmp_path_factory.mktemp("dist")
    data = W.write_offline(out / "offline.jsonl")
    names = EQUAL_NAMES + RESUME_NAMES
    torchrun(ROOT / "tests" / "dist_worker.py", out, data, *names)
    return out, data, {n: [torch.load(out / f"{n}-rank{r}.pt", weights_only=False) for r in (0, 1)] for n in names}


def close(a, b, rtol=1e-4, atol=1e-5) -> bool:
    """Equal to float32 rounding (the batch of b and the batch of 2b round their matmuls differently)."""
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)


def same_record(a: dict, b: dict, rel=1e-4, abs_=1e-5) -> list:
    """Keys whose values differ (timing excluded)."""
    bad = []
    for k in a:
        if k in TIMING_KEYS:
            continue
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=rel, abs_tol=abs_):
                bad.append((k, x, y))
        elif x != y:
            bad.append((k, x, y))
    return bad


@pytest.mark.parametrize("name", EQUAL_NAMES)
def test_two_ranks_equal_one_process_with_the_global_batch(runs, name, tmp_path):
    _, data, res = runs
    two, _ = res[name]
    one = W.SCENARIOS[name](tmp_path / name, data, 1)            # one process, batch 2b, the same samples
    assert two["strategy"] == name.split("_")[0] and one["strategy"] == "none"
    if two["strategy"] == "fsdp":      # the output layer's weight really is sharded between forwards
        assert two["head_sharded"]
    # every batch: log Z (running or batch, per context), baseline, normalised weights, ESS, coefficients, loss
    assert len(two["batches"]) == len(one["batches"]) > 0
    for i, (b2, b1) in enumerate(zip(two["batches"], one["batches"])):
        assert b2["coef"].shape == b1["coef"].shape == (W.GLOBAL_BATCH,)
        for k in b1:
            assert close(b2[k], b1[k]), (name, i, k, b2[k], b1[k])
    # every logged metric (exact KLs, ESS, loss, log Z, samples, lr, the KL-adaptive decisions, ...)
    assert [r["step"] for r in two["records"]] == [r["step"] for r in one["records"]]
    for r2, r1 in zip(two["records"], one["records"]):
        assert not same_record(r2, r1), same_record(r2, r1)
    assert two["proposal_updates"] == one["proposal_updates"]
    if "kl_adaptive" in name:
        assert one["proposal_updates"] >= 1 and two["records"][-1]["kl_p_q"] is not None
    assert two["records"][-1]["exact"] is (name != "ddp_kl_adaptive")   # that one: IS estimates from samples
    assert two["samples"] == one["samples"] == 3 * W.GLOBAL_BATCH * (2 if "offline" in name else 1)
    # the gradient of the first step (DDP/FSDP average over ranks = the one-process mean) and the final parameters
    assert one["grads"]["transformer.wte.weight"].abs().max() > 1e-3   # the output layer (tied to wte) learns
    for n, g in one["grads"].items():
        assert close(two["grads"][n], g, rtol=1e-4, atol=1e-6), (name, n, (two["grads"][n] - g).abs().max())
    for n, p in one["params"].items():
        assert close(two["params"][n], p, rtol=0, atol=5e-6), (name, n, (two["params"][n] - p).abs().max())
    start = W.full_params(build_tiny(**W.PRIOR["tiny"]))           # the policy starts as a copy of the prior
    assert max((one["params"][n] - p0).abs().max() for n, p0 in start.items()) > 1e-3   # far beyond the tolerance


@pytest.mark.parametrize("name", EQUAL_NAMES)
def test_ranks_hold_identical_statistics_metrics_and_parameters(runs, name):
    _, _, res = runs
    r0, r1 = res[name]
    for b0, b1 in zip(r0["batches"], r1["batches"]):
        for k in b0:
            assert torch.equal(b0[k], b1[k]), (name, k)
    for m0, m1 in zip(r0["records"], r1["records"]):
        assert {k: v for k, v in m0.items() if k not in TIMING_KEYS} == {k: v for k, v in m1.items()
                                                                          if k not in TIMING_KEYS}
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), (name, n)
        if r0["strategy"] == "ddp":          # each rank's own copy, bit for bit
            assert torch.equal(r0["local_params"][n], r1["local_params"][n]), (name, n)
        else:                                # each rank holds its own dim-0 shard of the one model
            assert torch.equal(torch.cat([r0["local_params"][n], r1["local_params"][n]]), r0["params"][n]), n


@pytest.mark.parametrize("name", RESUME_NAMES)
def test_checkpoints_resume_on_every_rank(runs, name):
    from transformers import AutoModelForCausalLM

    out, _, res = runs
    (r0, r1), run = res[name], out / name
    full, resumed = r0["full"], r0["resumed"]
    # sampling seeds: distinct per rank (rank 0 keeps the configured seed), so the ranks draw different batches
    assert r0["full"]["sample_seed"] == 0 != r1["full"]["sample_seed"]
    assert not torch.equal(r0["full"]["first_tokens"], r1["full"]["first_tokens"])
    # contexts: the global batch's, drawn from the stream every rank shares (data_gen, seed + 1), rank r's slice
    spc = 2
    ctx = torch.randint(len(W.PROMPTS), (W.GLOBAL_BATCH // spc,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat([r0["full"]["first_contexts"], r1["full"]["first_contexts"]]),
                       ctx.repeat_interleave(spc))
    # stopped at step 2, resumed by a new trainer on each rank: the same run, bit for bit, on both ranks
    for r in (r0, r1):
        for n, p in r["full"]["params"].items():
            assert torch.equal(r["resumed"]["params"][n], p), (name, n)
    assert resumed["samples"] == full["samples"] == 4 * W.GLOBAL_BATCH
    m_full = [json.loads(line) for line in open(run / "full" / "metrics.jsonl")]
    m_part = [json.loads(line) for line in open(run / "part" / "metrics.jsonl")]
    assert [m["step"] for m in m_full] == [m["step"] for m in m_part] == [0, 2, 4]    # one writer: rank 0
    for a, b in zip(m_full, m_part):
        assert not same_record(a, b, rel=0, abs_=0), same_record(a, b, rel=0, abs_=0)
    # rank 0 wrote complete checkpoints atomically (nothing temporary left), with every rank's random streams
    ckpts = run / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    st = torch.load(ckpts / "step-00000004" / "trainer.pt", weights_only=False)
    assert len(st["rng_ranks"]) == 2 and st["step"] == 4
    assert not torch.equal(st["rng_ranks"][0]["sample_gen"], st["rng_ranks"][1]["sample_gen"])
    # the final policy: a plain Hugging Face model (FSDP's shards gathered), equal to the trained parameters
    saved = json.loads((run / "full" / "policy" / "config.json").read_text())
    assert saved["architectures"] == ["GPT2LMHeadModel"]
    model = AutoModelForCausalLM.from_pretrained(run / "full" / "policy", local_files_only=True)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), full["params"][n]), n


def test_cli_under_torchrun(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"prior": {"tiny": {"vocab_size": 6, "n_layer": 1, "n_embd": 16}}, "max_length": 3,
                               "target": {"constraints": [{"type": "contains_token", "token_id": 3}]}, "steps": 2,
                               "batch_size": 4, "threads": 1, "eval": {"exact": True, "every": 2},
                               "progress": False}))
    p = torchrun("-m", "fdpg.cli", "train", cfg, f"output_dir={tmp_path / 'run'}", "distributed.strategy=fsdp")
    assert p.stdout.count("run directory:") == 1                   # rank 0 reports
    assert "x 2 ranks (fsdp)" in p.stderr
    m = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in m] == [0, 2] and m[-1]["samples"] == 2 * 2 * 4
    assert (tmp_path / "run" / "policy" / "model.safetensors").exists()


# ---- one process: the distributed helpers are no-ops ----------------------------------------------------------

def test_single_process_helpers():
    par = distributed.Parallel("fsdp")
    assert par.strategy == "none" and par.world == 1 and par.is_main and not par.distributed
    x = torch.randn(5)
    assert par.gather(x) is x and par.local(x) is x and par.broadcast(3) == 3
    a, b = par.gather(x, None)
    assert a is x and b is None
    assert distributed.rank_seed(7) == 7
    assert len({distributed.rank_seed(7, r) for r in range(64)}) == 64
    with pytest.raises(ValueError, match="strategy"):
        distributed.Parallel("zero3")


def test_config_strategy():
    base = {"prior": W.PRIOR}
    assert from_dict(base).distributed.strategy == "ddp"
    assert from_dict({**base, "distributed": {"strategy": "fsdp"}}).distributed.strategy == "fsdp"
    with pytest.raises(ConfigError) as e:
        from_dict({**base, "distributed": {"strategy": "deepspeed"}})
    assert e.value.key == "distributed.strategy"


def test_cli_resume_between_evaluations_and_across_strategies(tmp_path):
    """A checkpoint taken between evaluations resumes with the window's token count of all ranks counted once
    (it was counted once per rank); a DDP checkpoint resumes under FSDP (its optimizer state keyed by index)."""
    import shutil

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"prior": {"tiny": {"vocab_size": 6, "n_layer": 1, "n_embd": 16}}, "max_length": 4,
                               "target": {"constraints": [{"type": "contains_token", "token_id": 3}]}, "steps": 4,
                               "batch_size": 4, "threads": 1, "eval": {"exact": True, "every": 2},
                               "checkpoint_every": 1, "keep_checkpoints": 10, "progress": False}))
    full = tmp_path / "full"
    torchrun("-m", "fdpg.cli", "train", cfg, f"output_dir={full}")
    want = [json.loads(line) for line in open(full / "metrics.jsonl")]
    for strategy in ("ddp", "fsdp"):
        part = tmp_path / strategy
        shutil.copytree(full, part)
        ck = part / "checkpoints"
        shutil.rmtree(ck / "step-00000004")
        (ck / "latest").write_text("step-00000003\n")
        torchrun("-m", "fdpg.cli", "train", cfg, f"output_dir={part}", f"distributed.strategy={strategy}",
                 "--resume")
        got = [json.loads(line) for line in open(part / "metrics.jsonl")]
        assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 2, 4]
        if strategy == "ddp":   # the same run: tokens per sample of the window (steps 3 and 4) as uninterrupted
            a, b = got[-1], want[-1]
            assert math.isclose(a["tokens_per_s"] / a["samples_per_s"], b["tokens_per_s"] / b["samples_per_s"],
                                rel_tol=1e-9)
            assert a["kl_p_pi"] == b["kl_p_pi"]
