"""The book's figures of the reference: computation graphs and the backward pass step by step,
ZeRO's memory model, and the benchmark results."""

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
from .memory import memory_explorer, plot_memory_breakdown, plot_memory_per_gpu

__all__ = [
    "BackwardExplorer", "BackwardStep", "backward_animation", "backward_explorer",
    "backward_steps", "draw_graph", "graph_nodes", "known_gradients", "memory_explorer",
    "plot_memory_breakdown", "plot_memory_per_gpu", "plot_ratios", "results_table",
]
