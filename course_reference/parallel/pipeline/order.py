"""The order in which a schedule's actions can run: every stage advances while its next action
can, a send and its receive matched one to one.

This one loop decides whether a schedule finishes (``find_deadlock``), when each action runs
(``simulate``, blocking or buffered) and where the transfers of a compute order go
(``add_communication``); what each of them does at an action is a callback.

Under blocking sends (``dist.send``/``dist.recv`` on gloo) a send and its receive run together,
when each is next on its rank. Under buffered sends (``isend``) a send always runs and its
receive runs once the send has been posted. A compute runs when it is next, unless the
``compute`` callback says it must wait.
"""

from __future__ import annotations

from collections.abc import Callable

from course_runtime.pipeline import COMPUTE, SENDS, Action, Schedule, peer_of

Compute = Callable[[int, Action], bool | None]
Transfer = Callable[[int, Action, int, Action], None]
Send = Callable[[int, Action, int, Action], object]
Receive = Callable[[int, Action, object], None]


def advance(plan: Schedule, *, compute: Compute | None = None, transfer: Transfer | None = None,
            buffered: bool = False, send: Send | None = None,
            receive: Receive | None = None) -> list[int]:
    """Run ``plan`` as far as it goes; returns each stage's position (its length if it finished).

    Round after round, until a round moves nothing, each stage in turn runs the computes at its
    head (``compute(rank, action)`` is told of each; returning ``False`` makes it wait), then at
    most one send or receive: under blocking sends, when the peer's next action is its partner
    (``transfer(rank, action, peer, partner)``, both move); buffered, a send always
    (``send(rank, action, peer, partner)``, whose value its receive gets) and a receive once
    its send has run (``receive(rank, action, value)``).
    """
    p = len(plan)
    heads = [0] * p
    posted: dict[tuple[int, Action], object] = {}  # buffered sends: (receiver, its recv) -> value
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            while heads[r] < len(plan[r]) and plan[r][heads[r]].op in COMPUTE:
                if compute is not None and compute(r, plan[r][heads[r]]) is False:
                    break
                heads[r] += 1
                progressed = True
            if heads[r] >= len(plan[r]) or plan[r][heads[r]].op in COMPUTE:
                continue
            a = plan[r][heads[r]]
            peer, partner = peer_of(a, r, p)
            if buffered:
                if a.op in SENDS:
                    posted[(peer, partner)] = send(r, a, peer, partner) if send else None
                elif (r, a) in posted:
                    value = posted.pop((r, a))
                    if receive is not None:
                        receive(r, a, value)
                else:
                    continue
                heads[r] += 1
                progressed = True
            elif peer != r and heads[peer] < len(plan[peer]) and plan[peer][heads[peer]] == partner:
                if transfer is not None:
                    transfer(r, a, peer, partner)
                heads[r] += 1
                heads[peer] += 1
                progressed = True
    return heads


def stuck(plan: Schedule, heads: list[int]) -> dict[int, tuple[int, Action]]:
    """For every stage that did not reach its end, its position and the action it waits at."""
    return {r: (heads[r], plan[r][heads[r]]) for r in range(len(plan)) if heads[r] < len(plan[r])}
