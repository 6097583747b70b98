"""Ring all-reduce from point-to-point messages, and DDP-style gradient bucketing.

The ring algorithm (Patarasuk and Yuan, 2009; made popular for deep learning by Horovod,
Sergeev and Del Balso 2018, section 3) is a reduce-scatter followed by an all-gather. Each of the
N ranks splits its tensor into N chunks; in each of N - 1 steps every rank sends one chunk to its
right neighbour and adds the chunk it receives from its left one. After the reduce-scatter, rank
r holds the complete sum of chunk (r + 1) mod N; N - 1 more steps pass the finished chunks around.
Every rank sends 2 (N - 1) chunks of Ψ / N bytes: 2 (N - 1) / N Ψ in all, whatever N is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from course_runtime.distributed import comm
from course_runtime.distributed.launcher import status


@dataclass(frozen=True)
class RingMessage:
    """One chunk sent in one step of the ring: ``phase`` is "reduce-scatter" or "all-gather"."""

    step: int
    phase: str
    src: int
    dst: int
    chunk: int


def ring_schedule(world_size: int) -> list[list[RingMessage]]:
    """The messages of each of the 2 (N - 1) steps, as data (plotted in the book, run below)."""
    if world_size < 1:
        raise ValueError(f"ring_schedule: world_size must be at least 1, got {world_size}")
    n, steps = world_size, []
    for step in range(2 * (n - 1)):
        phase = "reduce-scatter" if step < n - 1 else "all-gather"
        s = step if step < n - 1 else step - (n - 1)
        # In the reduce-scatter rank r forwards chunk r - s; in the all-gather it forwards the
        # finished chunk r + 1 - s, which it completed (or received) in the previous step.
        offset = 0 if phase == "reduce-scatter" else 1
        steps.append([RingMessage(step, phase, r, (r + 1) % n, (r + offset - s) % n)
                      for r in range(n)])
    return steps


def ring_contributions(world_size: int) -> list[list[list[int]]]:
    """After each step (and before the first), how many ranks' data each rank's copy of each
    chunk holds: ``result[step][rank][chunk]``; N everywhere at the end means all-reduced."""
    n = world_size
    held = [[{r} for _ in range(n)] for r in range(n)]
    history = [[[len(c) for c in row] for row in held]]
    for messages in ring_schedule(n):
        sent = [(m, set(held[m.src][m.chunk])) for m in messages]  # all sends happen at once
        for m, data in sent:
            if m.phase == "reduce-scatter":
                held[m.dst][m.chunk] |= data
            else:
                held[m.dst][m.chunk] = data
        history.append([[len(c) for c in row] for row in held])
    return history


def ring_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank in place, with the ring algorithm over send/recv.

    Counts each chunk sent in ``comm.stats`` (op "ring_send"), so a caller can check the total
    against 2 (N - 1) / N Ψ. Works for any numel, also one not divisible by N.
    """
    n, rank = dist.get_world_size(), dist.get_rank()
    if n == 1:
        return tensor
    if not tensor.is_contiguous():
        raise ValueError("ring_all_reduce: the tensor must be contiguous (it is reduced in place)")
    chunks = list(torch.tensor_split(tensor.view(-1), n))
    for messages in ring_schedule(n):
        m = messages[rank]
        incoming = (rank - 1) % n
        recv_chunk = messages[incoming].chunk
        outgoing = chunks[m.chunk].clone()
        buffer = torch.empty_like(chunks[recv_chunk])
        comm.stats.record("ring_send", outgoing.numel() * outgoing.element_size())
        with status(f"ring_all_reduce step {m.step} ({m.phase}): send chunk {m.chunk} to rank "
                    f"{m.dst}, receive chunk {recv_chunk} from rank {incoming}"):
            # Post both sides at once: a ring of blocking sends would deadlock.
            requests = [dist.isend(outgoing, m.dst), dist.irecv(buffer, incoming)]
            for request in requests:
                request.wait()
        if m.phase == "reduce-scatter":
            chunks[recv_chunk] += buffer
        else:
            chunks[recv_chunk].copy_(buffer)
    return tensor


# -- DDP: gradient buckets, all-reduced while the backward pass is still running ------------------

def make_buckets(params: Iterable[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Group parameters into buckets of about ``bucket_bytes``, in reverse order of definition:
    gradients become ready roughly in that order during the backward pass (Li et al. 2020,
    section 3.2.3), so the first bucket can be reduced while later layers are still computing."""
    if bucket_bytes <= 0:
        raise ValueError(f"make_buckets: bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in reversed([p for p in params if p.requires_grad]):
        if buckets[-1] and size + p.numel() * p.element_size() > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return [b for b in buckets if b]


@dataclass
class BucketEvent:
    """When a bucket's last gradient arrived (seconds since the backward pass began)."""

    bucket: int
    ready_s: float
    nbytes: int


@dataclass
class BucketedAllReduce:
    """Average gradients over the data-parallel ranks, one asynchronous all-reduce per bucket,
    launched from a hook as soon as the bucket's last gradient has been accumulated.

    Use: ``ddp = BucketedAllReduce(model.parameters(), bucket_bytes)``; ``ddp.start()``;
    ``loss.backward()``; ``ddp.finish()`` (waits, then writes the averaged gradients back).
    """

    params: Iterable[nn.Parameter]
    bucket_bytes: int = 25 * 2**20
    buckets: list[list[nn.Parameter]] = field(init=False)
    events: list[BucketEvent] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.buckets = make_buckets(self.params, self.bucket_bytes)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._pending: list[int] = []
        self._work: list[tuple[int, torch.Tensor, dist.Work]] = []
        for p in (p for b in self.buckets for p in b):
            p.register_post_accumulate_grad_hook(self._on_grad)

    def start(self) -> None:
        self._pending = [len(b) for b in self.buckets]
        self._work, self.events = [], []
        self._t0 = time.perf_counter()

    def _on_grad(self, p: nn.Parameter) -> None:
        i = self._bucket_of[id(p)]
        self._pending[i] -= 1
        if self._pending[i] == 0:
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]])
            nbytes = flat.numel() * flat.element_size()
            n = dist.get_world_size()
            comm.stats.record("all_reduce", 2 * (n - 1) / n * nbytes)
            self.events.append(BucketEvent(i, time.perf_counter() - self._t0, nbytes))
            self._work.append((i, flat, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> float:
        """Wait for every bucket; returns the seconds spent waiting after the backward pass."""
        if any(self._pending):
            missing = [i for i, k in enumerate(self._pending) if k]
            raise RuntimeError(f"BucketedAllReduce.finish: buckets {missing} never received all "
                               "their gradients (a parameter unused in the loss?)")
        start = time.perf_counter()
        n = dist.get_world_size()
        with status(f"waiting for {len(self._work)} bucket all-reduces"):
            for i, flat, work in self._work:
                work.wait()
                flat /= n
                offset = 0
                for q in self.buckets[i]:
                    q.grad.copy_(flat[offset:offset + q.numel()].view_as(q))
                    offset += q.numel()
        return time.perf_counter() - start
