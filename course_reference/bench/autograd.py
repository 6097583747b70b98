"""Lab 1's benchmark: one SGD training step of an MLP, our engine against PyTorch eager.

The workload is the one the lab grades: widths 784-512-512-10, batch 256, float32, cross-entropy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from course_runtime.timing import device_name, measure_interleaved

from .harness import ratio_record

SIZES = (784, 512, 512, 10)
BATCH = 256


def train_step_timer(Tensor: Any, MLP: Any, SGD: Any, cross_entropy: Any,
                     sizes: Sequence[int] = SIZES, batch: int = BATCH,
                     seed: int = 0) -> Callable[[], float]:
    """A function that runs one SGD step of an MLP built from the given engine, and returns the
    seconds it took. Works for any engine with the course's Tensor API (yours or the reference)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch)
    model = MLP(list(sizes), seed=seed)
    optimizer = SGD(model.parameters(), lr=0.01)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = cross_entropy(model(Tensor(X)), y)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def torch_step_timer(sizes: Sequence[int] = SIZES, batch: int = BATCH,
                     seed: int = 0) -> Callable[[], float]:
    """The same step in PyTorch eager mode (``nn.Linear``, ``F.cross_entropy``, ``optim.SGD``)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X = torch.from_numpy(rng.standard_normal((batch, sizes[0])).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, sizes[-1], batch))
    layers: list[torch.nn.Module] = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(m, n), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def compare_step_times(timers: dict[str, Callable[[], float]], rounds: int = 20,
                       baseline: str = "torch") -> Any:
    """Median step time of each engine and its ratio to ``baseline``, as a pandas DataFrame."""
    import pandas as pd

    times = measure_interleaved(timers, rounds)
    base = float(np.median(times[baseline]))
    rows = []
    for name, samples in times.items():
        median = float(np.median(samples))
        rows.append({"engine": name, "median ms": median * 1e3,
                     "p10 ms": float(np.percentile(samples, 10)) * 1e3,
                     "p90 ms": float(np.percentile(samples, 90)) * 1e3,
                     f"x {baseline}": median / base})
    return pd.DataFrame(rows).set_index("engine")


def plot_step_times(table: Any, title: str = "One training step (784-512-512-10, batch 256)"
                    ) -> Any:
    """A bar chart of median step times with p10-p90 whiskers."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    medians = table["median ms"]
    errors = [medians - table["p10 ms"], table["p90 ms"] - medians]
    ax.barh(table.index, medians, xerr=errors, color=["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
            [: len(table)], capsize=4)
    for i, (value, ratio) in enumerate(zip(medians, table.iloc[:, -1])):
        ax.text(value, i, f"  {value:.1f} ms ({ratio:.2f}x)", va="center")
    ax.set_xlabel("milliseconds per step (median, p10-p90)")
    ax.set_title(title)
    ax.set_xlim(0, float(table["p90 ms"].max()) * 1.5)
    fig.tight_layout()
    return fig


def run(rounds: int = 30) -> list[dict[str, Any]]:
    """The benchmark record for ``make bench``: reference engine vs torch eager."""
    from course_reference import autograd as ref

    times = measure_interleaved({
        "ours": train_step_timer(ref.Tensor, ref.MLP, ref.SGD, ref.cross_entropy),
        "torch": torch_step_timer(),
    }, rounds)
    return [ratio_record("mlp_train_step_784-512-512-10_b256", "course_reference.autograd",
                         "torch eager", times["ours"], times["torch"], device=device_name())]
