"""Pictures of the paged KV cache: physical blocks, block tables, and how they change as requests
arrive and leave under continuous batching.

The input is a trace: one snapshot per model step, taken before the step runs, a dict with

- ``"step"``: the model call's number; ``"free_blocks"``: free blocks;
- ``"tables"``: ``{id: [physical block, ...]}`` and ``"lengths"``: ``{id: tokens held}`` for
  every running sequence (or request);
- optionally ``"scheduled"``: ``{id: tokens the step computes}``, ``"waiting"``: the ids still
  waiting, and ``"kind"``: what the ids name (``"req"``, the default, or ``"seq"``).

The lab's ``LabPagedCache(..., record=True)`` records one of a serving loop on your own cache;
the book draws the course's continuous batcher the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

_FREE = "#eeeeee"


def request_color(request_id: int) -> Any:
    """A stable colour per request (tab20 cycles every 20 requests)."""
    return plt.get_cmap("tab20")(request_id % 20)


def block_owners(snapshot: dict, num_blocks: int, block_size: int
                 ) -> tuple[list[list[int]], np.ndarray]:
    """For each physical block, the requests whose tables point to it (several after a fork),
    and the tokens it holds (of the first of them)."""
    owners: list[list[int]] = [[] for _ in range(num_blocks)]
    filled = np.zeros(num_blocks, dtype=int)
    for rid, table in snapshot["tables"].items():
        length = snapshot["lengths"][rid]
        for i, b in enumerate(table):
            owners[b].append(rid)
            if len(owners[b]) == 1:
                filled[b] = min(max(length - i * block_size, 0), block_size)
    return owners, filled


def draw_blocks(snapshot: dict, num_blocks: int, block_size: int,
                axes: Sequence[Axes] | None = None, columns: int = 16) -> Figure:
    """Left: the physical blocks as a grid, each coloured by its request and filled as far as it
    holds tokens (grey: free). Right: every running request's block table, logical block i in
    column i, labelled with the physical block it points to."""
    if axes is None:
        figure, axes = plt.subplots(1, 2, figsize=(11, 3.6),
                                    gridspec_kw={"width_ratios": [1, 1.2]})
    else:
        figure = axes[0].figure
    pool, tables = axes
    owners, filled = block_owners(snapshot, num_blocks, block_size)
    rows = -(-num_blocks // columns)
    for b in range(num_blocks):
        x, y = b % columns, rows - 1 - b // columns
        pool.add_patch(Rectangle((x, y), 0.92, 0.92, facecolor=_FREE, edgecolor="#999999",
                                 linewidth=0.5))
        if owners[b]:
            height = 0.92 * filled[b] / block_size
            pool.add_patch(Rectangle((x, y), 0.92, height, facecolor=request_color(owners[b][0]),
                                     edgecolor="none"))
            label = str(b) if len(owners[b]) == 1 else f"{b}×{len(owners[b])}"
            pool.text(x + 0.46, y + 0.46, label, ha="center", va="center", fontsize=6)
    pool.set_xlim(0, columns)
    pool.set_ylim(0, rows)
    pool.set_aspect("equal")
    pool.axis("off")
    used = sum(1 for o in owners if o)
    pool.set_title(f"physical blocks: {used} used, {num_blocks - used} free "
                   f"(block = {block_size} tokens)", fontsize=9)

    running = sorted(snapshot["tables"])
    width = max((len(t) for t in snapshot["tables"].values()), default=1)
    kind = snapshot.get("kind", "req")
    for row, rid in enumerate(running):
        y = len(running) - 1 - row
        scheduled = snapshot.get("scheduled", {}).get(rid, 0)
        tables.text(-0.3, y + 0.45, f"{kind} {rid} ({snapshot['lengths'][rid]} tok, +{scheduled})",
                    ha="right", va="center", fontsize=7)
        for i, b in enumerate(snapshot["tables"][rid]):
            tables.add_patch(Rectangle((i, y), 0.92, 0.9, facecolor=request_color(rid),
                                       edgecolor="none"))
            tables.text(i + 0.46, y + 0.45, str(b), ha="center", va="center", fontsize=6)
    tables.set_xlim(-0.2, max(width, 1))
    tables.set_ylim(0, max(len(running), 1))
    tables.axis("off")
    waiting = snapshot.get("waiting")
    who = "requests" if kind == "req" else "sequences"
    tables.set_title(f"step {snapshot['step']}: block tables of {len(running)} running {who}"
                     + ("" if waiting is None else f"; {len(waiting)} waiting"), fontsize=9)
    figure.tight_layout()
    return figure


def plot_occupancy(trace: Sequence[dict], num_blocks: int, ax: Axes | None = None) -> Figure:
    """Blocks in use and sequences (or requests) running at every step of a trace."""
    if ax is None:
        figure, ax = plt.subplots(figsize=(7, 2.8))
    else:
        figure = ax.figure
    steps = [s["step"] for s in trace]
    ax.plot(steps, [num_blocks - s["free_blocks"] for s in trace], label="blocks in use")
    ax.axhline(num_blocks, color="#999999", linestyle=":", label="all blocks")
    ax.set_xlabel("model step")
    ax.set_ylabel("blocks")
    twin = ax.twinx()
    twin.step(steps, [len(s["tables"]) for s in trace], color="#C44E52", where="post",
              label="running requests")
    twin.set_ylabel("running requests", color="#C44E52")
    ax.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


class BlockTableExplorer(widgets.VBox):
    """A slider over the steps of a trace, redrawing ``draw_blocks`` at each one."""

    def __init__(self, trace: Sequence[dict], num_blocks: int, block_size: int, dpi: int = 80):
        if not trace:
            raise ValueError("an empty trace: record one first (the batcher's trace=True, or "
                             "LabPagedCache(..., record=True) and a serving loop on it)")
        slider = widgets.IntSlider(value=0, min=0, max=len(trace) - 1, description="step",
                                   continuous_update=False)
        image = widgets.Image(format="png")
        super().__init__(children=[slider, image])

        def show(index: int) -> None:
            import io

            figure = draw_blocks(trace[index], num_blocks, block_size)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=dpi)
            plt.close(figure)
            image.value = buffer.getvalue()

        slider.observe(lambda change: show(change["new"]), names="value")
        show(0)
        self.slider, self.image = slider, image


def block_table_explorer(trace: Sequence[dict], num_blocks: int, block_size: int
                         ) -> BlockTableExplorer:
    """An ipywidgets explorer of a batcher's trace; it needs a live kernel (JupyterLab)."""
    return BlockTableExplorer(trace, num_blocks, block_size)
