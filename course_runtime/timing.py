"""Timing that can be trusted on a shared laptop: interleaved rounds, medians and spreads.

Every comparison times the contenders in the same process, round by round, so that a change in
machine load affects all of them alike; results are ratios, never single absolute times.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any


def measure_interleaved(timers: Mapping[str, Callable[[], float]], rounds: int, warmup: int = 3
                        ) -> dict[str, list[float]]:
    """Call each timer (which returns the seconds it measured) ``rounds`` times, interleaved."""
    for timer in timers.values():
        for _ in range(warmup):
            timer()
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return times


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"


@contextlib.contextmanager
def pinned_threads(threads: int = 1) -> Iterator[int]:
    """Run the block with ``threads`` BLAS/OpenMP threads (threadpoolctl) and torch threads, and
    restore both after: every comparison of the course times its contenders this way, so that a
    ratio does not depend on the machine's default thread count or on its load."""
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield threads
    finally:
        torch.set_num_threads(previous)


def call_seconds(fn: Callable[..., Any], args: Sequence[Any]) -> float:
    """Wall time of one call ``fn(*args)`` (timed where ``fn`` lives: a submission's function in
    its own process, so that the channel to it is not part of the time)."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start
