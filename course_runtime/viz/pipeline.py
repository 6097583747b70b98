"""Pipeline figures: the Gantt chart of a schedule (simulated or measured) and bubble against m."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

COLORS = {"F": "#4C72B0", "B": "#55A868"}


def plot_gantt(events: Sequence[Any], num_stages: int, ax: Axes | None = None,
               title: str = "", unit: str = "time", labels: bool = True) -> Figure:
    """One row per stage, one bar per forward (blue) and backward (green), labelled with its
    microbatch; white space is the bubble. ``events`` are ``Event``s (a ``Timeline``'s, simulated
    or measured) or tuples ``(stage, op, microbatch, start, end)``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.45 * num_stages + 1.2))
    for e in events:
        stage, op, microbatch = e[0], e[1], e[2]
        start, end = e[-2], e[-1]
        if op not in COLORS:
            continue
        chunk = e[3] if len(e) == 6 else 0
        ax.barh(stage, end - start, left=start, height=0.8, color=COLORS[op],
                alpha=1.0 - 0.35 * (chunk % 2), edgecolor="white", linewidth=0.5)
        if labels:
            ax.text((start + end) / 2, stage, str(microbatch), ha="center", va="center",
                    color="white", fontsize=7)
    ax.set_yticks(range(num_stages), [f"stage {s}" for s in range(num_stages)])
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title, loc="left", fontsize=10)
    ax.bar(0, 0, color=COLORS["F"], label="forward")
    ax.bar(0, 0, color=COLORS["B"], label="backward")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncols=2, frameon=False)
    ax.figure.tight_layout()
    return ax.figure


def plot_bubble_vs_microbatches(stages: Sequence[int], microbatches: Sequence[int],
                                chunks: int = 1, ax: Axes | None = None) -> Figure:
    """The bubble fraction (p - 1) / (v m + p - 1) against m, one curve per p."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for p in stages:
        ax.plot(microbatches, [(p - 1) / (chunks * m + p - 1) for m in microbatches],
                marker="o", ms=3, label=f"p = {p}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches m")
    ax.set_ylabel("bubble fraction")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.figure.tight_layout()
    return ax.figure
