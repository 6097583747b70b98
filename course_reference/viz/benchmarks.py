"""The Benchmarks page: book/benchmarks/results.json as a table and as a chart of ratios."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

COLUMNS = ["workload", "ours", "peer", "ours ms", "peer ms", "ratio", "spread", "device",
           "world size", "measured"]


def results_table(records: Sequence[dict[str, Any]]) -> Any:
    """One row per record, times in milliseconds, sorted by workload (a pandas DataFrame)."""
    import pandas as pd

    rows = [{
        "workload": r["workload"], "ours": r["ours"], "peer": r["peer"],
        "ours ms": r["ours_s"] * 1e3, "peer ms": r["peer_s"] * 1e3, "ratio": r["ratio"],
        "spread": f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}", "device": r["device"],
        "world size": r.get("world_size", 1), "measured": r["measured"],
    } for r in records]
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["workload", "peer"], kind="stable").reset_index(drop=True)


def plot_ratios(records: Sequence[dict[str, Any]]) -> Figure:
    """Horizontal bars of ``ours_s / peer_s`` with the spread as whiskers, grouped by workload,
    on a log axis so that 2x slower and 2x faster sit at the same distance from the 1.0 line."""
    if not records:
        raise ValueError("plot_ratios: no records (run `make bench` first)")
    ordered = sorted(records, key=lambda r: (r["workload"], r["peer"]))
    workloads = list(dict.fromkeys(r["workload"] for r in ordered))
    colors = plt.get_cmap("tab10")
    positions, labels = [], []
    y = 0.0
    previous = None
    for r in ordered:
        if previous is not None and r["workload"] != previous:
            y += 0.6  # a gap between workloads
        positions.append(y)
        labels.append(f"{r['workload']}\nvs {r['peer']}"
                      + (f" ({r['world_size']} ranks)" if r.get("world_size", 1) > 1 else ""))
        previous = r["workload"]
        y += 1.0
    ratios = np.array([r["ratio"] for r in ordered])
    low = np.array([r["spread"][0] for r in ordered])
    high = np.array([r["spread"][1] for r in ordered])
    fig, ax = plt.subplots(figsize=(9, 0.65 * len(ordered) + 1.4))
    ax.barh(positions, ratios, xerr=[np.maximum(ratios - low, 0), np.maximum(high - ratios, 0)],
            color=[colors(workloads.index(r["workload"]) % 10) for r in ordered], capsize=3,
            height=0.7)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    for position, ratio, top in zip(positions, ratios, high):
        ax.text(max(ratio, top) * 1.04, position, f"{ratio:.2f}x", va="center", fontsize=8)
    ax.set_xscale("log")
    left, right = min(float(low.min()), 1.0) / 1.5, max(float(high.max()), 1.0) * 1.8
    ax.set_xlim(left, right)
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32) if left <= t <= right]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("our time / the peer's (median; whiskers: spread); below 1x we are faster")
    ax.set_title("Each reference implementation against PyTorch's own")
    fig.tight_layout()
    return fig
