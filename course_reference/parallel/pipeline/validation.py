"""Is a schedule valid? Well formed (the runtime's ``structure_problems``) and, under blocking
sends matched one to one, free of deadlocks.

A schedule is judged with sends and receives *blocking and matched one to one*, the way
``dist.send``/``dist.recv`` behave on gloo: a send completes only when the peer posts the matching
receive. Two neighbours that both send first wait on each other forever, so the order of the
communication matters as much as the order of the compute, and it is checked before anything
runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from course_runtime.pipeline import Action, Schedule, invalid, normalize, structure_problems

from .order import advance, stuck


def find_deadlock(schedule: Sequence[Sequence[Any]]) -> dict[int, tuple[int, Action]]:
    """Run the schedule's blocking order with no clock: compute always proceeds, a send and its
    receive proceed together when both are next on their ranks. Returns, for every rank that can
    never finish, its position and the action it is stuck at; empty if everything finishes."""
    plan = normalize(schedule)
    return stuck(plan, advance(plan))


def schedule_problems(schedule: Sequence[Sequence[Any]], num_microbatches: int,
                      chunks: int = 1) -> list[str]:
    """Everything wrong with a schedule, most basic first: malformed actions, missing or repeated
    work, broken dependencies on a stage, then a deadlock. Empty when the schedule is valid."""
    problems = structure_problems(schedule, num_microbatches, chunks)
    if problems:
        return problems
    waiting = find_deadlock(schedule)
    if waiting:
        described = "; ".join(f"stage {r} waits at position {k}, {a}" for r, (k, a) in
                              sorted(waiting.items()))
        return [f"deadlock (sends and receives block until matched): {described}"]
    return []


def validate(schedule: Sequence[Sequence[Any]], num_microbatches: int, chunks: int = 1
             ) -> Schedule:
    """Raise ``ScheduleError`` listing the problems of an invalid schedule; return it normalized."""
    problems = schedule_problems(schedule, num_microbatches, chunks)
    if problems:
        raise invalid(problems)
    return normalize(schedule)
