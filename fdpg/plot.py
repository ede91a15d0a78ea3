"""``fdpg plot``: a metric of one or more runs against the step, into a PNG (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError

__all__ = ["read_metrics", "plot_runs"]


def read_metrics(run_dir) -> list[dict]:
    """The evaluations of a run: ``run_dir/metrics.jsonl`` (or the file itself), one dict per line."""
    p = Path(run_dir)
    f = p / "metrics.jsonl" if p.is_dir() else p
    if not f.exists():
        raise ConfigError("RUN_DIR", f"no metrics.jsonl in {str(run_dir)!r}")
    out = []
    for i, line in enumerate(f.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError("RUN_DIR", f"{f}, line {i}: not valid JSON: {e}") from None
    return out


def plot_runs(run_dirs, out, *, metric: str = "kl_p_pi", labels=None, title: str | None = None) -> Path:
    """Draw ``metric`` against ``step`` for each run (log scale when every value is positive); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError("--label", f"{len(labels)} label(s) for {len(run_dirs)} run(s); give one per run")
    runs = [read_metrics(d) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    values = []
    for i, (d, recs) in enumerate(zip(run_dirs, runs)):
        pts = [(r["step"], r[metric]) for r in recs if isinstance(r.get(metric), (int, float))
               and not isinstance(r.get(metric), bool)]
        if not pts:
            known = sorted({k for r in recs for k, v in r.items() if isinstance(v, (int, float))
                            and not isinstance(v, bool)})
            plt.close(fig)
            raise ConfigError("--metric", f"{metric!r} has no numeric value in {str(d)!r}; it has "
                                          f"{', '.join(known)}")
        xs, ys = zip(*pts)
        values += ys
        label = labels[i] if labels else Path(d).name or str(d)
        exact = all(r.get("exact") for r in recs)
        ax.plot(xs, ys, marker="o", markersize=3, label=label + ("" if exact else " (estimated)"))
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
