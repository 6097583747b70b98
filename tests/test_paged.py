"""The paged KV cache: attention through block tables equals dense attention, generation on it
equals generation without a cache, and the allocator keeps its books under random programs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch.nn import functional as F  # noqa: N812

from course_reference.serving.allocator import BlockAllocator
from course_reference.serving.attention import attention_plan, paged_attention
from course_reference.serving.paged_cache import PagedKVCache
from course_runtime.serving import OutOfBlocks, blocks_for

# --------------------------------------------------------------------------------------------
# A small RoPE decoder that speaks the KV-cache protocol (random weights, float64 by default)
# --------------------------------------------------------------------------------------------


@dataclass
class StubConfig:
    vocab_size: int = 61
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    max_seq_len: int = 256


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, H, T, Dh] at positions pos [B, T]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=x.dtype) / half))
    angle = pos[:, None, :, None].to(x.dtype) * freq
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class StubGPT(torch.nn.Module):
    """Pre-norm decoder with RoPE and tied embeddings; attention goes through ``cache.attend``."""

    def __init__(self, config: StubConfig | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.config = c = config or StubConfig()
        self.embed = torch.nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = torch.nn.ModuleList()
        for _ in range(c.n_layers):
            self.blocks.append(torch.nn.ModuleDict({
                "ln1": torch.nn.LayerNorm(c.d_model),
                "qkv": torch.nn.Linear(c.d_model, 3 * c.d_model),
                "proj": torch.nn.Linear(c.d_model, c.d_model),
                "ln2": torch.nn.LayerNorm(c.d_model),
                "up": torch.nn.Linear(c.d_model, 4 * c.d_model),
                "down": torch.nn.Linear(4 * c.d_model, c.d_model)}))
        self.ln_f = torch.nn.LayerNorm(c.d_model)
        self.to(dtype)

    def forward(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        B, T = tokens.shape
        H, Dh = self.config.n_heads, self.config.d_model // self.config.n_heads
        pos = torch.arange(T).expand(B, T) if cache is None else cache.positions(T)
        x = self.embed(tokens)
        for layer, blk in enumerate(self.blocks):
            q, k, v = blk["qkv"](blk["ln1"](x)).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
            q, k = rope(q, pos), rope(k, pos)
            if cache is None:
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = cache.attend(layer, q, k, v)
            x = x + blk["proj"](att.transpose(1, 2).reshape(B, T, H * Dh))
            x = x + blk["down"](F.gelu(blk["up"](blk["ln2"](x))))
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x) @ self.embed.weight.T


def greedy_without_cache(model: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    """The oracle: rerun the whole sequence every step, no cache at all."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


# --------------------------------------------------------------------------------------------
# Paged attention against dense attention
# --------------------------------------------------------------------------------------------


def dense_reference(q, k_seq, v_seq, context_len):
    """Causal attention of the last n queries over the first context_len keys, by SDPA."""
    n = q.shape[2]
    q_pos = torch.arange(context_len - n, context_len)[:, None]
    mask = torch.arange(context_len)[None, :] <= q_pos
    return F.scaled_dot_product_attention(q, k_seq[None], v_seq[None], attn_mask=mask)


@pytest.mark.parametrize("seed", range(6))
def test_paged_attention_equals_dense_on_scattered_poisoned_blocks(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, Dh = 3, 2, 8
    block_size = [1, 3, 4, 16][seed % 4]
    n = [1, 1, 5, 2, 7, 1][seed]
    lens = torch.randint(n, 40, (B,), generator=g)
    per_seq = [blocks_for(int(L), block_size) for L in lens]
    num_blocks = sum(per_seq) + 5
    # Every slot starts as NaN: a read of an unused slot or an unused block shows up in the output.
    k_blocks = torch.full((H, num_blocks, block_size, Dh), math.nan, dtype=torch.float64)
    v_blocks = k_blocks.clone()
    order = torch.randperm(num_blocks, generator=g).tolist()   # scattered, not contiguous
    tables = torch.zeros(B, max(per_seq) + 2, dtype=torch.long)
    q = torch.randn(B, H, n, Dh, generator=g, dtype=torch.float64)
    expected = []
    for b in range(B):
        L = int(lens[b])
        blocks = [order.pop() for _ in range(per_seq[b])]
        tables[b, :len(blocks)] = torch.tensor(blocks)
        k_seq = torch.randn(H, L, Dh, generator=g, dtype=torch.float64)
        v_seq = torch.randn(H, L, Dh, generator=g, dtype=torch.float64)
        for p in range(L):
            k_blocks[:, blocks[p // block_size], p % block_size] = k_seq[:, p]
            v_blocks[:, blocks[p // block_size], p % block_size] = v_seq[:, p]
        expected.append(dense_reference(q[b:b + 1], k_seq, v_seq, L))
    for blocks_per_step in (1, 3):
        got = paged_attention(q, k_blocks, v_blocks, tables, lens, blocks_per_step=blocks_per_step)
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-10, atol=1e-10)


def test_paged_attention_rejects_mismatched_shapes():
    q = torch.randn(2, 2, 1, 4)
    blocks = torch.zeros(2, 4, 2, 4)
    with pytest.raises(ValueError, match="batch 2"):
        paged_attention(q, blocks, blocks, torch.zeros(3, 2, dtype=torch.long),
                        torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="heads"):
        paged_attention(q, blocks[..., :3], blocks[..., :3], torch.zeros(2, 2, dtype=torch.long),
                        torch.tensor([1, 1]))


# --------------------------------------------------------------------------------------------
# Generation through the cache
# --------------------------------------------------------------------------------------------


def greedy_with_paged_cache(model, prompts, max_new, block_size=4, num_blocks=64, poison=False):
    cache = PagedKVCache.for_model(model, num_blocks, block_size, batch_size=len(prompts))
    if poison:
        # Storage no sequence has written yet holds NaN: reading it would show in the logits.
        cache.k.fill_(math.nan)
        cache.v.fill_(math.nan)
    ids = [s for s, _ in cache._segments]
    outs = [[] for _ in prompts]
    with torch.no_grad():
        # Prompts of different lengths: prefill each sequence alone (rows of one), then decode
        # all of them together as rows of one batch.
        for s, prompt in zip(ids, prompts):
            cache.select([s])
            logits = model(torch.tensor([prompt]), cache)
            outs[s].append(int(logits[0, -1].argmax()))
        cache.select(ids)
        for _ in range(max_new - 1):
            logits = model(torch.tensor([[o[-1]] for o in outs]), cache)
            for o, row in zip(outs, logits[:, -1]):
                o.append(int(row.argmax()))
    return outs, cache


def test_generation_with_paged_cache_equals_no_cache():
    model = StubGPT()
    prompts = [[1, 2, 3, 4, 5], [7] * 11, [3, 9]]
    outs, cache = greedy_with_paged_cache(model, prompts, max_new=12, poison=True)
    for prompt, out in zip(prompts, outs):
        assert out == greedy_without_cache(model, prompt, 12)
    cache.check()
    for s in list(cache.tables):
        cache.free_sequence(s)
    assert cache.allocator.num_free == cache.allocator.num_blocks


def test_packed_step_equals_rows():
    """Orca-style packing (prefill chunks and decode tokens in one row) changes no logit."""
    model = StubGPT()
    paged = PagedKVCache.for_model(model, 32, 4)
    a, b, c = paged.add_sequence(), paged.add_sequence(), paged.add_sequence()
    with torch.no_grad():
        paged.select([a])
        model(torch.tensor([[5, 6, 7, 8, 9, 10]]), paged)
        paged.select([b])
        model(torch.tensor([[1, 2, 3]]), paged)
        # One packed call: a decodes one token, c prefills 4, b decodes one.
        paged.select_packed([(a, 1), (c, 4), (b, 1)])
        packed = model(torch.tensor([[11, 20, 21, 22, 23, 4]]), paged)[0]
    expected = [model(torch.tensor([seq]))[0, -1] for seq in
                ([5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23], [1, 2, 3, 4])]
    for got, want in zip(packed[[0, 4, 5]], expected):
        torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-9)
    # A second packed call: c's next chunk reads its first one back through the cache, between
    # two decodes; a, the longest, comes last, so the cache reorders the decode rows.
    with torch.no_grad():
        paged.select_packed([(b, 1), (c, 3), (a, 1)])
        packed = model(torch.tensor([[6, 24, 25, 26, 12]]), paged)[0]
    expected = [model(torch.tensor([seq]))[0, -1] for seq in
                ([1, 2, 3, 4, 6], [20, 21, 22, 23, 24, 25, 26], [5, 6, 7, 8, 9, 10, 11, 12])]
    for got, want in zip(packed[[0, 3, 4]], expected):
        torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-9)
    paged.check()


def test_plan_steps_skip_rows_with_nothing_to_read():
    """Rows sorted longest first: step j reads only the rows whose keys reach it."""
    lens = torch.tensor([23, 12, 9, 2])
    tables = torch.arange(4 * 6).view(4, 6)
    plan = attention_plan(tables, lens, 1, block_size=4, blocks_per_step=2)
    # Keys 0-7 for every row, 8-15 for the first three, 16-23 for the first alone.
    assert [tuple(b.shape) for b in plan.blocks] == [(4, 2), (3, 2), (1, 2)]
    # Unsorted rows: a step keeps every row up to the last one that reaches it.
    plan = attention_plan(tables[[3, 0, 2, 1]], lens[[3, 0, 2, 1]], 1, 4, 2)
    assert [b.shape[0] for b in plan.blocks] == [4, 4, 2]


def test_fork_copies_on_write_and_shares_until_then():
    model = StubGPT()
    cache = PagedKVCache.for_model(model, 16, 4)
    parent = cache.add_sequence()
    prompt = [4, 8, 15, 16, 23, 42]          # 1.5 blocks: the second block is half full
    with torch.no_grad():
        cache.select([parent])
        model(torch.tensor([prompt]), cache)
        child = cache.fork(parent)
        assert cache.tables[child].blocks == cache.tables[parent].blocks
        assert cache.allocator.num_free == 16 - 2
        # The child writes into the shared, half-full block: it gets its own copy.
        cache.select([child])
        child_logits = model(torch.tensor([[1]]), cache)
        cache.select([parent])
        parent_logits = model(torch.tensor([[2]]), cache)
    assert cache.tables[child].blocks[0] == cache.tables[parent].blocks[0]    # full block shared
    assert cache.tables[child].blocks[1] != cache.tables[parent].blocks[1]
    torch.testing.assert_close(child_logits[0, -1], model(torch.tensor([prompt + [1]]))[0, -1]
                               .detach())
    torch.testing.assert_close(parent_logits[0, -1], model(torch.tensor([prompt + [2]]))[0, -1]
                               .detach())
    cache.check()
    cache.free_sequence(child)
    cache.free_sequence(parent)
    assert cache.allocator.num_free == 16


def test_out_of_blocks_is_typed_and_changes_nothing():
    cache = PagedKVCache(1, 1, 2, num_blocks=3, block_size=2)
    a = cache.add_sequence()
    x = torch.randn(1, 1, 4, 2)
    cache.select([a])
    cache.attend(0, x, x, x)
    cache.advance(4)
    b = cache.add_sequence()
    cache.select([b])
    with pytest.raises(OutOfBlocks, match="needed 2, 1 free of 3") as err:
        cache.attend(0, x[:, :, :3], x[:, :, :3], x[:, :, :3])
    assert err.value.needed == 2 and err.value.free == 1
    assert cache.tables[b].blocks == [] and cache.allocator.num_free == 1
    cache.check()


def test_bad_calls_are_named():
    cache = PagedKVCache(1, 2, 4, num_blocks=4, block_size=2, batch_size=2)
    x = torch.randn(3, 2, 1, 4)
    with pytest.raises(ValueError, match="3 rows but 2 sequences"):
        cache.attend(0, x, x, x)
    with pytest.raises(ValueError, match=r"\[B, 2, n, 4\]"):
        cache.attend(0, x[:2, :1], x[:2, :1], x[:2, :1])
    with pytest.raises(KeyError, match="no sequence 9"):
        cache.fork(9)
    with pytest.raises(ValueError, match="double free"):
        allocator = BlockAllocator(2, 1)
        b = allocator.allocate()
        allocator.free(b)
        allocator.free(b)


# --------------------------------------------------------------------------------------------
# The allocator under random programs of allocate / append / fork / truncate / free
# --------------------------------------------------------------------------------------------


class CacheMachine(RuleBasedStateMachine):
    """Random programs against a shadow model: each sequence's tokens as a plain list of vectors.

    After every step the cache's books must balance (``check``), and reading any sequence back
    through its block table must give exactly its shadow: so a fork that forgot to copy on write,
    a wrong slot, or a block freed while still in use all show up as wrong data.
    """

    BLOCKS, SIZE = 12, 3

    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(1, 1, 1, num_blocks=self.BLOCKS, block_size=self.SIZE,
                                  dtype=torch.float64)
        self.shadow: dict[int, list[float]] = {}
        self.counter = 0.0

    @rule()
    def add(self):
        self.shadow[self.cache.add_sequence()] = []

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), n=st.integers(1, 7))
    def append(self, data, n):
        s = data.draw(st.sampled_from(sorted(self.shadow)))
        values = [self.counter + i for i in range(n)]
        self.counter += n
        x = torch.tensor(values, dtype=torch.float64).view(1, 1, n, 1)
        self.cache.select([s])
        free_before = self.cache.allocator.num_free
        if self.cache.blocks_needed(s, n) > free_before:
            with pytest.raises(OutOfBlocks):
                self.cache.attend(0, x, x, x)
            assert self.cache.allocator.num_free == free_before
            return
        self.cache.attend(0, x, x, x)
        self.cache.advance(n)
        self.shadow[s] += values
        assert free_before - self.cache.allocator.num_free <= blocks_for(n, self.SIZE) + 1

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def fork(self, data):
        s = data.draw(st.sampled_from(sorted(self.shadow)))
        self.shadow[self.cache.fork(s)] = list(self.shadow[s])

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def truncate(self, data):
        s = data.draw(st.sampled_from(sorted(self.shadow)))
        length = data.draw(st.integers(0, len(self.shadow[s])))
        self.cache.truncate_sequence(s, length)
        del self.shadow[s][length:]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(sorted(self.shadow)))
        self.cache.free_sequence(s)
        del self.shadow[s]

    @invariant()
    def books_balance_and_data_reads_back(self):
        self.cache.check()
        for s, values in self.shadow.items():
            table = self.cache.tables[s]
            stored = [float(self.cache.k[0, 0, table.blocks[p // self.SIZE], p % self.SIZE, 0])
                      for p in range(len(values))]
            assert stored == values, f"sequence {s}: {stored} != {values}"

    def teardown(self):
        for s in list(self.shadow):
            self.cache.free_sequence(s)
        assert self.cache.allocator.num_free == self.BLOCKS, "blocks leaked"
        self.cache.check()


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                     derandomize=True)


def test_shipped_target_generates_the_same_tokens_with_the_paged_cache():
    """The course's target GPT (float64, so no argmax can flip by rounding): greedy tokens
    through the paged cache, packed with other sequences, equal greedy tokens without a cache."""
    from course_reference.serving.scheduler import ContinuousBatcher
    from course_runtime.models import generate, load, load_tokenizer
    from course_runtime.serving import Request

    model = load("target").double()
    tokenizer = load_tokenizer()
    texts = ["Call me Ishmael. Some years ago", "The whale", "It is not down on any map; "]
    requests = [Request(i, tuple(tokenizer.encode(t)), 24) for i, t in enumerate(texts)]
    cache = PagedKVCache.for_model(model, num_blocks=20, block_size=4)
    result = ContinuousBatcher(model, cache, token_budget=16).run(requests)
    for r in requests:
        expected = generate(model, list(r.prompt), 24, cache=None)[0].tolist()
        assert result.outputs[r.id] == expected, tokenizer.decode(result.outputs[r.id])
    assert result.preemptions > 0, "20 blocks were meant to force a preemption"
    assert cache.allocator.num_free == 20
