"""The PNG plots of a :class:`~fxattn.bench.results.BenchmarkResult` (passed in; this module
does not import it): latency per engine and batch, and DIA's added latency against its
memory-bandwidth bound."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

#: latency panels per row
COLUMNS = 6


def plot_latency(result: Any, path: str | os.PathLike[str]) -> None:
    """Bar chart: p50 latency per model, one panel per engine and batch, ratio on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(e, b) for e, by_batch in result.latency.items() for b in by_batch]
    columns = max(1, min(len(panels), COLUMNS))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (engine, batch) in zip(axes.flat, panels, strict=False):
        by_model = result.latency[engine][batch]
        names = list(by_model)
        p50 = [by_model[n].p50_ms for n in names]
        p90 = [by_model[n].p90_ms for n in names]
        bars = ax.bar(range(len(names)), p50, color=[f"C{i}" for i in range(len(names))])
        ax.errorbar(range(len(names)), p50, yerr=[[0] * len(names),
                    [hi - lo for hi, lo in zip(p90, p50, strict=True)]],
                    fmt="none", ecolor="black", capsize=3, linewidth=0.8)
        base = by_model[result.baseline].p50_ms
        for bar, value in zip(bars, p50, strict=True):
            ax.annotate(f"{value / base:.2f}x", (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{engine}, batch {batch}", fontsize=9)
        ax.set_ylabel("p50 latency, ms (bar to p90)", fontsize=8)
    fig.suptitle(f"{result.title} (ratio vs {result.baseline} on each bar)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(result: Any, path: str | os.PathLike[str]) -> None:
    """Bars: DIA's added latency next to its memory-bandwidth lower bound, per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({b for by_batch in result.cost.values() for b in by_batch})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8),
                             squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        names = [n for n, by_batch in result.cost.items() if batch in by_batch]
        accounts = [result.cost[n][batch] for n in names]
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [a.lower_bound_ms for a in accounts], 0.4, label="lower bound")
        ax.bar(xs + 0.2, [a.added_ms or 0.0 for a in accounts], 0.4, label="added (measured)")
        for x, acc in zip(xs, accounts, strict=True):
            if acc.multiple is not None:
                ax.annotate(f"{acc.multiple:.1f}x", (x + 0.2, acc.added_ms or 0.0),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                            textcoords="offset points")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ms per run", fontsize=8)
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.title}: DIA's added latency vs its bandwidth lower bound",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
