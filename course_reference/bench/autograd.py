"""Lab 1's benchmark: one SGD training step of an MLP, our engine against PyTorch eager.

The workload is the one the lab grades: widths 784-512-512-10, batch 256, float32, cross-entropy.
"""

from __future__ import annotations

from typing import Any

from course_runtime.timing import device_name, measure_interleaved, pinned_threads
from course_runtime.training import torch_step_timer, train_step_timer

from .harness import ratio_record


def run(rounds: int = 30) -> list[dict[str, Any]]:
    """The benchmark record for ``make bench``: reference engine vs torch eager, one thread."""
    from course_reference import autograd as ref

    with pinned_threads(1) as threads:
        times = measure_interleaved({
            "ours": train_step_timer(ref.Tensor, ref.MLP, ref.SGD, ref.cross_entropy),
            "torch": torch_step_timer(),
        }, rounds)
    return [ratio_record("mlp_train_step_784-512-512-10_b256", "course_reference.autograd",
                         "torch eager", times["ours"], times["torch"], device=device_name(),
                         threads=threads)]
