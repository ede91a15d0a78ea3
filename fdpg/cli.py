"""The ``fdpg`` command: ``train``, ``sample``, ``demo`` and ``plot``.

    fdpg train CONFIG.yaml [key=value ...] [--resume]     # algorithm: fdpg | psi_learning | q_learning
    torchrun --nproc_per_node 8 -m fdpg.cli train CONFIG.yaml [distributed.strategy=fsdp]   # data parallel
    fdpg sample CONFIG.yaml --n N --out FILE.jsonl [--model PATH] [key=value ...]
    fdpg demo [--steps N] [--out DIR]
    fdpg plot RUN_DIR [RUN_DIR ...] --out FILE.png [--metric kl_p_pi] [--label TEXT ...] [--title TEXT]

Exit status: 0 on success, 2 for a bad configuration or command line (the message on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

__all__ = ["main", "demo", "DEMO_PRIOR", "demo_runs"]

DEMO_PRIOR = {"tiny": {"vocab_size": 6, "n_layer": 2, "n_embd": 32, "seed": 0, "eos_token_id": 0,
                       "initializer_range": 0.3}}


def demo_runs(steps: int = 150) -> list[tuple[str, dict]]:
    """The demo's runs: ``(label, config mapping)`` for forward KL with the baseline, JS, and reverse KL."""
    base = {
        "prior": DEMO_PRIOR, "max_length": 4,
        "target": {"constraints": [{"type": "contains_token", "token_id": 3}]},
        "steps": steps, "batch_size": 64, "lr": 3.0e-3, "lr_schedule": "cosine", "grad_clip": 1.0, "seed": 0,
        "threads": 1,
        "eval": {"exact": True, "every": max(1, steps // 5)}, "progress": False,
    }
    return [
        ("forward KL, baseline (GDC++)", {**base, "divergence": "forward_kl", "baseline": "batch"}),
        ("Jensen-Shannon", {**base, "divergence": "js", "baseline": "batch"}),
        ("reverse KL, log b >= log 1e-3", {**base, "divergence": "reverse_kl", "baseline": "batch",
                                           "log_b_floor": math.log(1e-3)}),
    ]


def demo(steps: int = 150, out: str | None = None, stream=sys.stdout) -> list[list[dict]]:
    """Train the built-in tiny prior toward "contains token 3" with three divergences; print exact KL(p||pi)."""
    from . import exact
    from .trainer import train

    def say(msg=""):
        print(msg, file=stream, flush=True)

    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="fdpg-demo-")
        out = tmp.name
    runs = demo_runs(steps)
    t = DEMO_PRIOR["tiny"]
    n = exact.space_size(t["vocab_size"], runs[0][1]["max_length"], t["eos_token_id"])
    say(f"fdpg demo: a tiny GPT-2 prior (vocabulary {t['vocab_size']}, {t['n_layer']} layers, d={t['n_embd']}), "
        f"sequences of up to {runs[0][1]['max_length']} tokens ending at EOS ({n} in all, scored exactly).")
    say(f"Target p(x) ∝ a(x) 1[x contains token 3]; on-policy f-DPG, batch 64, AdamW (lr 3e-3, cosine), {steps} "
        "steps; exact KL(p||pi) by step:")
    results = []
    t_all = time.perf_counter()
    for i, (label, cfg) in enumerate(runs):
        t0 = time.perf_counter()
        run_dir = train({**cfg, "output_dir": f"{out}/run{i}"}, log=lambda m: None)
        recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        results.append(recs)
        if i == 0:
            say(f"  {'':32s}" + "".join(f"{'step ' + str(r['step']):>11s}" for r in recs))
        kl = "".join(f"{r['kl_p_pi']:11.4f}" for r in recs)
        say(f"  {label:32s}{kl}   ({time.perf_counter() - t0:.1f} s, "
            f"constraint satisfied {recs[0]['constraint_satisfaction']:.0%} -> {recs[-1]['constraint_satisfaction']:.0%})")
    say(f"KL(p||pi) at step 0 is -log Z = {-results[0][0]['log_z']:.4f}: the prior's distance to the target. "
        f"Total {time.perf_counter() - t_all:.1f} s.")
    if tmp is not None:
        tmp.cleanup()
    return results


def _cmd_train(args) -> int:
    from . import distributed
    from .trainer import train

    try:                                     # under torchrun the trainer joins the process group; leave it here
        out = train(args.config, resume=args.resume, overrides=args.overrides)
        main_rank = distributed.is_main()
    finally:
        distributed.teardown()
    if not main_rank:                        # rank 0 reports for the run
        return 0
    last = None
    with open(out / "metrics.jsonl") as f:
        for line in f:
            last = json.loads(line)
    if last is not None:
        keys = ("kl_p_pi", "kl_pi_a", "constraint_satisfaction") if "td_loss" not in last else (
            "kl_p_pi", "kl_pi_a", "reward", "td_loss", "v0", "log_z")
        figs = ", ".join(f"{k} {last[k]:.4g}" for k in keys if last.get(k) is not None)
        print(f"step {last['step']}: {figs} ({'exact' if last.get('exact') else 'estimated'})")
    print(f"run directory: {out}")
    return 0


def _cmd_sample(args) -> int:
    from .qtrainer import sample_batch

    path = sample_batch(args.config, args.n, args.out, model=args.model, overrides=args.overrides, seed=args.seed)
    print(f"wrote {args.n} sequences to {path}")
    return 0


def _cmd_demo(args) -> int:
    demo(steps=args.steps, out=args.out)
    return 0


def _cmd_plot(args) -> int:
    from .plot import plot_runs

    path = plot_runs(args.runs, args.out, metric=args.metric, labels=args.label, title=args.title)
    print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdpg", description="Distribution matching for language models: DPG, GDC++, "
                                                         "f-DPG and KL-control.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,demo,plot}")
    t = sub.add_parser("train", help="train from a YAML configuration")
    t.add_argument("config", help="the YAML configuration file")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override configuration values (dotted keys for nesting, values parsed as YAML)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    t.set_defaults(fn=_cmd_train)
    s = sub.add_parser("sample", help="write an offline batch: sequences of the prior (or --model) with their "
                                      "log-probs and rewards, as JSONL")
    s.add_argument("config", help="the YAML configuration (prior, max_length, target.reward, prompts)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="override configuration values")
    s.add_argument("--n", type=int, required=True, help="number of sequences")
    s.add_argument("--out", required=True, help="the JSONL file to write")
    s.add_argument("--model", default=None, help="sample from this local model directory instead of the prior")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: the config's seed)")
    s.set_defaults(fn=_cmd_sample)
    d = sub.add_parser("demo", help="train a built-in tiny prior three ways and print the exact KL falling")
    d.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    d.add_argument("--out", default=None, help="keep the runs in this directory (default: a temporary one)")
    d.set_defaults(fn=_cmd_demo)
    pl = sub.add_parser("plot", help="draw a metric of one or more runs into a PNG")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    pl.add_argument("--out", required=True, help="the PNG file to write")
    pl.add_argument("--metric", default="kl_p_pi", help="the metric to draw (default kl_p_pi)")
    pl.add_argument("--label", action="append", default=None,
                    help="legend label of each run, in order (repeat once per run; default: the directory names)")
    pl.add_argument("--title", default=None, help="the figure's title")
    pl.set_defaults(fn=_cmd_plot)
    return p


def main(argv=None) -> int:
    from .config import ConfigError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`fdpg sample C.yaml --n 5 --out f.jsonl seed=3`): argparse
    # ends a positional list at the first option and cannot intermix positionals with subcommands
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = args.fn(args)
    except ConfigError as e:
        print(f"fdpg: error: {e}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print("fdpg: interrupted", file=sys.stderr)
        rc = 130
    from .distributed import under_torchrun

    if under_torchrun():
        # A rank of a finished run leaves without the interpreter's shutdown: there, torch's FSDP2 over gloo
        # aborts now and then ("terminate called without an active exception", SIGABRT; seen without fdpg too),
        # and torchrun then reports a run that finished and saved everything as failed. The process group is
        # destroyed and every file closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
