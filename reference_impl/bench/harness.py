"""Timing that can be trusted on a shared laptop: interleaved rounds, medians and spreads.

Every comparison times the contenders in the same process, round by round, so that a change in
machine load affects all of them alike; results are ratios, never single absolute times.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RESULTS_PATH = Path(__file__).resolve().parents[2] / "book" / "benchmarks" / "results.json"


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


def ratio_record(workload: str, ours: str, peer: str, ours_times: list[float],
                 peer_times: list[float], device: str = "cpu", world_size: int = 1,
                 **counts: Any) -> dict[str, Any]:
    """One result in the course's benchmark format (see DESIGN.md, "Benchmarks")."""
    ours_s, peer_s = statistics.median(ours_times), statistics.median(peer_times)
    pairwise = sorted(o / p for o, p in zip(ours_times, peer_times))
    low, high = pairwise[len(pairwise) // 10], pairwise[-1 - len(pairwise) // 10]
    return {
        "workload": workload, "ours": ours, "peer": peer,
        "ours_s": ours_s, "peer_s": peer_s, "ratio": ours_s / peer_s,
        "spread": [low, high], "device": device, "world_size": world_size,
        "measured": dt.date.today().isoformat(), "rounds": len(ours_times), **counts,
    }


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"


def load_results(path: Path = RESULTS_PATH) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return json.loads(path.read_text())


def save_results(records: list[dict[str, Any]], path: Path = RESULTS_PATH) -> None:
    """Replace the records of the same workloads and peers; keep every other record."""
    keys = {(r["workload"], r["peer"], r.get("world_size", 1), r["device"]) for r in records}
    kept = [r for r in load_results(path)
            if (r["workload"], r["peer"], r.get("world_size", 1), r["device"]) not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept + records, indent=2) + "\n")
