"""Pipeline parallelism: schedules as plain data, a validator, a simulator and an executor.

A schedule is a list per stage (one stage per rank) of ``Action``s, run in order:

    F(i) / B(i)               forward / backward of microbatch i on this stage
    send_fwd(i) / recv_fwd(i) the activation of microbatch i, to the next stage / from the previous
    send_bwd(i) / recv_bwd(i) the gradient of that activation, to the previous / from the next

A schedule is judged with sends and receives *blocking and matched one to one*, the way
``dist.send``/``dist.recv`` behave on gloo: a send completes only when the peer posts the matching
receive. Two neighbours that both send first wait on each other forever, so the order of the
communication matters as much as the order of the compute, and the validator checks it before
anything runs. The executor (``StageRunner``) posts its transfers non-blocking (``irecv`` and
``isend``, as Megatron-LM does), so that a send never stalls a stage: every schedule the validator
accepts runs there, and ``simulate(..., blocking=False)`` models its timing.

With ``chunks = v > 1`` (the interleaved schedule of Narayanan et al., SC 2021, section 2.2)
each rank holds v model chunks: chunk c of rank r is model stage ``c * p + r`` of ``p * v``, and
every action names its chunk.

The schedules: GPipe (Huang et al., NeurIPS 2019): every forward, then every backward; 1F1B,
the flushed schedule of PipeDream (Narayanan et al., SOSP 2019) as PipeDream-Flush (Narayanan et
al., ICML 2021, section 3.2): p - 1 - s forwards of warm-up on stage s, then one forward, one
backward, then the remaining backwards. Same bubble as GPipe, (p - 1) / (m + p - 1) of the time,
but at most p microbatches' activations held instead of m.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from course_runtime.distributed import comm
from course_runtime.distributed.launcher import status

COMPUTE = ("F", "B")
SENDS = {"send_fwd": "recv_fwd", "send_bwd": "recv_bwd"}
RECVS = {recv: send for send, recv in SENDS.items()}
OPS = (*COMPUTE, *SENDS, *RECVS)


class Action(NamedTuple):
    """One step of a stage's schedule: ``Action("F", 3)`` is the forward of microbatch 3."""

    op: str
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        chunk = f", chunk {self.chunk}" if self.chunk else ""
        return f"{self.op}({self.microbatch}{chunk})"


Schedule = list[list[Action]]


class ScheduleError(ValueError):
    """A schedule that is malformed, breaks a dependency, or deadlocks; the message says where."""


# ----------------------------------------------------------------------------------------------
# Model stages and neighbours
# ----------------------------------------------------------------------------------------------

def model_stage(rank: int, chunk: int, num_ranks: int) -> int:
    """Which of the p * v model stages chunk ``chunk`` of rank ``rank`` runs (Megatron's layout)."""
    return chunk * num_ranks + rank


def peer_of(action: Action, rank: int, num_ranks: int) -> tuple[int, Action]:
    """The rank on the other side of a send or receive, and the action it must post to match."""
    stage = model_stage(rank, action.chunk, num_ranks)
    forward = action.op in ("send_fwd", "recv_fwd")
    sending = action.op in SENDS
    other = stage + 1 if forward == sending else stage - 1
    partner = SENDS[action.op] if sending else RECVS[action.op]
    return other % num_ranks, Action(partner, action.microbatch, other // num_ranks)


# ----------------------------------------------------------------------------------------------
# The schedules
# ----------------------------------------------------------------------------------------------

def _forward(stage: int, last: int, i: int) -> list[Action]:
    return ([Action("recv_fwd", i)] if stage > 0 else []) + [Action("F", i)] + \
           ([Action("send_fwd", i)] if stage < last else [])


def _backward(stage: int, last: int, i: int) -> list[Action]:
    return ([Action("recv_bwd", i)] if stage < last else []) + [Action("B", i)] + \
           ([Action("send_bwd", i)] if stage > 0 else [])


def gpipe_schedule(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe: every forward in order, then every backward in order (Huang et al., 2019)."""
    _check_sizes(num_stages, num_microbatches)
    last = num_stages - 1
    return [[a for i in range(num_microbatches) for a in _forward(s, last, i)] +
            [a for i in range(num_microbatches) for a in _backward(s, last, i)]
            for s in range(num_stages)]


def one_f_one_b_schedule(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B with a flush (PipeDream-Flush, Narayanan et al., ICML 2021, section 3.2).

    Stage s runs ``p - 1 - s`` warm-up forwards, then alternates one forward and one backward,
    then drains the remaining backwards. In the steady state a stage receives the gradient it
    needs *before* sending the activation it has just computed: its successor sends that
    gradient before it asks for the activation, and with blocking sends the reverse order
    deadlocks.
    """
    _check_sizes(num_stages, num_microbatches)
    last = num_stages - 1
    schedule = []
    for s in range(num_stages):
        warmup = min(num_stages - 1 - s, num_microbatches)
        actions = [a for i in range(warmup) for a in _forward(s, last, i)]
        for k in range(num_microbatches - warmup):
            i = warmup + k
            actions += [Action("recv_fwd", i)] if s > 0 else []
            actions.append(Action("F", i))
            actions += [Action("recv_bwd", k), Action("send_fwd", i)] if s < last else []
            actions.append(Action("B", k))
            actions += [Action("send_bwd", k)] if s > 0 else []
        for k in range(num_microbatches - warmup, num_microbatches):
            actions += _backward(s, last, k)
        schedule.append(actions)
    return schedule


def interleaved_compute_order(num_ranks: int, num_microbatches: int, chunks: int
                              ) -> list[list[Action]]:
    """The compute order of interleaved 1F1B (Narayanan et al., SC 2021, section 2.2), one list
    of ``F``/``B`` per rank. Microbatches go through a rank's chunks in groups of p; the warm-up
    is ``(p - r - 1) * 2 + (v - 1) * p`` forwards on rank r."""
    if num_microbatches % num_ranks:
        raise ScheduleError(f"interleaved 1F1B needs the number of microbatches "
                            f"({num_microbatches}) to be a multiple of the number of stages "
                            f"({num_ranks})")
    p, m, v = num_ranks, num_microbatches, chunks
    total = m * v

    def unit(k: int, forward: bool) -> Action:
        group, within = divmod(k, p * v)
        chunk = within // p
        microbatch = group * p + within % p
        return Action("F" if forward else "B", microbatch, chunk if forward else v - 1 - chunk)

    orders = []
    for r in range(p):
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [unit(k, True) for k in range(warmup)]
        for k in range(total - warmup):
            order += [unit(warmup + k, True), unit(k, False)]
        order += [unit(k, False) for k in range(total - warmup, total)]
        orders.append(order)
    return orders


def add_communication(compute: Sequence[Sequence[Action]], num_microbatches: int,
                      chunks: int = 1, forward_cost: float = 1.0,
                      backward_cost: float = 2.0) -> Schedule:
    """Insert the sends and receives that a per-rank compute order needs, deadlock-free.

    Runs the compute orders in simulated time (sends buffered), which gives one global order
    of events consistent with every rank's order and every dependency. Each transfer sits at
    the moment its data is ready, on both of its ranks; a schedule whose ranks all follow one
    global order can never have two ranks waiting on each other. Under blocking sends the
    producer still waits for its peer to finish the compute it is in: that is why Megatron-LM
    posts these transfers as non-blocking pairs (``simulate(..., blocking=False)``).
    """
    p = len(compute)
    stages = p * chunks
    ready: dict[tuple[str, int, int], float] = {}  # data key -> time it becomes available
    heads, clocks = [0] * p, [0.0] * p
    events: list[tuple[float, int, int, Action]] = []
    sequence = 0
    while any(h < len(compute[r]) for r, h in enumerate(heads)):
        progressed = False
        for r in range(p):
            while heads[r] < len(compute[r]):
                a = compute[r][heads[r]]
                s = model_stage(r, a.chunk, p)
                need = (("act", a.microbatch, s) if a.op == "F" and s > 0 else
                        ("grad", a.microbatch, s) if a.op == "B" and s < stages - 1 else None)
                if need is not None and need not in ready:
                    break
                start = max(clocks[r], ready.get(need, 0.0)) if need else clocks[r]
                clocks[r] = start + (forward_cost if a.op == "F" else backward_cost) / chunks
                sequence += 1
                events.append((start, sequence, r, a))
                if a.op == "F" and s < stages - 1:
                    ready[("act", a.microbatch, s + 1)] = clocks[r]
                if a.op == "B" and s > 0:
                    ready[("grad", a.microbatch, s - 1)] = clocks[r]
                heads[r] += 1
                progressed = True
        if not progressed:
            raise ScheduleError("the compute order cannot finish: some rank waits for data that "
                                "its peer only produces later")
    # One global order: computes at their start time, each transfer (its send and its receive
    # together) at the time its data is ready, and before any compute that starts then.
    ordered: list[tuple[float, int, int, list[tuple[int, Action]]]] = []
    for start, seq, r, a in events:
        ordered.append((start, 1, seq, [(r, a)]))
        s = model_stage(r, a.chunk, p)
        if (a.op == "F" and s < stages - 1) or (a.op == "B" and s > 0):
            send = Action("send_fwd" if a.op == "F" else "send_bwd", a.microbatch, a.chunk)
            peer, recv = peer_of(send, r, p)
            cost = forward_cost if a.op == "F" else backward_cost
            ordered.append((start + cost / chunks, 0, seq, [(r, send), (peer, recv)]))
    schedule: Schedule = [[] for _ in range(p)]
    for *_, placed in sorted(ordered, key=lambda e: e[:3]):
        for r, a in placed:
            schedule[r].append(a)
    return schedule


def interleaved_schedule(num_stages: int, num_microbatches: int, chunks: int) -> Schedule:
    """Interleaved 1F1B: ``chunks`` model chunks per rank, communication added deadlock-free."""
    _check_sizes(num_stages, num_microbatches)
    if chunks > 1 and num_stages < 2:
        raise ScheduleError("interleaving needs at least 2 stages (a rank cannot send to itself)")
    order = interleaved_compute_order(num_stages, num_microbatches, chunks)
    return add_communication(order, num_microbatches, chunks)


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1 or num_microbatches < 1:
        raise ScheduleError(f"need at least one stage and one microbatch, got "
                            f"num_stages={num_stages}, num_microbatches={num_microbatches}")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def normalize(schedule: Sequence[Sequence[Any]]) -> Schedule:
    """Turn tuples like ``("F", 3)`` into ``Action``s, rejecting anything else with its place."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ScheduleError(f"a schedule is a non-empty list (one list of actions per stage), "
                            f"got {type(schedule).__name__}")
    result: Schedule = []
    for s, actions in enumerate(schedule):
        if not isinstance(actions, (list, tuple)):
            raise ScheduleError(f"stage {s}: expected a list of actions, got "
                                f"{type(actions).__name__}")
        stage = []
        for k, a in enumerate(actions):
            if not isinstance(a, (tuple, list)) or len(a) not in (2, 3):
                raise ScheduleError(f"stage {s}, action {k}: expected (op, microbatch) or "
                                    f"(op, microbatch, chunk), got {a!r}")
            if a[0] not in OPS:
                raise ScheduleError(f"stage {s}, action {k}: unknown op {a[0]!r}; the ops are "
                                    f"{', '.join(OPS)}")
            stage.append(Action(str(a[0]), int(a[1]), int(a[2]) if len(a) == 3 else 0))
        result.append(stage)
    return result


def schedule_problems(schedule: Sequence[Sequence[Any]], num_microbatches: int,
                      chunks: int = 1) -> list[str]:
    """Everything wrong with a schedule, most basic first: malformed actions, missing or repeated
    work, broken dependencies on a stage, then a deadlock. Empty when the schedule is valid."""
    try:
        plan = normalize(schedule)
    except ScheduleError as error:
        return [str(error)]
    p, m, v = len(plan), num_microbatches, chunks
    stages = p * v
    problems = []
    for r, actions in enumerate(plan):
        seen: dict[Action, int] = {}
        for k, a in enumerate(actions):
            if not 0 <= a.microbatch < m or not 0 <= a.chunk < v:
                problems.append(f"stage {r}, action {k} {a}: microbatch must be in [0, {m}) and "
                                f"chunk in [0, {v})")
                continue
            if a in seen:
                problems.append(f"stage {r}: {a} appears twice (positions {seen[a]} and {k})")
            seen.setdefault(a, k)
        for c in range(v):
            s = model_stage(r, c, p)
            for i in range(m):
                expected = ["F", "B"] + (["recv_fwd", "send_bwd"] if s > 0 else []) + \
                           (["send_fwd", "recv_bwd"] if s < stages - 1 else [])
                for op in expected:
                    if Action(op, i, c) not in seen:
                        problems.append(f"stage {r}: {Action(op, i, c)} is missing")
                unexpected = {"recv_fwd", "send_bwd", "send_fwd", "recv_bwd"} - set(expected)
                for op in sorted(unexpected):
                    if Action(op, i, c) in seen:
                        where = "first" if op in ("recv_fwd", "send_bwd") else "last"
                        problems.append(f"stage {r}: {Action(op, i, c)} at position "
                                        f"{seen[Action(op, i, c)]}, but the {where} stage has "
                                        f"no neighbour on that side")
                # Order on this stage: what each action needs must come first.
                needs = {"F": "recv_fwd", "send_fwd": "F", "B": "recv_bwd", "send_bwd": "B"}
                pairs = [(op, needs[op]) for op in needs] + [("B", "F")]
                for op, before in pairs:
                    a, b = Action(op, i, c), Action(before, i, c)
                    if a in seen and b in seen and seen[b] > seen[a]:
                        problems.append(f"stage {r}: {a} at position {seen[a]} comes before "
                                        f"{b} at position {seen[b]}, which it needs")
    if problems:
        return problems
    stuck = find_deadlock(plan)
    if stuck:
        described = "; ".join(f"stage {r} waits at position {k}, {a}" for r, (k, a) in
                              sorted(stuck.items()))
        problems.append(f"deadlock (sends and receives block until matched): {described}")
    return problems


def validate(schedule: Sequence[Sequence[Any]], num_microbatches: int, chunks: int = 1
             ) -> Schedule:
    """Raise ``ScheduleError`` listing the problems of an invalid schedule; return it normalized."""
    problems = schedule_problems(schedule, num_microbatches, chunks)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ScheduleError("invalid pipeline schedule:\n  " + "\n  ".join(shown))
    return normalize(schedule)


def find_deadlock(schedule: Sequence[Sequence[Any]]) -> dict[int, tuple[int, Action]]:
    """Run the schedule's blocking order with no clock: compute always proceeds, a send and its
    receive proceed together when both are next on their ranks. Returns, for every rank that can
    never finish, its position and the action it is stuck at; empty if everything finishes."""
    plan = normalize(schedule)
    p = len(plan)
    heads = [0] * p
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            while heads[r] < len(plan[r]) and plan[r][heads[r]].op in COMPUTE:
                heads[r] += 1
                progressed = True
            if heads[r] >= len(plan[r]):
                continue
            a = plan[r][heads[r]]
            peer, partner = peer_of(a, r, p)
            if peer != r and heads[peer] < len(plan[peer]) and plan[peer][heads[peer]] == partner:
                heads[r] += 1
                heads[peer] += 1
                progressed = True
    return {r: (heads[r], plan[r][heads[r]]) for r in range(p) if heads[r] < len(plan[r])}


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


def bubble_formula(num_stages: int, num_microbatches: int, chunks: int = 1) -> float:
    """The idle fraction of a flushed pipeline with uniform stages: (p - 1) / (v m + p - 1)."""
    return (num_stages - 1) / (chunks * num_microbatches + num_stages - 1)


# ----------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------

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
    heads, clocks = [0] * p, [0.0] * p
    events: list[Event] = []
    sent: dict[tuple[int, Action], float] = {}  # buffered sends: (receiver, its recv) -> arrival
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            while heads[r] < len(plan[r]) and plan[r][heads[r]].op in COMPUTE:
                a = plan[r][heads[r]]
                cost = (fwd[r] if a.op == "F" else bwd[r]) / chunks
                events.append(Event(r, a.op, a.microbatch, a.chunk, clocks[r], clocks[r] + cost))
                clocks[r] += cost
                heads[r] += 1
                progressed = True
            if heads[r] >= len(plan[r]):
                continue
            a = plan[r][heads[r]]
            peer, partner = peer_of(a, r, p)
            if not blocking:
                if a.op in SENDS:
                    sent[(peer, partner)] = clocks[r] + comm_cost
                    events.append(Event(r, a.op, a.microbatch, a.chunk, clocks[r], clocks[r]))
                elif (r, a) in sent:
                    start = max(clocks[r], sent.pop((r, a)) - comm_cost)
                    events.append(Event(r, a.op, a.microbatch, a.chunk, start, start + comm_cost))
                    clocks[r] = start + comm_cost
                else:
                    continue
                heads[r] += 1
                progressed = True
            elif peer != r and heads[peer] < len(plan[peer]) and plan[peer][heads[peer]] == partner:
                start = max(clocks[r], clocks[peer])
                for rank, action in ((r, a), (peer, partner)):
                    events.append(Event(rank, action.op, action.microbatch, action.chunk, start,
                                        start + comm_cost))
                    clocks[rank] = start + comm_cost
                    heads[rank] += 1
                progressed = True
    stuck = {r: plan[r][heads[r]] for r in range(p) if heads[r] < len(plan[r])}
    if stuck:
        raise ScheduleError("the schedule deadlocks: " + "; ".join(
            f"stage {r} waits at {a}" for r, a in sorted(stuck.items())))
    return Timeline(events, p, peak_in_flight(plan))


# ----------------------------------------------------------------------------------------------
# Execution on real processes
# ----------------------------------------------------------------------------------------------

def _tag(action: Action, stage: int, num_model_stages: int) -> int:
    """One tag per message (the microbatch and the link between stages s and s + 1 it crosses),
    so that gloo matches a send with exactly the receive it was meant for."""
    forward = action.op in ("send_fwd", "recv_fwd")
    link = stage if action.op in ("send_fwd", "recv_bwd") else stage - 1
    return (action.microbatch * num_model_stages + link) * 2 + (0 if forward else 1)


def _infer_shapes(modules: dict[int, nn.Module], rank: int, p: int, stages: int,
                  example: torch.Tensor) -> dict[tuple[int, str], torch.Size]:
    """The input and output shapes of every model stage this rank runs, passed stage to stage
    along the pipeline once before the first step (activations and their gradients share them)."""
    shapes: dict[tuple[int, str], torch.Size] = {}
    shape = example.shape
    for s in range(stages):
        owner = s % p
        if owner == rank:
            if s > 0 and (s - 1) % p != rank:
                meta = torch.zeros(8, dtype=torch.long)
                dist.recv(meta, src=(s - 1) % p, tag=10_000_000 + s)
                shape = torch.Size(meta[1:1 + int(meta[0])].tolist())
            shapes[s, "in"] = shape
            with torch.no_grad():
                shape = modules[s](torch.zeros(shape, dtype=example.dtype)).shape
            shapes[s, "out"] = shape
            if s + 1 < stages and (s + 1) % p != rank:
                meta = torch.zeros(8, dtype=torch.long)
                meta[0] = len(shape)
                meta[1:1 + len(shape)] = torch.tensor(shape)
                dist.send(meta, dst=(s + 1) % p, tag=10_000_000 + s + 1)
    return shapes


class StageRunner:
    """This rank's model stages, built once, and the interpreter of its list of actions.

    ``make_stage(s)`` builds model stage s (seeded, so that every process builds the same one).
    The loss of the whole batch is the mean of the microbatch losses, so each microbatch's loss
    is divided by m before its backward, and gradients accumulate across microbatches.

    The schedule fixes the order of the work; the transfers need not block it. At the start of a
    step every receive of the step is posted (``irecv``, into buffers kept from step to step),
    and every send is posted as an ``isend`` that the step waits for only at its end. A
    ``recv_*`` action then waits only for its data to arrive, and a send never waits for its
    peer: the buffered model of ``simulate(..., blocking=False)``. Every schedule that finishes
    under blocking sends (the ones ``validate`` accepts) finishes under this one too.
    """

    def __init__(self, rank: int, world_size: int, make_stage: Callable[[int], nn.Module],
                 example: torch.Tensor, chunks: int = 1):
        self.rank, self.p, self.stages = rank, world_size, world_size * chunks
        self.modules = {model_stage(rank, c, world_size): make_stage(model_stage(rank, c,
                                                                                world_size))
                        for c in range(chunks)}
        self.shapes = _infer_shapes(self.modules, rank, world_size, self.stages, example)
        self.dtype = example.dtype
        # One receive buffer per receive action, reused from step to step: a step waits for
        # every receive it posts, so the next one can post into the same memory.
        self._buffers: dict[Action, torch.Tensor] = {}

    def _post_receives(self, actions: Sequence[Action]
                       ) -> list[tuple[torch.Tensor, Any, str]]:
        """Post every receive of ``actions`` now, in their order; returns, per receive, its
        buffer, its pending work and what to call it while waiting for it."""
        rank, p, stages = self.rank, self.p, self.stages
        posted, seen = [], set()
        for a in actions:
            if a.op not in RECVS:
                continue
            s = model_stage(rank, a.chunk, p)
            forward = a.op == "recv_fwd"
            # A receive listed twice (an unchecked schedule) must not share its buffer.
            buffer = self._buffers.get(a) if a not in seen else None
            if buffer is None:
                buffer = torch.empty(self.shapes[s, "in" if forward else "out"],
                                     dtype=self.dtype)
                self._buffers.setdefault(a, buffer)
            seen.add(a)
            src, tag = (s - 1 if forward else s + 1) % p, _tag(a, s, stages)
            comm.stats.record("recv", 0.0)
            posted.append((buffer, dist.irecv(buffer, src=src, tag=tag),
                           f"recv({tuple(buffer.shape)}, src={src}, tag={tag})"))
        return posted

    def step(self, actions: Sequence[Action], microbatches: Sequence[torch.Tensor],
             targets: Sequence[torch.Tensor],
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """Run one step's actions; returns the losses computed here, the measured events
        (``time.perf_counter`` seconds) and the most activations held at once."""
        rank, p, stages, m = self.rank, self.p, self.stages, len(microbatches)
        for module in self.modules.values():
            module.zero_grad(set_to_none=True)
        receives = iter(self._post_receives(actions))
        sends: list[tuple[Any, torch.Tensor, str]] = []  # kept alive until they complete
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        grads: dict[tuple[int, int], torch.Tensor] = {}
        losses: dict[int, float] = {}
        events: list[Event] = []
        held = peak = 0
        for a in actions:
            s, key = model_stage(rank, a.chunk, p), (a.microbatch, a.chunk)
            start = time.perf_counter()
            if a.op == "recv_fwd" or a.op == "recv_bwd":
                buffer, work, what = next(receives)
                with status(what):
                    work.wait()
                if a.op == "recv_fwd":
                    # A fresh leaf on the buffer's memory, so that its .grad is this step's.
                    inputs[key] = buffer.detach().requires_grad_()
                else:
                    grads[key] = buffer
            elif a.op == "F":
                x = microbatches[a.microbatch] if s == 0 else inputs[key]
                out = self.modules[s](x)
                if s == stages - 1:
                    out = loss_fn(out, targets[a.microbatch]) / m
                    losses[a.microbatch] = float(out.detach()) * m
                outputs[key] = out
                held += 1
                peak = max(peak, held)
            elif a.op == "B":
                out = outputs.pop(key)
                out.backward(grads.pop(key) if s < stages - 1 else None)
                held -= 1
            else:
                if a.op == "send_fwd":
                    tensor, dst = outputs[key].detach(), (s + 1) % p
                else:
                    tensor, dst = inputs.pop(key).grad, (s - 1) % p
                tag = _tag(a, s, stages)
                comm.stats.record("send", tensor.numel() * tensor.element_size())
                sends.append((dist.isend(tensor, dst=dst, tag=tag), tensor,
                              f"send({tuple(tensor.shape)}, dst={dst}, tag={tag})"))
            events.append(Event(rank, a.op, a.microbatch, a.chunk, start, time.perf_counter()))
        for work, _, what in sends:
            with status(what):
                work.wait()
        return {"losses": losses, "events": events, "peak_in_flight": peak}

    def gradients(self) -> dict[str, torch.Tensor]:
        """This rank's gradients, named ``"<stage>.<name>"`` as in ``nn.Sequential`` of all
        stages."""
        return {f"{s}.{name}": param.grad.detach().clone()
                for s, module in self.modules.items()
                for name, param in module.named_parameters() if param.grad is not None}


def pipeline_worker(rank: int, world_size: int, schedule: Sequence[Sequence[Any]],
                    make_stage: Callable[[int], nn.Module], microbatches: Sequence[torch.Tensor],
                    targets: Sequence[torch.Tensor],
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    chunks: int = 1, steps: int = 1) -> dict[str, Any]:
    """Run this rank's part of ``schedule`` ``steps`` times (launch with ``world_size =
    len(schedule)``); returns the gradients, and what ``StageRunner.step`` reports for the
    last step."""
    actions = normalize(schedule)[rank]
    runner = StageRunner(rank, world_size, make_stage, microbatches[0], chunks)
    dist.barrier()
    for _ in range(steps):
        report = runner.step(actions, microbatches, targets, loss_fn)
    return {"grads": runner.gradients(), **report}


@dataclass
class PipelineResult:
    """What a pipelined step produced: gradients keyed as in ``nn.Sequential`` of all stages,
    the loss of each microbatch, and the measured timeline (seconds from the first event)."""

    grads: dict[str, torch.Tensor]
    losses: list[float]
    timeline: Timeline


def measured_timeline(per_rank: Sequence[Sequence[Event]], num_stages: int,
                      peaks: Sequence[int] = ()) -> Timeline:
    """Put every rank's events on one clock starting at zero (``perf_counter`` is system-wide)."""
    origin = min(e.start for events in per_rank for e in events)
    events = [e._replace(start=e.start - origin, end=e.end - origin)
              for events in per_rank for e in events]
    return Timeline(sorted(events, key=lambda e: (e.start, e.stage)), num_stages, list(peaks))


def run_pipeline(schedule: Sequence[Sequence[Any]], make_stage: Callable[[int], nn.Module],
                 microbatches: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 chunks: int = 1, check: bool = True, timeout: float = 60.0,
                 steps: int = 1) -> PipelineResult:
    """Validate ``schedule`` (a deadlock is reported here, before any process starts), then run
    it on ``len(schedule)`` processes and gather what they computed."""
    from course_runtime.distributed import launch

    if check:
        validate(schedule, len(microbatches), chunks)
    p = len(schedule)
    results = launch(pipeline_worker, p, schedule, make_stage, list(microbatches), list(targets),
                     loss_fn, chunks, steps, timeout=timeout,
                     group_timeout=min(timeout, 30.0), threads=1)
    grads = {name: g for r in results for name, g in r["grads"].items()}
    losses_by_mb = {i: loss for r in results for i, loss in r["losses"].items()}
    timeline = measured_timeline([r["events"] for r in results], p,
                                 [r["peak_in_flight"] for r in results])
    return PipelineResult(dict(sorted(grads.items(), key=lambda kv: _stage_key(kv[0]))),
                          [losses_by_mb[i] for i in sorted(losses_by_mb)], timeline)


def _stage_key(name: str) -> tuple[int, str]:
    stage, _, rest = name.partition(".")
    return int(stage), rest


def reference_gradients(make_stage: Callable[[int], nn.Module], num_model_stages: int,
                        microbatches: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], float]:
    """The unsplit model's gradients and loss on the whole batch, in one process: what every
    pipeline schedule must reproduce (loss = mean over microbatches of each one's loss)."""
    model = nn.Sequential(*[make_stage(s) for s in range(num_model_stages)])
    losses = [loss_fn(model(x), y) for x, y in zip(microbatches, targets)]
    loss = torch.stack(losses).mean()
    loss.backward()
    return ({name: p.grad.detach().clone() for name, p in model.named_parameters()},
            float(loss.detach()))
