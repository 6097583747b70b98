"""Counted collectives: torch.distributed, plus a tally of calls and bytes per rank.

Tests and plots compare communication volume with theory (data parallel and ZeRO-1/2 move 2Ψ per
step, ZeRO-3 3Ψ, Rajbhandari et al. 2020, section 7), so every collective here records, for the
calling rank, the bytes it *sends* under the bandwidth-optimal ring algorithm for that collective
(Patarasuk and Yuan, 2009): with N ranks and a tensor of S bytes,

    all_reduce      2 (N-1)/N S      (a reduce-scatter, then an all-gather)
    reduce_scatter    (N-1)/N S      (S = the full, unreduced input)
    all_gather        (N-1)/N S      (S = the full, gathered output)
    broadcast         S on the root, 0 elsewhere (as a tree or ring would amortise)
    send              S
    all_to_all        (N-1)/N S

These counts are hardware-independent: they do not depend on what gloo or NCCL actually does on
the wire, which is exactly why tests can check them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .launcher import status


@dataclass
class CommStats:
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_sent: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes_sent.values()))

    def record(self, op: str, nbytes: float) -> None:
        self.calls[op] += 1
        self.bytes_sent[op] += nbytes

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {op: {"calls": self.calls[op], "bytes": self.bytes_sent[op]} for op in self.calls}


stats = CommStats()


@contextlib.contextmanager
def counting() -> Iterator[CommStats]:
    """Count only the collectives inside the block: ``with counting() as c: ...; c.total_bytes``."""
    global stats
    previous, stats = stats, CommStats()
    try:
        yield stats
    finally:
        stats = previous


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _world(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    n = _world(group)
    stats.record("all_reduce", 2 * (n - 1) / n * _nbytes(tensor))
    with status(f"all_reduce({tuple(tensor.shape)})"):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


# torch 2.13 renamed the flat-tensor collectives (the old names warn on every call); the course
# also supports older torch, where only the old names exist.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter(output: torch.Tensor, input: torch.Tensor,
                   op: dist.ReduceOp = dist.ReduceOp.SUM,
                   group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``output`` (numel S/N) receives this rank's reduced chunk of ``input`` (numel S)."""
    n = _world(group)
    if input.numel() != output.numel() * n:
        raise ValueError(f"reduce_scatter: input has {input.numel()} elements, expected "
                         f"{n} x {output.numel()} (world size x output)")
    stats.record("reduce_scatter", (n - 1) / n * _nbytes(input))
    with status(f"reduce_scatter({tuple(input.shape)} -> {tuple(output.shape)})"):
        _reduce_scatter(output, input, op=op, group=group)
    return output


def all_gather(output: torch.Tensor, input: torch.Tensor,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``output`` (numel N x S/N) receives every rank's ``input`` (numel S/N), in rank order."""
    n = _world(group)
    if output.numel() != input.numel() * n:
        raise ValueError(f"all_gather: output has {output.numel()} elements, expected "
                         f"{n} x {input.numel()} (world size x input)")
    stats.record("all_gather", (n - 1) / n * _nbytes(output))
    with status(f"all_gather({tuple(input.shape)} -> {tuple(output.shape)})"):
        _all_gather(output, input, group=group)
    return output


class Pending:
    """A collective started in the background (``all_gather_async``): ``wait()`` returns its
    output once every rank's part has arrived."""

    def __init__(self, work: Any, output: torch.Tensor, what: str):
        self.work, self.output, self.what = work, output, what

    def wait(self) -> torch.Tensor:
        with status(self.what):
            self.work.wait()
        return self.output


def all_gather_async(output: torch.Tensor, input: torch.Tensor,
                     group: dist.ProcessGroup | None = None) -> Pending:
    """``all_gather`` started in the background: the caller computes on while the parts travel
    (DistriFusion's overlap of communication with the next step's compute), and calls
    ``wait()`` on the result before it reads ``output``. Counted under its own name, with the
    bytes ``all_gather`` would send: a check can tell the two apart."""
    n = _world(group)
    if output.numel() != input.numel() * n:
        raise ValueError(f"all_gather_async: output has {output.numel()} elements, expected "
                         f"{n} x {input.numel()} (world size x input)")
    stats.record("all_gather_async", (n - 1) / n * _nbytes(output))
    work = _all_gather(output, input, group=group, async_op=True)
    return Pending(work, output, f"all_gather_async({tuple(input.shape)} -> "
                                 f"{tuple(output.shape)})")


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None = None
              ) -> torch.Tensor:
    stats.record("broadcast", _nbytes(tensor) if dist.get_rank() == src else 0.0)
    with status(f"broadcast({tuple(tensor.shape)}, src={src})"):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_to_all(output: torch.Tensor, input: torch.Tensor,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    n = _world(group)
    stats.record("all_to_all", (n - 1) / n * _nbytes(input))
    with status(f"all_to_all({tuple(input.shape)})"):
        dist.all_to_all_single(output, input, group=group)
    return output


def send(tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
    stats.record("send", _nbytes(tensor))
    with status(f"send({tuple(tensor.shape)}, dst={dst}, tag={tag})"):
        dist.send(tensor, dst=dst, tag=tag)


def recv(tensor: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
    stats.record("recv", 0.0)
    with status(f"recv({tuple(tensor.shape)}, src={src}, tag={tag})"):
        dist.recv(tensor, src=src, tag=tag)
    return tensor


def barrier(group: dist.ProcessGroup | None = None) -> None:
    with status("barrier"):
        dist.barrier(group=group)
