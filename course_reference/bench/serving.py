"""Lab 4's benchmark: serving a stream of mixed-length requests with the shipped target model.

Two servers get the same KV memory, counted in token slots:

- ours: continuous batching (``ContinuousBatcher``) on a ``PagedKVCache`` of that many slots;
- peer: static padded batching (``serve_static``), each row of a contiguous cache reserving the
  longest request's length, with PyTorch's ``scaled_dot_product_attention`` over it.

Both decode greedily and produce the same tokens. The record holds the time ratio (medians of
interleaved rounds), throughput in generated tokens per second, model steps (a count that does
not depend on the machine), and the KV memory wasted per finished sequence by each cache, for
the block size used and for others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from course_reference.serving.paged_cache import PagedKVCache
from course_reference.serving.scheduler import ContinuousBatcher
from course_runtime.serving import (
    Request,
    ServeResult,
    request_stream,
    serve_static,
    static_batch_size,
)
from course_runtime.timing import device_name, measure_interleaved

from .harness import ratio_record

NUM_REQUESTS = 48
STATIC_ROWS = 4          # the KV budget: this many rows of the longest request
BLOCK_SIZE = 4
BLOCKS_PER_STEP = 32      # 128 keys a step: the longest requests (~250 tokens) in two


def paged_waste(requests: Sequence[Request], block_size: int) -> float:
    """Mean fraction of a finished sequence's slots holding no key, with blocks of block_size."""
    stored = np.array([r.max_len - 1 for r in requests])
    return float(np.mean(1 - stored / (block_size * np.ceil(stored / block_size))))


def contiguous_waste(requests: Sequence[Request], max_len: int) -> float:
    """The same for a contiguous cache that reserves max_len slots per sequence."""
    return float(np.mean([1 - (r.max_len - 1) / max_len for r in requests]))


def workload(model: torch.nn.Module, num_requests: int = NUM_REQUESTS, seed: int = 0
             ) -> tuple[list[Request], int, int]:
    """The request stream, the longest request, and the KV budget in token slots."""
    requests = request_stream(num_requests, model.config.vocab_size, seed=seed)
    max_len = max(r.max_len for r in requests)
    return requests, max_len, STATIC_ROWS * max_len


def serve_continuous(model: torch.nn.Module, requests: Sequence[Request], kv_slots: int,
                     block_size: int = BLOCK_SIZE, **kwargs: Any) -> ServeResult:
    cache = PagedKVCache.for_model(model, kv_slots // block_size, block_size,
                                   blocks_per_step=BLOCKS_PER_STEP)
    kwargs.setdefault("watermark", 1.0)
    return ContinuousBatcher(model, cache, **kwargs).run(requests)


def run(rounds: int = 30, model: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """The record for ``make bench``. Serving the stream takes seconds, so at most 3 rounds and
    no warm-up round (the first round's start-up costs are small beside a run of seconds)."""
    if model is None:
        from course_runtime.models import load

        model = load("target")
    requests, max_len, kv_slots = workload(model)
    results: dict[str, ServeResult] = {}

    def timer(name: str, serve: Any) -> Any:
        def once() -> float:
            results[name] = serve()
            return results[name].wall_s
        return once

    times = measure_interleaved({
        "continuous": timer("continuous", lambda: serve_continuous(model, requests, kv_slots)),
        "static": timer("static", lambda: serve_static(
            model, requests, batch_size=static_batch_size(kv_slots, max_len), max_len=max_len)),
    }, rounds=min(rounds, 3), warmup=0)
    ours, peer = results["continuous"], results["static"]
    if ours.outputs != peer.outputs:
        raise AssertionError("continuous and static batching generated different tokens")
    generated = ours.generated_tokens
    return [ratio_record(
        f"serve_{len(requests)}_mixed_requests_kv{kv_slots}", "continuous batching, paged KV",
        "static padded batching, contiguous KV (torch SDPA)", times["continuous"],
        times["static"], device=device_name(),
        tokens_per_s_ours=generated / float(np.median(times["continuous"])),
        tokens_per_s_peer=generated / float(np.median(times["static"])),
        throughput_ratio=float(np.median(times["static"]) / np.median(times["continuous"])),
        steps_ours=ours.steps, steps_peer=peer.steps, steps_ratio=peer.steps / ours.steps,
        preemptions=ours.preemptions, block_size=BLOCK_SIZE, kv_slots=kv_slots,
        kv_waste_paged=ours.mean_kv_waste, kv_waste_contiguous=peer.mean_kv_waste,
        kv_waste_paged_by_block_size={b: paged_waste(requests, b) for b in (1, 2, 4, 8, 16, 32)},
    )]
