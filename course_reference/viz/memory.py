"""Figures for ZeRO's memory model: bytes per GPU by stage, and a live explorer.

Everything is computed by ``course_reference.parallel.memory`` (the ZeRO paper's model: 2Ψ + 2Ψ +
KΨ bytes of model states with mixed-precision Adam, K = 12); these functions only draw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from ..parallel.memory import STAGE_NAMES, bytes_per_gpu, model_state_bytes

GB = 1e9


def plot_memory_per_gpu(num_params: float, world_sizes: Sequence[int] = (1, 4, 16, 64, 256, 1024),
                        gpu_memory_gb: float | None = 80.0, ax: Any = None) -> Any:
    """Model-state GB per GPU against the number of GPUs, one line per stage (log-log), with the
    memory of one GPU as a horizontal line."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    n = np.asarray(world_sizes, dtype=float)
    for stage, name in STAGE_NAMES.items():
        ax.plot(n, [bytes_per_gpu(num_params, int(k), stage) / GB for k in n], marker="o",
                label=name)
    if gpu_memory_gb:
        ax.axhline(gpu_memory_gb, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"one {gpu_memory_gb:g} GB GPU", (n[0], gpu_memory_gb), xytext=(2, 3),
                    textcoords="offset points", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (data-parallel degree N)")
    ax.set_ylabel("model states per GPU (GB)")
    ax.set_title(f"{num_params / 1e9:g}B parameters, mixed-precision Adam")
    ax.legend()
    return ax


def plot_memory_breakdown(num_params: float, world_size: int, ax: Any = None) -> Any:
    """Stacked bars per stage: parameters, gradients and optimizer state per GPU, in GB."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    stages = list(STAGE_NAMES)
    states = [model_state_bytes(num_params, world_size, s) for s in stages]
    bottom = np.zeros(len(stages))
    for kind, label in (("parameters", "fp16 parameters"), ("gradients", "fp16 gradients"),
                        ("optimizer", "optimizer (fp32 params, momentum, variance)")):
        values = np.array([getattr(s, kind) / GB for s in states])
        ax.bar([STAGE_NAMES[s] for s in stages], values, bottom=bottom, label=label)
        bottom += values
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.3g} GB", (i, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GB per GPU")
    ax.set_title(f"{num_params / 1e9:g}B parameters on {world_size} GPUs")
    ax.legend(fontsize=8)
    return ax


def memory_explorer() -> Any:
    """Sliders for stage, world size and model size; shows the bytes per GPU and the bars."""
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
        per_gpu = bytes_per_gpu(psi, world.value, stage.value) / GB
        with out:
            out.clear_output(wait=True)
            print(f"{STAGE_NAMES[stage.value]}: {per_gpu:,.2f} GB of model states per GPU "
                  f"({billions.value:.3g}B parameters on {world.value} GPUs)")
            plot_memory_breakdown(psi, world.value)
            plt.show()

    for control in (stage, world, billions):
        control.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([stage, world, billions]), out])
    display(box)
    return box


__all__ = ["memory_explorer", "plot_memory_breakdown", "plot_memory_per_gpu"]
