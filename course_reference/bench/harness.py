"""The benchmark records of `make bench`: one ratio with its spread per workload, saved to
``book/benchmarks/results.json`` (the format is in the README's Benchmarks section). Timing
itself is ``course_runtime.timing``."""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS_PATH = Path(__file__).resolve().parents[2] / "book" / "benchmarks" / "results.json"




def ratio_record(workload: str, ours: str, peer: str, ours_times: list[float],
                 peer_times: list[float], device: str = "cpu", world_size: int = 1,
                 **counts: Any) -> dict[str, Any]:
    """One result in the course's benchmark format (CONTRIBUTING.md, "Benchmarks")."""
    ours_s, peer_s = statistics.median(ours_times), statistics.median(peer_times)
    pairwise = sorted(o / p for o, p in zip(ours_times, peer_times))
    low, high = pairwise[len(pairwise) // 10], pairwise[-1 - len(pairwise) // 10]
    return {
        "workload": workload, "ours": ours, "peer": peer,
        "ours_s": ours_s, "peer_s": peer_s, "ratio": ours_s / peer_s,
        "spread": [low, high], "device": device, "world_size": world_size,
        "measured": dt.date.today().isoformat(), "rounds": len(ours_times), **counts,
    }




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
