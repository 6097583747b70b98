"""Serving a stream of requests: continuous batching on the paged cache, and the static baseline.

- ``ContinuousBatcher``: iteration-level scheduling (Yu et al., "Orca", OSDI 2022, section 4.1):
  after every model step, finished sequences leave and waiting ones join, so no row waits for the
  longest request of its batch. Requests are admitted when the paged cache has free blocks for
  them; when a running sequence needs a block and none is free, the newest sequence is
  preempted and later recomputed from its tokens (Kwon et al., "PagedAttention", SOSP 2023,
  section 4.5). With ``token_budget`` set, prompts are split into chunks that ride along with
  the decode tokens of the other sequences, so a long prompt never stalls them (Agrawal et al.,
  "Sarathi-Serve", OSDI 2024, section 4). On a cache with ``prefix_caching``, a prompt starts
  from the cached blocks of its longest known prefix. Every step is one model call on a packed
  row.
- ``serve_static``: the baseline Orca and vLLM improve on: fixed batches padded to their longest
  prompt, a contiguous cache that reserves the maximum length for every row, and a batch that
  runs until its longest request finishes.
- ``request_stream``: a seeded stream of requests with mixed prompt and output lengths.

Both servers decode greedily and return the same tokens for the same requests, which the tests
check against generation without any cache.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .paged import PagedKVCache, blocks_for


@dataclass(frozen=True)
class Request:
    """A prompt, how many tokens to generate, and the step at which the request arrives."""

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival: int = 0

    @property
    def max_len(self) -> int:
        return len(self.prompt) + self.max_new_tokens


def request_stream(num_requests: int, vocab_size: int, *, seed: int = 0,
                   prompt_len: tuple[int, int] = (4, 96), output_len: tuple[int, int] = (4, 160),
                   arrivals_per_step: float | None = None) -> list[Request]:
    """``num_requests`` requests with lengths drawn log-uniformly from the given ranges.

    Log-uniform lengths give many short requests and a long tail, the shape of real chat traces
    (ShareGPT, as used by the vLLM paper, section 6.1). With ``arrivals_per_step`` the requests
    arrive as a Poisson process on the step clock; without it they are all there at step 0.
    """
    rng = np.random.default_rng(seed)

    def lengths(low: int, high: int) -> np.ndarray:
        return np.floor(np.exp(rng.uniform(np.log(low), np.log(high + 1), num_requests))
                        ).astype(int)

    prompts, outputs = lengths(*prompt_len), lengths(*output_len)
    if arrivals_per_step:
        arrival = np.floor(np.cumsum(rng.exponential(1 / arrivals_per_step, num_requests)))
    else:
        arrival = np.zeros(num_requests)
    return [Request(i, tuple(int(t) for t in rng.integers(1, vocab_size, prompts[i])),
                    int(outputs[i]), int(arrival[i])) for i in range(num_requests)]


@dataclass
class ServeResult:
    """What a server produced and what it cost.

    ``steps`` counts model calls, the hardware-independent cost of the schedule;
    ``computed_tokens`` counts token positions the model processed, padding and recomputation
    included; ``cached_tokens`` those a prefix cache spared it; ``kv_waste`` is, per finished
    request, the fraction of the KV slots reserved for it that never held a token.
    """

    outputs: dict[int, list[int]]
    steps: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    wall_s: float = 0.0
    kv_waste: dict[int, float] = field(default_factory=dict)
    finished_step: dict[int, int] = field(default_factory=dict)
    trace: list[dict] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(len(o) for o in self.outputs.values())

    @property
    def mean_kv_waste(self) -> float:
        return float(np.mean(list(self.kv_waste.values())))


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
        capacity = self.cache.allocator.num_blocks
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
        reserved = 0
        # Decodes and unfinished prompts of running sequences, oldest first; when memory runs out,
        # the newest running sequence gives its blocks back and waits to be recomputed.
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(len(seq.tokens) - seq.computed, budget)
            need = cache.blocks_needed(seq.seq_id, n)
            while reserved + need > cache.allocator.num_free and running[-1] is not seq:
                self._preempt(running.pop(), waiting, result)
            if reserved + need > cache.allocator.num_free:
                self._preempt(running.pop(), waiting, result)   # not even itself fits: wait
                break
            segments.append((seq, n))
            reserved += need
            budget -= n
            i += 1
        # Admission: a waiting request joins if the free blocks cover its first chunk (less the
        # blocks a prefix cache already holds, plus the free ones among those, taken back).
        while waiting and len(running) < self.max_batch and budget > 0:
            seq = waiting[0]
            prefix = cache.cached_prefix(seq.tokens)
            start = len(prefix) * cache.block_size
            n = min(len(seq.tokens) - start, budget)
            need = (blocks_for(start + n, cache.block_size) - len(prefix)
                    + sum(1 for b in prefix if cache.allocator.ref_count(b) == 0))
            if reserved + need + self.watermark * len(running) > cache.allocator.num_free:
                break
            waiting.popleft()
            seq.seq_id = cache.add_sequence_with_prefix(seq.tokens)
            seq.computed = start
            result.cached_tokens += start
            running.append(seq)
            segments.append((seq, n))
            reserved += need
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
            logits = self.model(torch.tensor([tokens], device=self.cache.k.device), self.cache)[0]
        result.steps += 1
        result.computed_tokens += len(tokens)
        end = 0
        for seq, n in segments:
            end += n
            seq.computed += n
            if self.cache.prefix_caching:
                self.cache.remember_blocks(seq.seq_id, seq.tokens)
            if seq.computed < len(seq.tokens):
                continue                              # a prompt chunk: nothing to sample yet
            seq.tokens.append(int(logits[end - 1].argmax()))
            if len(seq.generated) == seq.request.max_new_tokens:
                rid = seq.request.id
                result.outputs[rid] = seq.generated
                result.finished_step[rid] = step
                reserved = len(self.cache.tables[seq.seq_id].blocks) * self.cache.block_size
                result.kv_waste[rid] = 1 - self.cache.seq_length(seq.seq_id) / reserved
                self.cache.free_sequence(seq.seq_id)
                running.remove(seq)

    def _snapshot(self, step: int, running: list[_Running], waiting: deque[_Running],
                  segments: list[tuple[_Running, int]]) -> dict:
        return {"step": step,
                "tables": {s.request.id: list(self.cache.tables[s.seq_id].blocks)
                           for s in running},
                "lengths": {s.request.id: s.computed for s in running},
                "scheduled": {s.request.id: n for s, n in segments},
                "waiting": [s.request.id for s in waiting],
                "free_blocks": self.cache.allocator.num_free}


# --------------------------------------------------------------------------------------------
# The baseline: static batches, padded, on a contiguous max-length cache
# --------------------------------------------------------------------------------------------


class ContiguousKVCache:
    """One contiguous ``max_len`` slab of keys and values per row, reserved whether used or not.

    Rows may take different numbers of real tokens in a call (``set_valid``); the rest of the row
    is padding, computed by the model and never stored.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, batch_size: int,
                 max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        shape = (num_layers, batch_size, max_len, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.valid = torch.zeros(batch_size, dtype=torch.long)

    def set_valid(self, counts: Sequence[int]) -> None:
        """Real (non-padding) tokens per row in the next model call."""
        self.valid = torch.tensor(counts, dtype=torch.long)
        ends = self.lengths + self.valid
        if bool((ends > self.max_len).any()):
            raise ValueError(f"contiguous cache: rows would hold {ends.tolist()} tokens, more "
                             f"than the {self.max_len} reserved")

    def positions(self, n_new: int) -> torch.Tensor:
        pos = self.lengths[:, None] + torch.arange(n_new)
        return pos.clamp(max=self.max_len - 1).to(self.k.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> torch.Tensor:
        B, H, n, Dh = q.shape
        for b in range(B):
            start, count = int(self.lengths[b]), int(self.valid[b])
            self.k[layer, b, start:start + count] = k[b, :, :count].transpose(0, 1)
            self.v[layer, b, start:start + count] = v[b, :, :count].transpose(0, 1)
        used = int((self.lengths + self.valid).max())
        keys = self.k[layer, :, :used].transpose(1, 2)                      # [B, H, used, Dh]
        values = self.v[layer, :, :used].transpose(1, 2)
        end = (self.lengths + self.valid).to(q.device)
        q_pos = self.lengths.to(q.device)[:, None] + torch.arange(n, device=q.device)
        k_pos = torch.arange(used, device=q.device)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :]
                                                               < end[:, None, None])
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values,
                                                                attn_mask=mask[:, None])

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    def advance(self, n_new: int) -> None:
        self.lengths += self.valid

    def truncate(self, length: int) -> None:
        self.lengths.clamp_(max=length)


def static_batch_size(kv_budget_tokens: int, max_len: int) -> int:
    """Rows a contiguous cache of ``kv_budget_tokens`` slots holds when each reserves max_len."""
    return max(kv_budget_tokens // max_len, 1)


def serve_static(model: torch.nn.Module, requests: Sequence[Request], *, batch_size: int,
                 max_len: int | None = None) -> ServeResult:
    """Static batching: ``batch_size`` requests at a time in arrival order, each batch prefilled
    together (padded to its longest prompt) and decoded until its longest request is done."""
    config = model.config
    param = next(model.parameters())
    max_len = max_len or max(r.max_len for r in requests)
    too_long = [r.id for r in requests if r.max_len > max_len]
    if too_long:
        raise ValueError(f"requests {too_long} need more than the {max_len} reserved tokens")
    result = ServeResult(outputs={})
    ordered = sorted(requests, key=lambda r: r.arrival)
    start = time.perf_counter()
    for first in range(0, len(ordered), batch_size):
        batch = ordered[first:first + batch_size]
        cache = ContiguousKVCache(config.n_layers, config.n_heads,
                                  config.d_model // config.n_heads, len(batch), max_len,
                                  dtype=param.dtype, device=param.device)
        width = max(len(r.prompt) for r in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for b, r in enumerate(batch):
            tokens[b, :len(r.prompt)] = torch.tensor(r.prompt)
        cache.set_valid([len(r.prompt) for r in batch])
        outs: list[list[int]] = [[] for _ in batch]
        with torch.no_grad():
            logits = model(tokens.to(param.device), cache)
            for b, r in enumerate(batch):
                outs[b].append(int(logits[b, len(r.prompt) - 1].argmax()))
            result.steps += 1
            result.computed_tokens += tokens.numel()
            for _ in range(max(r.max_new_tokens for r in batch) - 1):
                # Finished rows still ride along (padding): the batch is as slow as its longest.
                alive = [len(o) < r.max_new_tokens for o, r in zip(outs, batch)]
                cache.set_valid([int(a) for a in alive])
                logits = model(torch.tensor([[o[-1]] for o in outs], device=param.device), cache)
                for b, o in enumerate(outs):
                    if alive[b]:
                        o.append(int(logits[b, 0].argmax()))
                result.steps += 1
                result.computed_tokens += len(batch)
        for r, o in zip(batch, outs):
            result.outputs[r.id] = o
            result.finished_step[r.id] = result.steps - 1
            # The last token is sampled, never stored: max_len - 1 slots hold keys.
            result.kv_waste[r.id] = 1 - (r.max_len - 1) / max_len
    result.wall_s = time.perf_counter() - start
    return result
