"""The runtime's ZeRO memory figures drawn with the ZeRO paper's model (2Ψ + 2Ψ + KΨ bytes of
model states with mixed-precision Adam, K = 12) from ``course_reference.parallel.memory``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from course_runtime.viz import memory as figures

from ..parallel.memory import model_state_bytes

LABELS = {"parameters": "fp16 parameters", "gradients": "fp16 gradients",
          "optimizer": "optimizer (fp32 params, momentum, variance)"}


def paper_model(num_params: float, world_size: int, stage: int) -> dict[str, float]:
    """Bytes per rank of each kind of model state, mixed-precision Adam."""
    return asdict(model_state_bytes(num_params, world_size, stage))


def plot_memory_per_gpu(num_params: float, world_sizes: Any = (1, 4, 16, 64, 256, 1024),
                        gpu_memory_gb: float | None = 80.0, ax: Any = None) -> Any:
    return figures.plot_memory_per_gpu(
        paper_model, num_params, world_sizes, gpu_memory_gb, ax=ax,
        title=f"{num_params / 1e9:g}B parameters, mixed-precision Adam")


def plot_memory_breakdown(num_params: float, world_size: int, ax: Any = None) -> Any:
    return figures.plot_memory_breakdown(paper_model, num_params, world_size, LABELS, ax=ax)


def memory_explorer() -> Any:
    return figures.memory_explorer(paper_model, LABELS)


__all__ = ["memory_explorer", "paper_model", "plot_memory_breakdown", "plot_memory_per_gpu"]
