"""A sampled memory timeline written out: CSV rows, and a plot of every metric."""

from __future__ import annotations

from dataclasses import fields

from .._math import ceil_div
from .sampler import LABELS, METRICS, Sample

__all__ = ["write_csv", "plot"]


def write_csv(path, runs: dict[str, list[Sample]]) -> None:
    """One row per sample per run: ``strategy, t, rss, ..., phase`` (bytes; empty = unknown)."""
    cols = [f.name for f in fields(Sample)]
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(["strategy"] + cols) + "\n")
        for name, samples in runs.items():
            for s in samples:
                vals = ["" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                        for v in (getattr(s, c) for c in cols)]
                f.write(",".join([name] + vals) + "\n")


def plot(path, runs: dict[str, list[Sample]], *, title: str = "", dpi: int = 100) -> None:
    """One panel per known metric, runs overlaid, GiB over seconds, each run's peak marked.

    Needs matplotlib (``pip install mmapload[plot]``); raises ImportError without it.
    """
    from matplotlib.figure import Figure   # no pyplot: no global backend or figure state
    shown = [m for m in METRICS if any(getattr(s, m) is not None for v in runs.values() for s in v)]
    ncols = 2 if len(shown) > 1 else 1
    nrows = ceil_div(len(shown), ncols)
    fig = Figure(figsize=(5.2 * ncols, 2.5 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    tmax = max((s.t for v in runs.values() for s in v), default=0.0)
    for ax, metric in zip(axes, shown):
        top = 0.0
        for k, (name, samples) in enumerate(runs.items()):
            pts = [(s.t, getattr(s, metric) / 2**30) for s in samples if getattr(s, metric) is not None]
            if not pts:
                continue
            ts, gib = zip(*pts)
            line, = ax.plot(ts, gib, lw=1.2, label=name)
            i = max(range(len(gib)), key=gib.__getitem__)
            ax.plot([ts[i]], [gib[i]], "o", ms=3.5, color=line.get_color())
            right = ts[i] > 0.85 * tmax          # label left of a peak at the right edge
            ax.annotate(f"{gib[i]:.2f}", (ts[i], gib[i]), xytext=(-3 if right else 3, 2 + 8 * k),
                        textcoords="offset points", fontsize=7, color=line.get_color(),
                        ha="right" if right else "left")
            top = max(top, gib[i])
        ax.set_title(LABELS[metric], fontsize=9)
        ax.set_ylabel("GiB", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, top * (1.1 + 0.08 * len(runs)) or 1)
        ax.grid(alpha=0.3)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for ax in axes[max(0, len(shown) - ncols):len(shown)]:
        ax.set_xlabel("seconds", fontsize=8)
    if shown:
        axes[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=dpi)
