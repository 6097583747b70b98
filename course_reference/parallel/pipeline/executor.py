"""The executor: a schedule run on real processes, one rank per stage, gradients and a measured
timeline gathered.

``StageRunner`` posts its transfers non-blocking (``irecv`` and ``isend``, as Megatron-LM does),
so that a send never stalls a stage: every schedule the validator accepts runs here, and
``simulate(..., blocking=False)`` models its timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from course_runtime.distributed import comm
from course_runtime.distributed.launcher import status
from course_runtime.pipeline import RECVS, Action, model_stage, normalize

from .simulation import Event, Timeline
from .validation import validate


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
