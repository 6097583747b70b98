"""One training step of an MLP, timed with any engine that has Lab 1's API, and PyTorch's.

The workload Lab 1 grades and the book measures: one SGD step (forward, cross-entropy, backward,
update) of an MLP 784-512-512-10 on a batch of 256, in float32. ``step_matches_torch`` checks
that an engine's step computes what PyTorch's does before anyone times it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .timing import measure_interleaved

SIZES = (784, 512, 512, 10)
BATCH = 256


def train_step_runner(Tensor: Any, MLP: Any, SGD: Any, cross_entropy: Any,
                      sizes: Sequence[int] = SIZES, batch: int = BATCH, seed: int = 0,
                      lr: float = 0.01) -> tuple[Callable[[], float], list[Any]]:
    """One SGD step of an MLP built from the given engine, as a function that runs it and
    returns the step's loss, and the model's parameters (as they are before the first step)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch)
    model = MLP(list(sizes), seed=seed)
    parameters = list(model.parameters())
    initial = [np.array(p.data, copy=True) for p in parameters]
    optimizer = SGD(parameters, lr=lr)

    def step() -> float:
        optimizer.zero_grad()
        loss = cross_entropy(model(Tensor(X)), y)
        loss.backward()
        optimizer.step()
        return float(np.asarray(loss.data))

    return step, initial


def torch_losses(initial: Sequence[np.ndarray], steps: int, sizes: Sequence[int] = SIZES,
                 batch: int = BATCH, seed: int = 0, lr: float = 0.01) -> np.ndarray:
    """The losses of ``steps`` SGD steps in PyTorch (float32) from the parameters ``initial``
    (weight, bias per layer) on ``train_step_runner``'s batch: what an engine's steps must give."""
    import torch

    rng = np.random.default_rng(seed)
    X = torch.from_numpy(rng.standard_normal((batch, sizes[0])).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, sizes[-1], batch))
    params = [torch.tensor(np.asarray(p, np.float32), requires_grad=True) for p in initial]
    optimizer = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        h = X
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i + 2 < len(params):
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return np.asarray(losses)


def train_step_timer(Tensor: Any, MLP: Any, SGD: Any, cross_entropy: Any,
                     sizes: Sequence[int] = SIZES, batch: int = BATCH,
                     seed: int = 0) -> Callable[[], float]:
    """A function that runs one SGD step of an MLP built from the given engine, and returns the
    seconds it took. Works for any engine with the course's Tensor API (yours or the reference)."""
    run, _ = train_step_runner(Tensor, MLP, SGD, cross_entropy, sizes, batch, seed)

    def step() -> float:
        start = time.perf_counter()
        run()
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


def step_matches_torch(Tensor: Any, MLP: Any, SGD: Any, cross_entropy: Any,
                       sizes: Sequence[int] = (64, 32, 10), batch: int = 16, seed: int = 0,
                       lr: float = 0.1,
                       around_engine: Callable[[], Any] = contextlib.nullcontext) -> None:
    """Raise ``AssertionError`` unless one SGD step of ``MLP`` with this engine gives PyTorch's
    loss and updated parameters, starting from the same weights (a small MLP of the same kind).

    The engine's code runs inside ``around_engine()`` (a context manager: the graders block
    PyTorch's autograd there), PyTorch's outside it.
    """
    import torch

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch)
    with around_engine():
        model = MLP(list(sizes), seed=seed)
        params = list(model.parameters())
    theirs = [torch.tensor(np.array(p.data, dtype=np.float64), requires_grad=True) for p in params]
    h = torch.tensor(X, dtype=torch.float64)
    for i in range(0, len(theirs), 2):
        h = h @ theirs[i] + theirs[i + 1]
        if i + 2 < len(theirs):
            h = torch.relu(h)
    expected = torch.nn.functional.cross_entropy(h, torch.from_numpy(y))
    expected.backward()

    with around_engine():
        optimizer = SGD(params, lr=lr)
        optimizer.zero_grad()
        loss = cross_entropy(model(Tensor(X)), y)
        loss.backward()
        optimizer.step()
    got_loss, want_loss = float(np.asarray(loss.data)), float(expected.detach())
    if not abs(got_loss - want_loss) <= 1e-4 * max(1.0, abs(want_loss)):
        raise AssertionError(f"one training step: your loss is {got_loss:.6f}, PyTorch's on the "
                             f"same weights and batch {want_loss:.6f}")
    for k, (p, t) in enumerate(zip(params, theirs)):
        updated = (t - lr * t.grad).detach().numpy()
        error = float(np.max(np.abs(np.asarray(p.data, np.float64) - updated)))
        if not error <= 1e-4:
            raise AssertionError(f"one training step: parameter {k} (shape {updated.shape}) "
                                 f"after the SGD update differs from PyTorch's by {error:.2e}: "
                                 "is a gradient wrong or missing?")
