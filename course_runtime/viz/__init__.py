"""Figures and widgets a lab draws with: pipeline Gantt charts, block tables of a paged cache,
and timing plots. Everything draws with matplotlib (and ipywidgets for the live explorers)."""

from .paged import block_table_explorer, draw_blocks, plot_occupancy
from .pipeline import plot_bubble_vs_microbatches, plot_gantt
from .timing import median_time, plot_op_overhead

__all__ = [
    "block_table_explorer", "draw_blocks", "median_time", "plot_bubble_vs_microbatches",
    "plot_gantt", "plot_occupancy", "plot_op_overhead",
]
