"""Figures and widgets for the book: computation graphs, the backward pass step by step, and
timing plots. Everything draws with matplotlib (and ipywidgets for the live explorer)."""

from .benchmarks import plot_ratios, results_table
from .graph import (
    BackwardExplorer,
    BackwardStep,
    backward_animation,
    backward_explorer,
    backward_steps,
    draw_graph,
    graph_nodes,
    known_gradients,
)
from .memory import memory_explorer, plot_memory_breakdown, plot_memory_per_gpu  # noqa: F401
from .paged import block_table_explorer, draw_blocks, plot_occupancy  # noqa: F401
from .pipeline import plot_bubble_vs_microbatches, plot_gantt  # noqa: F401 (re-exported)
from .timing import median_time, plot_op_overhead

__all__ = [
    "BackwardExplorer", "BackwardStep", "backward_animation", "backward_explorer",
    "backward_steps", "draw_graph", "graph_nodes", "known_gradients", "median_time",
    "plot_op_overhead", "plot_ratios", "results_table",
]
