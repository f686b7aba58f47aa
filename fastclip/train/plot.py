"""``curves.png`` of a run: loss, learning rate, logit scale and zero-shot accuracy against the step."""
from __future__ import annotations

import json
import os


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir!r}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str) -> str:
    """Draw ``run_dir/curves.png`` from ``run_dir/metrics.jsonl``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, key, title in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "lr", "learning rate"),
                           (axes[1, 0], "logit_scale", "logit scale (exp)")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes[1, 1]
    evals = [r for r in rows if "zeroshot_top1" in r]
    if evals:
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["zeroshot_top1"] for r in evals], marker="o", label="top-1")
        ax.plot(steps, [r["zeroshot_top5"] for r in evals], marker="o", label="top-5")
        ax.axhline(evals[-1]["chance"], color="grey", linestyle="--", label="chance (top-1)")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title(f"zero-shot accuracy ({evals[-1].get('eval_split', 'eval')})")
    else:
        ax.set_title("zero-shot accuracy (no evaluation)")
    ax.set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["plot_run", "read_metrics"]
