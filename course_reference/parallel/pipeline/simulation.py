"""Timelines without processes: when each action of a schedule runs, the bubble, and the
activations each stage holds.

Under blocking sends (``dist.send``) a transfer starts when both sides reach it; with
``blocking=False`` (``isend``, buffered, as the executor posts its transfers) a send never waits
and its receive waits only for the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from course_runtime.pipeline import COMPUTE, Action, ScheduleError, normalize

from .order import advance, stuck


class Event(NamedTuple):
    """An action that ran (or would run) on ``stage`` from ``start`` to ``end`` (seconds or
    cost units)."""

    stage: int
    op: str
    microbatch: int
    chunk: int
    start: float
    end: float


@dataclass
class Timeline:
    """Every stage's events; the bubble is the idle share of ``stages x makespan``."""

    events: list[Event]
    num_stages: int
    peak_in_flight: list[int] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - min(e.start for e in self.events)

    def busy(self) -> list[float]:
        """Seconds of compute (F and B) per stage."""
        totals = [0.0] * self.num_stages
        for e in self.events:
            if e.op in COMPUTE:
                totals[e.stage] += e.end - e.start
        return totals

    @property
    def bubble_fraction(self) -> float:
        span = self.makespan
        return 1.0 - sum(self.busy()) / (self.num_stages * span) if span > 0 else 0.0


def peak_in_flight(schedule: Sequence[Sequence[Any]]) -> list[int]:
    """Per stage, the most microbatches whose forward has run and backward has not: the
    activations the stage must hold at once (per chunk, for interleaved schedules)."""
    peaks = []
    for actions in normalize(schedule):
        held = peak = 0
        for a in actions:
            held += 1 if a.op == "F" else -1 if a.op == "B" else 0
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


def simulate(schedule: Sequence[Sequence[Any]], forward_cost: float | Sequence[float] = 1.0,
             backward_cost: float | Sequence[float] = 2.0, comm_cost: float = 0.0,
             chunks: int = 1, blocking: bool = True) -> Timeline:
    """Each stage's timeline: compute takes its cost; under the blocking model (``dist.send``),
    a transfer starts when both sides reach it and takes ``comm_cost``; with ``blocking=False``
    (``isend``, buffered) a send never waits and its receive waits only for the data. Costs are
    per microbatch for one rank's whole share of the model (a number, or one per rank); a chunk
    costs 1/``chunks`` of it."""
    plan = normalize(schedule)
    p = len(plan)

    def per_rank(cost: float | Sequence[float]) -> list[float]:
        values = [float(cost)] * p if isinstance(cost, (int, float)) else [float(c) for c in cost]
        if len(values) != p:
            raise ValueError(f"expected one cost per stage ({p}), got {len(values)}")
        return values

    fwd, bwd = per_rank(forward_cost), per_rank(backward_cost)
    clocks = [0.0] * p
    events: list[Event] = []

    def run(r: int, a: Action, start: float, cost: float) -> None:
        events.append(Event(r, a.op, a.microbatch, a.chunk, start, start + cost))
        clocks[r] = start + cost

    def compute(r: int, a: Action) -> None:
        run(r, a, clocks[r], (fwd[r] if a.op == "F" else bwd[r]) / chunks)

    def transfer(r: int, a: Action, peer: int, partner: Action) -> None:
        start = max(clocks[r], clocks[peer])
        run(r, a, start, comm_cost)
        run(peer, partner, start, comm_cost)

    def send(r: int, a: Action, peer: int, partner: Action) -> float:
        run(r, a, clocks[r], 0.0)
        return clocks[r] + comm_cost  # when the data arrives

    def receive(r: int, a: Action, arrival: object) -> None:
        assert isinstance(arrival, float)
        run(r, a, max(clocks[r], arrival - comm_cost), comm_cost)

    heads = advance(plan, compute=compute, transfer=transfer, buffered=not blocking, send=send,
                    receive=receive)
    waiting = stuck(plan, heads)
    if waiting:
        raise ScheduleError("the schedule deadlocks: " + "; ".join(
            f"stage {r} waits at {a}" for r, (_, a) in sorted(waiting.items())))
    return Timeline(events, p, peak_in_flight(plan))
