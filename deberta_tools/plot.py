"""The benchmark's PNG: latency against sequence length, one line per backend (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def latency_plot(cells, labels: dict, batch: int, title: str, path: Path) -> Path | None:
    """Log-log latency vs sequence length at one batch size; None when there is nothing to draw (one length)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({c.seq for c in cells if c.batch == batch})
    if len(seqs) < 2:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(c.backend for c in cells):
        points = sorted((c.seq, c.median_ms) for c in cells if c.backend == name and c.batch == batch and c.ok)
        if points:
            ax.plot(*zip(*points), marker="o", label=labels[name])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(seqs, [str(s) for s in seqs])
    ax.set_xlabel("sequence length")
    ax.set_ylabel(f"median latency, ms (batch {batch})")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
