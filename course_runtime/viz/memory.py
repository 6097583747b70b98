"""Figures for a memory model of sharded training: bytes per GPU by stage, and a live explorer.

Each function takes the model as a function ``bytes_per_rank(num_params, world_size, stage)``
returning a dict with the bytes per rank of ``"parameters"``, ``"gradients"`` and
``"optimizer"`` (Lab 2's ``theory_bytes`` has that shape); they only draw what it says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

GB = 1e9
STAGE_NAMES = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
KINDS = ("parameters", "gradients", "optimizer")
BytesPerRank = Callable[[float, int, int], Mapping[str, float]]


def _total(bytes_per_rank: BytesPerRank, num_params: float, world_size: int, stage: int) -> float:
    states = bytes_per_rank(num_params, world_size, stage)
    return float(sum(states[kind] for kind in KINDS))


def plot_memory_per_gpu(bytes_per_rank: BytesPerRank, num_params: float,
                        world_sizes: Sequence[int] = (1, 4, 16, 64, 256, 1024),
                        gpu_memory_gb: float | None = 80.0, title: str | None = None,
                        ax: Any = None) -> Any:
    """Model-state GB per GPU against the number of GPUs, one line per stage (log-log), with the
    memory of one GPU as a dashed line."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    n = np.asarray(world_sizes, dtype=int)
    for stage, name in STAGE_NAMES.items():
        ax.plot(n, [_total(bytes_per_rank, num_params, int(k), stage) / GB for k in n],
                marker="o", label=name)
    if gpu_memory_gb:
        ax.axhline(gpu_memory_gb, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"one {gpu_memory_gb:g} GB GPU", (n[0], gpu_memory_gb), xytext=(2, 3),
                    textcoords="offset points", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (data-parallel degree N)")
    ax.set_ylabel("model states per GPU (GB)")
    ax.set_title(title or f"{num_params / 1e9:g}B parameters")
    ax.legend()
    return ax


def plot_memory_breakdown(bytes_per_rank: BytesPerRank, num_params: float, world_size: int,
                          labels: Mapping[str, str] | None = None, ax: Any = None) -> Any:
    """Stacked bars per stage: parameters, gradients and optimizer state per GPU, in GB."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    labels = {kind: kind for kind in KINDS} | dict(labels or {})
    states = [bytes_per_rank(num_params, world_size, s) for s in STAGE_NAMES]
    bottom = np.zeros(len(states))
    for kind in KINDS:
        values = np.array([float(s[kind]) / GB for s in states])
        ax.bar(list(STAGE_NAMES.values()), values, bottom=bottom, label=labels[kind])
        bottom += values
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.3g} GB", (i, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GB per GPU")
    ax.set_title(f"{num_params / 1e9:g}B parameters on {world_size} GPUs")
    ax.legend(fontsize=8)
    return ax


def memory_explorer(bytes_per_rank: BytesPerRank, labels: Mapping[str, str] | None = None
                    ) -> Any:
    """Controls for stage, world size and model size; shows the bytes per GPU and the bars."""
    import ipywidgets as widgets
    from IPython.display import display

    stage = widgets.Dropdown(options=[(name, s) for s, name in STAGE_NAMES.items()], value=3,
                             description="stage")
    world = widgets.SelectionSlider(options=[2 ** k for k in range(11)], value=64,
                                    description="GPUs")
    billions = widgets.FloatLogSlider(value=7.5, base=10, min=-1, max=3, step=0.05,
                                      description="params (B)")
    out = widgets.Output()

    def redraw(*_: Any) -> None:
        psi = billions.value * 1e9
        per_gpu = _total(bytes_per_rank, psi, world.value, stage.value) / GB
        with out:
            out.clear_output(wait=True)
            print(f"{STAGE_NAMES[stage.value]}: {per_gpu:,.2f} GB of model states per GPU "
                  f"({billions.value:.3g}B parameters on {world.value} GPUs)")
            plot_memory_breakdown(bytes_per_rank, psi, world.value, labels)
            plt.show()

    for control in (stage, world, billions):
        control.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([stage, world, billions]), out])
    display(box)
    return box


__all__ = ["STAGE_NAMES", "memory_explorer", "plot_memory_breakdown", "plot_memory_per_gpu"]
