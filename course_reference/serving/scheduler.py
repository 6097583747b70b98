"""Serving a stream of requests: continuous batching on the paged cache.

``ContinuousBatcher``: iteration-level scheduling (Yu et al., "Orca", OSDI 2022, section 4.1):
after every model step, finished sequences leave and waiting ones join, so no row waits for the
longest request of its batch. Requests are admitted when the paged cache has free blocks for
them; when a running sequence needs a block and none is free, the newest sequence is preempted
and later recomputed from its tokens (Kwon et al., "PagedAttention", SOSP 2023, section 4.5).
With ``token_budget`` set, prompts are split into chunks that ride along with the decode tokens
of the other sequences, so a long prompt never stalls them (Agrawal et al., "Sarathi-Serve",
OSDI 2024, section 4). On a cache with ``prefix_caching``, a prompt starts from the cached
blocks of its longest known prefix. Every step is one model call on a packed row.

The batcher talks to the cache through its scheduler verbs only (``can_append`` / ``append``,
``can_allocate`` / ``allocate``, ``free_sequence``), as nano-vllm's scheduler does with its
block manager, never through the allocator or the block tables. The baseline it improves on,
static padded batching (``course_runtime.serving.serve_static``), and the request stream
(``request_stream``) are the runtime's; both servers decode greedily and return the same tokens
for the same requests, which the tests check against generation without any cache.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from course_runtime.serving import Request, ServeResult, blocks_for

from .paged_cache import PagedKVCache


@dataclass
class _Running:
    request: Request
    seq_id: int | None = None      # in the cache while running; None while waiting
    tokens: list[int] = field(default_factory=list)
    computed: int = 0              # tokens whose keys and values are in the cache

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt):]


class ContinuousBatcher:
    """Iteration-level scheduling over a ``PagedKVCache`` (see the module docstring).

    max_batch: the most sequences in one step. token_budget: the most tokens in one step; None
    runs whole prompts at once, a number turns on chunked prefill. watermark: free blocks kept
    back per running sequence when admitting, so that the running ones can grow for a while
    before anyone must be preempted (vLLM keeps such a watermark too).
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, *, max_batch: int = 256,
                 token_budget: int | None = None, watermark: float = 0.0):
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"token_budget must be at least 1, got {token_budget}")
        self.model, self.cache = model, cache
        self.max_batch, self.token_budget, self.watermark = max_batch, token_budget, watermark

    def run(self, requests: Sequence[Request], *, trace: bool = False) -> ServeResult:
        """Serve every request to completion; greedy decoding."""
        capacity = self.cache.num_blocks
        for r in requests:
            if blocks_for(r.max_len, self.cache.block_size) > capacity:
                raise ValueError(f"request {r.id} needs {r.max_len} tokens "
                                 f"({blocks_for(r.max_len, self.cache.block_size)} blocks) but "
                                 f"the whole cache has {capacity} blocks")
            if not r.prompt or r.max_new_tokens < 1:
                raise ValueError(f"request {r.id}: needs a prompt and at least one new token")
        arriving = deque(sorted(requests, key=lambda r: r.arrival))
        waiting: deque[_Running] = deque()
        running: list[_Running] = []
        result = ServeResult(outputs={})
        step = 0
        start = time.perf_counter()
        while arriving or waiting or running:
            while arriving and arriving[0].arrival <= step:
                r = arriving.popleft()
                waiting.append(_Running(r, tokens=list(r.prompt)))
            if not waiting and not running:
                step = arriving[0].arrival        # idle until the next request arrives
                continue
            segments = self._schedule(waiting, running, result)
            if trace:
                result.trace.append(self._snapshot(step, running, waiting, segments))
            self._step(segments, running, result, step)
            step += 1
        result.wall_s = time.perf_counter() - start
        return result

    def _schedule(self, waiting: deque[_Running], running: list[_Running],
                  result: ServeResult) -> list[tuple[_Running, int]]:
        """This step's tokens: decodes first, then prompt chunks, within budget and memory."""
        cache = self.cache
        budget = math.inf if self.token_budget is None else self.token_budget
        segments: list[tuple[_Running, int]] = []
        # Decodes and unfinished prompts of running sequences, oldest first; when memory runs out,
        # the newest running sequence gives its blocks back and waits to be recomputed.
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(len(seq.tokens) - seq.computed, budget)
            while not cache.can_append(seq.seq_id, n) and running[-1] is not seq:
                self._preempt(running.pop(), waiting, result)
            if not cache.can_append(seq.seq_id, n):
                self._preempt(running.pop(), waiting, result)   # not even itself fits: wait
                break
            cache.append(seq.seq_id, n)
            segments.append((seq, n))
            budget -= n
            i += 1
        # Admission: a waiting request joins if the free blocks cover its first chunk (after the
        # blocks a prefix cache already holds), keeping a watermark for the running ones to grow.
        while waiting and len(running) < self.max_batch and budget > 0:
            seq = waiting[0]
            start = cache.prefix_hit(seq.tokens)
            n = min(len(seq.tokens) - start, budget)
            if not cache.can_allocate(seq.tokens, n, headroom=self.watermark * len(running)):
                break
            waiting.popleft()
            seq.seq_id = cache.allocate(seq.tokens, n)
            seq.computed = start
            result.cached_tokens += start
            running.append(seq)
            segments.append((seq, n))
            budget -= n
        return segments

    def _preempt(self, seq: _Running, waiting: deque[_Running], result: ServeResult) -> None:
        """Recomputation: drop the sequence's blocks; it keeps its tokens and starts over."""
        self.cache.free_sequence(seq.seq_id)
        seq.seq_id, seq.computed = None, 0
        waiting.appendleft(seq)
        result.preemptions += 1

    def _step(self, segments: list[tuple[_Running, int]], running: list[_Running],
              result: ServeResult, step: int) -> None:
        """One model call on the packed tokens of every segment; sample where a prompt is done."""
        if not segments:
            raise RuntimeError("the scheduler chose no token although requests are waiting")
        self.cache.select_packed([(seq.seq_id, n) for seq, n in segments])
        tokens = [t for seq, n in segments for t in seq.tokens[seq.computed:seq.computed + n]]
        with torch.no_grad():
            logits = self.model(torch.tensor([tokens], device=self.cache.device), self.cache)[0]
        result.steps += 1
        result.computed_tokens += len(tokens)
        end = 0
        for seq, n in segments:
            end += n
            seq.computed += n
            self.cache.remember_blocks(seq.seq_id, seq.tokens)
            if seq.computed < len(seq.tokens):
                continue                              # a prompt chunk: nothing to sample yet
            seq.tokens.append(int(logits[end - 1].argmax()))
            if len(seq.generated) == seq.request.max_new_tokens:
                rid = seq.request.id
                result.outputs[rid] = seq.generated
                result.finished_step[rid] = step
                reserved = self.cache.slots_reserved([seq.seq_id])
                result.kv_waste[rid] = 1 - self.cache.seq_length(seq.seq_id) / reserved
                self.cache.free_sequence(seq.seq_id)
                running.remove(seq)

    def _snapshot(self, step: int, running: list[_Running], waiting: deque[_Running],
                  segments: list[tuple[_Running, int]]) -> dict:
        return {"step": step,
                "tables": {s.request.id: self.cache.block_table(s.seq_id) for s in running},
                "lengths": {s.request.id: s.computed for s in running},
                "scheduled": {s.request.id: n for s, n in segments},
                "waiting": [s.request.id for s in waiting],
                "free_blocks": self.cache.num_free_blocks}
