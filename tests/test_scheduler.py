"""Continuous batching and static batching serve the same tokens as generation without a cache,
whatever the memory pressure (preemption), chunking or arrival pattern, and leak no block."""

from __future__ import annotations

import pytest
import torch

from course_reference.serving.paged_cache import PagedKVCache
from course_reference.serving.scheduler import ContinuousBatcher
from course_runtime.serving import (
    OutOfBlocks,
    Request,
    request_stream,
    serve_static,
    static_batch_size,
)
from tests.test_paged import StubGPT, greedy_without_cache

MODEL = StubGPT()
REQUESTS = request_stream(10, MODEL.config.vocab_size, seed=3, prompt_len=(2, 20),
                          output_len=(1, 16))
EXPECTED = {r.id: greedy_without_cache(MODEL, list(r.prompt), r.max_new_tokens)
            for r in REQUESTS}


def serve_continuous(num_blocks, block_size=4, requests=REQUESTS, **kwargs):
    cache = PagedKVCache.for_model(MODEL, num_blocks, block_size)
    result = ContinuousBatcher(MODEL, cache, **kwargs).run(requests)
    cache.check()
    assert cache.allocator.num_free == num_blocks and not cache.tables, "blocks leaked"
    return result


def test_stream_is_seeded_and_mixed():
    again = request_stream(10, MODEL.config.vocab_size, seed=3, prompt_len=(2, 20),
                           output_len=(1, 16))
    assert again == REQUESTS
    assert REQUESTS != request_stream(10, MODEL.config.vocab_size, seed=4, prompt_len=(2, 20),
                                      output_len=(1, 16))
    assert all(2 <= len(r.prompt) <= 20 and 1 <= r.max_new_tokens <= 16 for r in REQUESTS)
    assert len({r.max_len for r in REQUESTS}) > 5, "lengths should be mixed"


def test_continuous_batching_equals_generation_without_cache():
    result = serve_continuous(num_blocks=200)
    assert result.outputs == EXPECTED
    assert result.preemptions == 0
    # Everything fits at once: one prefill step, then as many steps as the longest output.
    assert result.steps == max(r.max_new_tokens for r in REQUESTS)


def test_preemption_and_recomputation_give_the_same_tokens():
    result = serve_continuous(num_blocks=12)
    assert result.preemptions > 0, "the cache was meant to be too small for every request"
    assert result.outputs == EXPECTED


@pytest.mark.parametrize("token_budget", [1, 5, 16])
def test_chunked_prefill_gives_the_same_tokens(token_budget):
    result = serve_continuous(num_blocks=40, token_budget=token_budget)
    assert result.outputs == EXPECTED
    assert result.computed_tokens <= token_budget * result.steps


def test_requests_arriving_over_time():
    late = request_stream(8, MODEL.config.vocab_size, seed=5, prompt_len=(2, 12),
                          output_len=(1, 10), arrivals_per_step=0.3)
    assert len({r.arrival for r in late}) > 3
    result = serve_continuous(num_blocks=30, requests=late, max_batch=3)
    for r in late:
        assert result.outputs[r.id] == greedy_without_cache(MODEL, list(r.prompt),
                                                            r.max_new_tokens)
        assert result.finished_step[r.id] >= r.arrival + r.max_new_tokens - 1


def test_static_batching_gives_the_same_tokens_and_wastes_steps():
    max_len = max(r.max_len for r in REQUESTS)
    budget = 4 * max_len
    static = serve_static(MODEL, REQUESTS, batch_size=static_batch_size(budget, max_len))
    assert static.outputs == EXPECTED
    # The same KV memory as paged blocks: continuous batching needs fewer model steps.
    continuous = serve_continuous(num_blocks=budget // 4)
    assert continuous.steps < static.steps
    assert continuous.mean_kv_waste < static.mean_kv_waste


def test_kv_waste_is_under_one_block():
    result = serve_continuous(num_blocks=200, block_size=4)
    for r in REQUESTS:
        stored = r.max_len - 1
        assert result.kv_waste[r.id] == pytest.approx(1 - stored / (4 * -(-stored // 4)))


def test_a_request_larger_than_the_cache_is_refused():
    huge = [Request(0, tuple(range(1, 30)), 20)]
    with pytest.raises(ValueError, match="request 0 needs 49 tokens .13 blocks. but the whole "
                                         "cache has 12 blocks"):
        serve_continuous(num_blocks=12, requests=huge)


def test_trace_and_block_figures_show_every_block():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_runtime.viz.paged import (
        block_owners,
        block_table_explorer,
        draw_blocks,
        plot_occupancy,
    )

    cache = PagedKVCache.for_model(MODEL, 12, 4)
    result = ContinuousBatcher(MODEL, cache).run(REQUESTS, trace=True)
    assert result.outputs == EXPECTED
    assert [s["step"] for s in result.trace] == list(range(result.steps))
    busiest = max(result.trace, key=lambda s: 12 - s["free_blocks"])
    owners, filled = block_owners(busiest, 12, 4)
    used = {b for table in busiest["tables"].values() for b in table}
    assert {b for b, o in enumerate(owners) if o} == used
    assert filled.sum() == sum(busiest["lengths"].values())
    figure = draw_blocks(busiest, 12, 4)
    pool, tables = figure.axes
    # One grey cell per physical block, plus one coloured fill per used block.
    assert len(pool.patches) == 12 + len([b for b in used if filled[b] > 0])
    assert len(tables.patches) == sum(len(t) for t in busiest["tables"].values())
    plot_occupancy(result.trace, 12)
    explorer = block_table_explorer(result.trace, 12, 4)
    first = explorer.image.value
    explorer.slider.value = len(result.trace) // 2
    assert explorer.image.value != first
    plt.close("all")


def test_prefix_caching_reuses_blocks_and_changes_no_token():
    """Requests sharing a 17-token system prompt: with prefix caching every request after the
    first starts from the cached blocks of the prompt; tokens stay those of no cache at all."""
    system = tuple(range(1, 18))
    shared = [Request(i, system + tuple(r.prompt[:5]), r.max_new_tokens)
              for i, r in enumerate(REQUESTS)]
    expected = {r.id: greedy_without_cache(MODEL, list(r.prompt), r.max_new_tokens)
                for r in shared}
    plain = serve_continuous(num_blocks=60, requests=shared, max_batch=2)
    cache = PagedKVCache.for_model(MODEL, 60, 4, prefix_caching=True)
    cached = ContinuousBatcher(MODEL, cache, max_batch=2).run(shared)
    assert plain.outputs == expected and cached.outputs == expected
    # 16 of the 17 system-prompt tokens fill 4 blocks: each later request skips them.
    assert plain.cached_tokens == 0 and cached.cached_tokens >= 16 * (len(shared) - 2)
    assert cached.computed_tokens == plain.computed_tokens - cached.cached_tokens
    cache.check()
    assert cache.allocator.num_free == 60 and not cache.tables


def test_prefix_cache_forgets_overwritten_blocks():
    cache = PagedKVCache(1, 1, 2, num_blocks=2, block_size=2, prefix_caching=True)
    x = torch.randn(1, 1, 2, 2)
    a = cache.add_sequence_with_prefix([5, 6, 7])
    cache.select([a])
    cache.attend(0, x, x, x)
    cache.advance(2)
    cache.remember_blocks(a, [5, 6, 7])
    assert cache.cached_prefix([5, 6, 7]) == cache.tables[a].blocks
    cache.free_sequence(a)
    assert cache.cached_prefix([5, 6, 9]) != []          # freed, still findable
    b = cache.add_sequence()                             # a new sequence takes both blocks
    cache.select([b])
    cache.attend(0, torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2))
    cache.advance(4)
    assert cache.cached_prefix([5, 6, 7]) == [], "an overwritten block must leave the cache"


def test_a_fully_cached_prompt_still_computes_its_last_token():
    """The last prompt token's logits give the first new token, so it is never taken from the
    cache, even when the whole prompt fills cached blocks."""
    prompt = tuple(range(3, 11))                         # 8 tokens: 2 full blocks of 4
    twins = [Request(0, prompt, 5), Request(1, prompt, 5)]
    cache = PagedKVCache.for_model(MODEL, 10, 4, prefix_caching=True)
    result = ContinuousBatcher(MODEL, cache, max_batch=1).run(twins)
    expected = greedy_without_cache(MODEL, list(prompt), 5)
    assert result.outputs == {0: expected, 1: expected}
    assert result.cached_tokens == 4


def test_the_batcher_talks_to_the_cache_through_its_verbs_only():
    """The scheduler never reaches into the cache's allocator or block tables (nano-vllm's
    habit: a scheduler and a block manager that meet in a few verbs)."""
    import ast
    import inspect

    from course_reference.serving import scheduler

    reached = {node.attr for node in ast.walk(ast.parse(inspect.getsource(scheduler)))
               if isinstance(node, ast.Attribute)}
    assert not reached & {"allocator", "tables", "k", "v", "_segments"}, reached


def test_allocate_and_append_promise_blocks_until_the_step_takes_them():
    cache = PagedKVCache(1, 1, 2, num_blocks=4, block_size=2)
    assert cache.can_allocate([1, 2, 3], 3)
    a = cache.allocate([1, 2, 3], 3)                        # 2 blocks promised, none taken yet
    assert cache.num_free_blocks == 4 and cache.seq_length(a) == 0
    assert not cache.can_allocate([4, 5, 6, 7, 8], 5)       # 3 blocks, 2 left unpromised
    assert cache.can_allocate([4, 5, 6], 3)
    assert not cache.can_allocate([4, 5, 6], 3, headroom=1)
    b = cache.allocate([4], 1)
    with pytest.raises(OutOfBlocks, match="needed 2, 1 free of 4"):
        cache.allocate([5, 6, 7], 3)
    cache.free_sequence(b)                                  # its promise goes with it
    assert cache.can_append(a, 3) and not cache.can_append(a, 7)
    x = torch.randn(1, 1, 3, 2)
    cache.select_packed([(a, 3)])
    cache.attend(0, x, x, x)
    cache.advance(3)
    assert cache.num_free_blocks == 2 and cache.block_table(a) == [0, 1]
    assert cache.can_append(a, 1) and cache.can_allocate([9, 9, 9, 9], 4)   # promises spent
    cache.append(a, 1)                                      # room in its last block: no block
    assert cache.can_allocate([9, 9, 9, 9], 4)


def test_a_prefix_cache_hit_is_verified_against_the_block_tokens():
    from course_reference.serving.prefix_cache import PrefixCache

    index = PrefixCache(block_size=2)
    index.remember([7, 3], [1, 2, 3, 4])
    assert index.lookup([1, 2, 3, 4, 5]) == [7, 3]
    assert index.lookup([1, 2, 3, 4]) == [7]                # the last token is always computed
    assert index.lookup([1, 9, 3, 4, 5]) == []
    # A hash that collides (forged here) must not hand out another prefix's block.
    index._block_of_hash[index.block_hashes([5, 6])[0]] = 7
    assert index.lookup([5, 6, 0]) == []
    index.forget(7)
    assert index.lookup([1, 2, 3, 4, 5]) == []


def test_block_figures_draw_a_trace_recorded_by_a_cache():
    """A cache's own trace (the lab's LabPagedCache) has no waiting queue: the figure says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_runtime.viz.paged import draw_blocks

    snapshot = {"step": 3, "kind": "seq", "free_blocks": 2, "tables": {0: [1, 2], 4: [0]},
                "lengths": {0: 6, 4: 1}}
    pool, tables = draw_blocks(snapshot, 4, 4).axes
    assert tables.get_title() == "step 3: block tables of 2 running sequences"
    assert [t.get_text() for t in tables.texts][0] == "seq 0 (6 tok, +0)"
    assert len(pool.patches) == 4 + 3
    plt.close("all")
