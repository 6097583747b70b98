"""How much memory and communication each ZeRO stage needs, from the ZeRO paper's own model.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
(SC 2020), section 3.1 and 5: with mixed-precision Adam, a model of Ψ parameters holds 2Ψ bytes
of fp16 parameters, 2Ψ bytes of fp16 gradients and KΨ bytes of optimizer state (an fp32 copy of
the parameters, momentum and variance: K = 12). Data parallelism replicates all of it on each of
the N ranks; ZeRO partitions it, stage by stage:

    stage 0 (DDP)    (2 + 2 + K) Ψ
    stage 1          (2 + 2) Ψ + K Ψ / N                 optimizer state sharded
    stage 2          2 Ψ + (2 + K) Ψ / N                 + gradients sharded
    stage 3          (2 + 2 + K) Ψ / N                   + parameters sharded

Communication per step and rank (section 7), in parameter-sized units of the gradient dtype:
data parallelism all-reduces the gradients (2Ψ: a reduce-scatter then an all-gather); ZeRO-1 and
ZeRO-2 reduce-scatter the gradients and all-gather the updated parameters (also 2Ψ); ZeRO-3
all-gathers the parameters twice, for the forward and for the backward, and reduce-scatters the
gradients (3Ψ). The exact ring volume is these times (N - 1) / N.

Everything counts model states only; activations, temporary buffers and fragmentation come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = (0, 1, 2, 3)
STAGE_NAMES = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}


@dataclass(frozen=True)
class ModelStates:
    """Bytes per rank of each kind of model state."""

    parameters: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def _check(num_params: float, world_size: int, stage: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (0 is plain data parallelism), got "
                         f"{stage!r}")
    if world_size < 1 or int(world_size) != world_size:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if num_params < 0:
        raise ValueError(f"num_params must be non-negative, got {num_params!r}")


def model_state_bytes(num_params: float, world_size: int, stage: int, *,
                      param_bytes: float = 2, grad_bytes: float = 2,
                      optimizer_bytes: float = 12) -> ModelStates:
    """Bytes per rank of parameters, gradients and optimizer state (the paper's defaults:
    fp16 parameters and gradients, K = 12 bytes of Adam state per parameter).

    For fp32 training with plain AdamW, as in the labs, use ``param_bytes=4, grad_bytes=4,
    optimizer_bytes=8`` (momentum and variance; the parameters are their own master copy).
    """
    _check(num_params, world_size, stage)
    n = world_size
    return ModelStates(
        parameters=num_params * param_bytes / (n if stage >= 3 else 1),
        gradients=num_params * grad_bytes / (n if stage >= 2 else 1),
        optimizer=num_params * optimizer_bytes / (n if stage >= 1 else 1),
    )


def bytes_per_gpu(num_params: float, world_size: int, stage: int, **dtypes: float) -> float:
    """Total model-state bytes per rank: 16Ψ for DDP, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N."""
    return model_state_bytes(num_params, world_size, stage, **dtypes).total


def comm_volume(num_params: float, world_size: int, stage: int, *,
                element_bytes: float = 2, exact: bool = True) -> float:
    """Bytes each rank sends per training step under ring collectives.

    ``exact=False`` gives the paper's rounded figure (2Ψ or 3Ψ elements); ``exact=True``
    multiplies it by (N - 1) / N, what a ring really moves, and what
    ``course_runtime.distributed.comm`` counts.
    """
    _check(num_params, world_size, stage)
    units = 3 if stage == 3 else 2
    factor = (world_size - 1) / world_size if exact else 1.0
    return units * num_params * element_bytes * factor


def max_params(memory_bytes: float, world_size: int, stage: int, **dtypes: float) -> float:
    """The largest model whose model states fit in ``memory_bytes`` per rank."""
    per_param = bytes_per_gpu(1.0, world_size, stage, **dtypes)
    return memory_bytes / per_param


__all__ = ["STAGES", "STAGE_NAMES", "ModelStates", "bytes_per_gpu", "comm_volume",
           "max_params", "model_state_bytes"]
