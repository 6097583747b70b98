"""Timing small operations, and the figure that shows an eager framework's fixed cost per op."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def median_time(fn: Callable[[], object], repeats: int = 7, min_seconds: float = 2e-3) -> float:
    """Seconds per call of ``fn``: calls are batched until a batch lasts ``min_seconds`` (so a
    one-microsecond op is not lost in the timer's resolution), and the median batch is kept."""
    fn()
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start >= min_seconds or number >= 1 << 20:
            break
        number *= 4
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return float(np.median(samples))


def plot_op_overhead(sizes: Sequence[int], seconds: Mapping[str, Sequence[float]],
                     bytes_per_element: int = 12) -> Figure:
    """Left: time per op against the number of elements, log-log; the flat start is the fixed
    cost of a call, the straight rise the memory traffic. Right: the bandwidth that implies
    (``bytes_per_element`` read and written per element: 12 for ``a + b`` in float32)."""
    sizes_array = np.asarray(sizes, dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, values in seconds.items():
        times = np.asarray(values, dtype=float)
        left.loglog(sizes_array, times * 1e6, "o-", ms=3.5, label=name)
        right.semilogx(sizes_array, sizes_array * bytes_per_element / times / 1e9, "o-", ms=3.5,
                       label=name)
        left.annotate(f"{times[0] * 1e6:.1f} µs", (sizes_array[0], times[0] * 1e6),
                      textcoords="offset points", xytext=(4, 6), fontsize=8)
    left.set_xlabel("elements")
    left.set_ylabel("µs per op (median)")
    left.set_title("time of one elementwise op")
    left.grid(True, which="major", alpha=0.3)
    left.legend()
    right.set_xlabel("elements")
    right.set_ylabel("GB/s (bytes read + written / time)")
    right.set_title("effective memory bandwidth")
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
