"""The schedules, as plain data: GPipe, 1F1B, and interleaved 1F1B with its communication added
deadlock-free.

GPipe (Huang et al., NeurIPS 2019): every forward, then every backward. 1F1B, the flushed
schedule of PipeDream (Narayanan et al., SOSP 2019) as PipeDream-Flush (Narayanan et al., ICML
2021, section 3.2): p - 1 - s forwards of warm-up on stage s, then one forward, one backward,
then the remaining backwards. Same bubble as GPipe, (p - 1) / (m + p - 1) of the time, but at
most p microbatches' activations held instead of m. Interleaved 1F1B (Narayanan et al., SC
2021, section 2.2) gives each rank v model chunks and divides the bubble by v.
"""

from __future__ import annotations

from collections.abc import Sequence

from course_runtime.pipeline import Action, Schedule, ScheduleError, model_stage, peer_of

from .order import advance


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
    clocks = [0.0] * p
    events: list[tuple[float, int, int, Action]] = []

    def run(r: int, a: Action) -> bool:
        """Run compute ``a`` on rank ``r`` once its input is ready; False while it is not."""
        s = model_stage(r, a.chunk, p)
        need = (("act", a.microbatch, s) if a.op == "F" and s > 0 else
                ("grad", a.microbatch, s) if a.op == "B" and s < stages - 1 else None)
        if need is not None and need not in ready:
            return False
        start = max(clocks[r], ready.get(need, 0.0)) if need else clocks[r]
        clocks[r] = start + (forward_cost if a.op == "F" else backward_cost) / chunks
        events.append((start, len(events) + 1, r, a))
        if a.op == "F" and s < stages - 1:
            ready[("act", a.microbatch, s + 1)] = clocks[r]
        if a.op == "B" and s > 0:
            ready[("grad", a.microbatch, s - 1)] = clocks[r]
        return True

    heads = advance([list(actions) for actions in compute], compute=run)
    if any(h < len(compute[r]) for r, h in enumerate(heads)):
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
