"""A paged KV cache: fixed-size blocks, block tables, and attention that reads through them.

This is the memory manager of vLLM (Kwon et al., "Efficient Memory Management for Large Language
Model Serving with PagedAttention", SOSP 2023, sections 4.1-4.4), small enough to read in one go:

- ``BlockAllocator`` hands out physical blocks of ``block_size`` token slots from a free list and
  counts references, so that forked sequences (parallel sampling, a shared prompt) share blocks
  until one of them writes: copy-on-write (section 4.4).
- ``PagedKVCache`` keeps one block table per sequence (logical block i of a sequence lives in
  physical block ``table[i]``) and implements the course's KV-cache protocol (``positions``,
  ``attend``, ``advance``, ``truncate``), so the tiny GPT runs on it unchanged.
- ``paged_attention`` computes causal attention of new queries over a sequence's cached keys one
  block at a time with an online softmax (as FlashAttention and vLLM's kernel do), so the cache
  is never gathered into one dense tensor.

A sequence only ever holds ``ceil(tokens / block_size)`` blocks, so the memory it wastes is less
than one block, against a contiguous cache that reserves the maximum length up front.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F  # noqa: N812


class OutOfBlocks(RuntimeError):
    """The allocator has fewer free blocks than a request needs (the scheduler preempts on it)."""

    def __init__(self, needed: int, free: int, total: int):
        super().__init__(f"out of KV-cache blocks: needed {needed}, {free} free of {total}; "
                         "free finished sequences, preempt one, or make the cache larger")
        self.needed, self.free, self.total = needed, free, total


class BlockAllocator:
    """Physical blocks ``0 .. num_blocks-1``, a free list and a reference count per block.

    A block is free exactly when its count is zero. ``share`` adds a reference (a fork), ``free``
    drops one, and the block returns to the free list when the last reference goes.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got "
                             f"num_blocks={num_blocks}, block_size={block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Handed out least recently freed first: with prefix caching a free block keeps its
        # contents, and the ones freed last are the likeliest to be asked for again (LRU).
        self._free = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A free block, now with one reference (``OutOfBlocks`` when none is left)."""
        if not self._free:
            raise OutOfBlocks(1, 0, self.num_blocks)
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def take(self, block: int) -> None:
        """Allocate this particular free block (a cached prefix block being reused)."""
        if not 0 <= block < self.num_blocks or self._refs[block] != 0:
            raise ValueError(f"take: block {block} is not a free block")
        self._free.remove(block)
        self._refs[block] = 1

    def share(self, block: int) -> None:
        """One more sequence refers to ``block`` (a fork)."""
        self._check_live(block, "share")
        self._refs[block] += 1

    def free(self, block: int) -> None:
        """Drop one reference; the block is free again when none is left."""
        self._check_live(block, "free")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def _check_live(self, block: int, op: str) -> None:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"{op}: block {block} is not in 0..{self.num_blocks - 1}")
        if self._refs[block] == 0:
            raise ValueError(f"{op}: block {block} is free (a double free, or a block that was "
                             "never allocated)")

    def check(self) -> None:
        """Assert the allocator's invariants: every block is either free or referenced, once."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            assert (b in free) == (self._refs[b] == 0), (
                f"block {b}: ref count {self._refs[b]} but {'' if b in free else 'not '}free")


@dataclass
class BlockTable:
    """One sequence: its physical blocks in logical order and how many tokens it holds."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass
class AttentionPlan:
    """What ``paged_attention`` reads at each step, and which of it to mask: the same for every
    layer of a model step, so the cache computes it once per step and reuses it."""

    blocks: list[torch.Tensor]             # [m, g] physical block ids per step
    hidden: list[torch.Tensor | None]      # [m, n, g*bs]: key after the query, or past the end?
    unstored: list[torch.Tensor | None]    # [m, g*bs, 1]: slot past the sequence's end?
    # A step reads rows 0..m-1 only: the rows after the last one with a key in the step have
    # nothing to read there, so it skips them (rows sorted longest first skip the most).


def attention_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, n: int,
                   block_size: int, blocks_per_step: int = 1) -> AttentionPlan:
    """Split the block tables into steps of ``blocks_per_step`` blocks, with their masks
    (``None`` where nothing in the step needs masking)."""
    B = block_tables.shape[0]
    if block_tables.dim() != 2 or context_lens.shape != (B,):
        raise ValueError(f"paged_attention: block_tables of shape {tuple(block_tables.shape)} "
                         f"and context_lens of shape {tuple(context_lens.shape)} do not match")
    if bool((context_lens < n).any()):
        raise ValueError(f"paged_attention: every sequence must hold its {n} new keys, got "
                         f"context lengths {context_lens.tolist()}")
    if blocks_per_step < 1:
        raise ValueError(f"blocks_per_step must be at least 1, got {blocks_per_step}")
    num_blocks = blocks_for(int(context_lens.max()), block_size)
    if block_tables.shape[1] < num_blocks:
        raise ValueError(f"paged_attention: block_tables has {block_tables.shape[1]} columns, "
                         f"the longest sequence ({int(context_lens.max())} keys) needs "
                         f"{num_blocks}")
    device = block_tables.device
    context_lens = context_lens.to(device)
    q_pos = context_lens[:, None] - n + torch.arange(n, device=device)          # [B, n]
    plan = AttentionPlan([], [], [])
    lengths = context_lens.tolist()
    for j in range(0, num_blocks, blocks_per_step):
        first_key = j * block_size
        rows = 1 + max(b for b in range(B) if lengths[b] > first_key)
        block = block_tables[:rows, j:j + blocks_per_step]                      # [m, g]
        k_pos = first_key + torch.arange(block.shape[1] * block_size, device=device)
        visible = k_pos[None, None, :] <= q_pos[:rows, :, None]                 # [m, n, gbs]
        stored = (k_pos[None, :] < context_lens[:rows, None])[:, :, None]       # [m, gbs, 1]
        plan.blocks.append(block)
        plan.hidden.append(None if bool(visible.all()) else ~visible)
        plan.unstored.append(None if bool(stored.all()) else ~stored)
    return plan


def paged_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    scale: float | None = None, blocks_per_step: int = 1,
                    plan: AttentionPlan | None = None, unused_finite: bool = False
                    ) -> torch.Tensor:
    """Causal attention of new queries over keys stored in blocks, one block at a time.

    q: ``[B, H, n, Dh]``, the last ``n`` positions of each sequence (query i of row b sits at
    position ``context_lens[b] - n + i``). k_blocks, v_blocks: ``[H, num_blocks, block_size, Dh]``
    (one layer; head-major, so that gathered blocks are laid out for the matmul as they come).
    block_tables: ``[B, max_blocks]`` physical block ids (entries past a sequence's end are
    ignored). context_lens: ``[B]`` keys per sequence, new ones included.

    Each step gathers block j of every row (``[H, B, block_size, Dh]``) and folds it into a running
    max, denominator and weighted sum (the online softmax of Milakov and Gimelshein, 2018), so no
    more than one block per sequence is ever materialised. Slots past a sequence's length are
    masked in both scores and values, so whatever they hold (stale data, NaN) never leaks in.
    A GPU kernel gives each block to its own threads; on a CPU, where every step costs Python
    overhead, ``blocks_per_step`` folds several blocks per step (still never the whole cache).
    ``plan`` (from ``attention_plan``) skips recomputing the masks, the same for every layer.
    ``unused_finite=True`` promises that every slot read holds a finite number, so masked scores
    alone suffice (weight 0 times a finite value is 0) and the values need no mask: the
    ``PagedKVCache`` keeps that promise by zeroing blocks when it allocates them.
    """
    B, H, n, Dh = q.shape
    block_size = k_blocks.shape[2]
    if block_tables.shape[0] != B:
        raise ValueError(f"paged_attention: q has batch {B} but block_tables has shape "
                         f"{tuple(block_tables.shape)}")
    if k_blocks.dim() != 4 or (k_blocks.shape[0], k_blocks.shape[3]) != (H, Dh):
        raise ValueError(f"paged_attention: q has {H} heads of size {Dh} but the cache blocks "
                         f"have shape {tuple(k_blocks.shape)}")
    if plan is None:
        plan = attention_plan(block_tables.to(q.device), context_lens, n, block_size,
                              blocks_per_step)
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    # Work head-major, [H, B, ...]: gathering g blocks of every row from [H, num_blocks, bs, Dh]
    # gives [H, B, g, bs, Dh], whose last three axes flatten to [H, B, g*bs, Dh] without a copy.
    q = (q * scale).transpose(0, 1)                                             # [H, B, n, Dh]
    running_max = denominator = out = None
    for block, hidden, unstored in zip(plan.blocks, plan.hidden, plan.unstored):
        m, g = block.shape                 # the step reads rows 0..m-1 (see AttentionPlan)
        ids = block.flatten()
        k = k_blocks.index_select(1, ids).view(H, m, g * block_size, Dh)       # [H, m, gbs, Dh]
        v = v_blocks.index_select(1, ids).view(H, m, g * block_size, Dh)
        scores = q[:, :m] @ k.transpose(-1, -2)                                 # [H, m, n, gbs]
        if hidden is not None:
            scores = scores.masked_fill_(hidden, -math.inf)
        if unstored is not None and not unused_finite:
            v = v.masked_fill_(unstored, 0.0)     # v is a fresh copy: zero its unused slots
        if running_max is None:
            # The first step holds key 0, visible to every query: its max is finite, and there
            # is nothing yet to rescale (on a CPU every skipped operation is time saved).
            running_max = scores.amax(-1, keepdim=True)
            weights = torch.exp(scores.sub_(running_max))
            denominator = weights.sum(-1, keepdim=True)
            out = weights @ v
            continue
        # In place on the first m rows: the others have no key in this step.
        old_max = running_max[:, :m]
        new_max = torch.maximum(old_max, scores.amax(-1, keepdim=True))
        weights = torch.exp(scores.sub_(new_max))
        correction = torch.exp(old_max - new_max)
        denominator[:, :m].mul_(correction).add_(weights.sum(-1, keepdim=True))
        out[:, :m].mul_(correction).add_(weights @ v)
        old_max.copy_(new_max)
    if out is None:                    # no key at all: only possible with no query either
        return torch.zeros_like(q).transpose(0, 1)
    return out.div_(denominator).transpose(0, 1)


@dataclass
class _Step:
    """A model step's layout, fixed at its first layer: tokens per segment, whether the segment's
    sequence held nothing before (a prompt from scratch), and each new token's slot."""

    counts: list[int]
    fresh: list[bool]
    block: torch.Tensor                    # [tokens] physical block of each new token
    offset: torch.Tensor                   # [tokens] its slot in that block
    starts: list[int] = field(init=False)
    singles: list[int] = field(init=False)            # segments of one token (decodes)
    singles_span: tuple[int, int] | None = field(init=False)  # their tokens, if contiguous

    def __post_init__(self) -> None:
        self.starts = [0, *itertools.accumulate(self.counts)][:-1]
        self.singles = [i for i, c in enumerate(self.counts) if c == 1]
        first = self.singles[0] if self.singles else 0
        contiguous = self.singles == list(range(first, first + len(self.singles)))
        self.singles_span = ((self.starts[first], self.starts[first] + len(self.singles))
                             if self.singles and contiguous else None)


class PagedKVCache:
    """Keys and values of many sequences in shared physical blocks, one block table each.

    Storage is ``[num_layers, heads, num_blocks, block_size, head_dim]`` for keys and for values.
    Sequences are added, forked and freed by id. A model step runs on a *selection*:

    - ``select(ids)``: row b of the model's batch is sequence ``ids[b]`` (all rows get the same
      number of new tokens), the layout of a plain ``GPT.forward(tokens[B, T], cache)``;
    - ``select_packed([(id, n), ...])``: the model runs on one packed row ``tokens[1, sum n]`` in
      which each sequence contributes its own number of tokens (a prompt chunk, or one decode
      token). The matrix multiplies see every token at once and attention is split per sequence:
      Orca's selective batching (Yu et al., OSDI 2022, section 4.2).

    ``PagedKVCache(..., batch_size=B)`` adds and selects B sequences, a drop-in for a dense cache;
    ``blocks_per_step`` is passed to ``paged_attention``. ``prefix_caching=True`` keeps the
    contents of full blocks findable by a hash of their tokens and of every token before them,
    after their sequence is gone (vLLM's automatic prefix caching; SGLang's RadixAttention keeps
    a radix tree instead): a new sequence whose prompt starts the same way reuses those blocks.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, *, batch_size: int = 0, blocks_per_step: int = 1,
                 prefix_caching: bool = False, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.prefix_caching = prefix_caching
        self._block_of_hash: dict[int, int] = {}
        self._hash_of_block: dict[int, int] = {}
        self.blocks_per_step = blocks_per_step
        self.block_size = block_size
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        shape = (num_layers, num_heads, num_blocks, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tables: dict[int, BlockTable] = {}
        self._next_id = 0
        self._segments: list[tuple[int, int]] = []   # (sequence id, new tokens) of this step
        self._packed = False
        self._step: _Step | None = None
        self._plans: dict[tuple, tuple] = {}   # attention plans of this step, per group
        if batch_size:
            self.select([self.add_sequence() for _ in range(batch_size)])

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int = 16,
                  **kwargs: object) -> PagedKVCache:
        """A cache shaped for ``model`` (layers, heads, head size and dtype read from it)."""
        config = model.config
        head_dim = config.d_model // config.n_heads
        param = next(model.parameters())
        kwargs.setdefault("dtype", param.dtype)
        kwargs.setdefault("device", param.device)
        return cls(config.n_layers, config.n_heads, head_dim, num_blocks, block_size, **kwargs)

    # ---- sequences ------------------------------------------------------------------------

    def add_sequence(self, seq_id: int | None = None) -> int:
        """Start an empty sequence (it holds no block until it gets tokens)."""
        if seq_id is None:
            seq_id = self._next_id
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already exists")
        self._next_id = max(self._next_id, seq_id + 1)
        self.tables[seq_id] = BlockTable()
        return seq_id

    def fork(self, parent: int, child: int | None = None) -> int:
        """A new sequence with the same tokens as ``parent``, sharing its blocks (no copy yet)."""
        source = self._table(parent)
        child = self.add_sequence(child)
        for b in source.blocks:
            self.allocator.share(b)
        self.tables[child] = BlockTable(list(source.blocks), source.num_tokens)
        return child

    # ---- prefix caching -------------------------------------------------------------------

    def block_hashes(self, tokens: Sequence[int]) -> list[int]:
        """One hash per full block of ``tokens``, each covering the block and all before it."""
        hashes, previous = [], 0
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            previous = hash((previous, tuple(tokens[start:start + self.block_size])))
            hashes.append(previous)
        return hashes

    def cached_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Blocks holding the longest run of ``tokens``' leading full blocks, short of the last
        token (which must be computed, for its logits)."""
        if not self.prefix_caching:
            return []
        blocks = []
        for h in self.block_hashes(tokens[:-1]):
            if h not in self._block_of_hash:
                break
            blocks.append(self._block_of_hash[h])
        return blocks

    def add_sequence_with_prefix(self, tokens: Sequence[int]) -> int:
        """A new sequence that starts with the cached blocks of ``tokens``' prefix (live blocks
        shared, free ones taken back); it holds their tokens and computes only the rest."""
        blocks = self.cached_prefix(tokens)
        seq_id = self.add_sequence()
        for b in blocks:
            if self.allocator.ref_count(b):
                self.allocator.share(b)
            else:
                self.allocator.take(b)
        self.tables[seq_id] = BlockTable(blocks, len(blocks) * self.block_size)
        return seq_id

    def remember_blocks(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Make the full blocks of ``seq_id`` (whose first tokens are ``tokens``) findable."""
        table = self._table(seq_id)
        held = min(len(tokens), table.num_tokens)
        for block, h in zip(table.blocks, self.block_hashes(tokens[:held])):
            if h not in self._block_of_hash and block not in self._hash_of_block:
                self._block_of_hash[h] = block
                self._hash_of_block[block] = h

    def _forget(self, block: int) -> None:
        """A block about to be overwritten no longer holds what its hash says."""
        h = self._hash_of_block.pop(block, None)
        if h is not None:
            del self._block_of_hash[h]

    def free_sequence(self, seq_id: int) -> None:
        """Drop a finished (or preempted) sequence and release its references to its blocks."""
        for b in self._table(seq_id).blocks:
            self.allocator.free(b)
        del self.tables[seq_id]
        self._segments = [(s, n) for s, n in self._segments if s != seq_id]
        self._step, self._plans = None, {}

    def seq_length(self, seq_id: int) -> int:
        return self._table(seq_id).num_tokens

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held by each selected sequence: ``[B]`` (``[number of segments]`` if packed)."""
        return torch.tensor([self.tables[s].num_tokens for s, _ in self._segments],
                            dtype=torch.long)

    @property
    def length(self) -> int:
        """Tokens held per selected sequence, when they all hold the same number."""
        lengths = set(self.lengths.tolist())
        if len(lengths) != 1:
            raise ValueError(f"the selected sequences hold different numbers of tokens "
                             f"({sorted(lengths)}): use `lengths`")
        return lengths.pop()

    def blocks_needed(self, seq_id: int | None, num_new: int) -> int:
        """Blocks that appending ``num_new`` tokens to ``seq_id`` (None: a new sequence) takes
        from the free list, copy-on-write copies of shared blocks included."""
        if seq_id is None:
            return blocks_for(num_new, self.block_size)
        table = self._table(seq_id)
        end = table.num_tokens + num_new
        fresh = blocks_for(end, self.block_size) - len(table.blocks)
        first = table.num_tokens // self.block_size
        copies = sum(1 for b in table.blocks[first:blocks_for(end, self.block_size)]
                     if self.allocator.ref_count(b) > 1)
        return max(fresh, 0) + copies

    def _table(self, seq_id: int) -> BlockTable:
        try:
            return self.tables[seq_id]
        except KeyError:
            raise KeyError(f"no sequence {seq_id} in the cache (live: {sorted(self.tables)})"
                           ) from None

    # ---- selection ------------------------------------------------------------------------

    def select(self, seq_ids: Sequence[int]) -> None:
        """Row b of the next model calls is sequence ``seq_ids[b]``."""
        for s in seq_ids:
            self._table(s)
        self._segments = [(s, -1) for s in seq_ids]
        self._packed = False
        self._step, self._plans = None, {}

    def select_packed(self, segments: Sequence[tuple[int, int]]) -> None:
        """The next model call is one packed row: ``n`` tokens of each ``(seq_id, n)`` in order."""
        for s, n in segments:
            self._table(s)
            if n < 1:
                raise ValueError(f"sequence {s}: a packed segment needs at least one token, "
                                 f"got {n}")
        if len({s for s, _ in segments}) != len(segments):
            raise ValueError(f"a sequence appears twice in one packed step: {list(segments)}")
        self._segments = list(segments)
        self._packed = True
        self._step, self._plans = None, {}

    def _new_tokens(self, n_new: int, B: int) -> list[int]:
        """Tokens per selected sequence for a model call of ``B`` rows of ``n_new`` tokens."""
        if not self._segments:
            raise RuntimeError("no sequence selected: call select() or select_packed() first")
        if self._packed:
            counts = [n for _, n in self._segments]
            if B != 1 or n_new != sum(counts):
                raise ValueError(f"packed step expects tokens of shape [1, {sum(counts)}] "
                                 f"(segments {self._segments}), got [{B}, {n_new}]")
            return counts
        if B != len(self._segments):
            raise ValueError(f"the model's batch has {B} rows but {len(self._segments)} "
                             "sequences are selected")
        return [n_new] * B

    # ---- the KV-cache protocol ------------------------------------------------------------

    def positions(self, n_new: int) -> torch.Tensor:
        """Absolute positions of the next tokens: ``[B, n_new]``, or ``[1, sum n]`` when packed."""
        B = 1 if self._packed else len(self._segments)
        counts = self._new_tokens(n_new, B)
        rows = [torch.arange(self.seq_length(s), self.seq_length(s) + c)
                for (s, _), c in zip(self._segments, counts)]
        pos = torch.cat(rows)[None] if self._packed else torch.stack(rows)
        return pos.to(self.k.device)

    def _prepare(self, n_new: int, B: int) -> _Step:
        """Reserve slots for this step's tokens (allocating and copying on write) and index them.

        Done once per step, at the first layer; all or nothing, so a step that runs out of blocks
        leaves every table as it was.
        """
        if self._step is not None:
            return self._step
        counts = self._new_tokens(n_new, B)
        needed = sum(self.blocks_needed(s, c) for (s, _), c in zip(self._segments, counts))
        if needed > self.allocator.num_free:
            raise OutOfBlocks(needed, self.allocator.num_free, self.allocator.num_blocks)
        bs = self.block_size
        block_ids: list[int] = []
        offsets: list[int] = []
        fresh: list[bool] = []
        for (s, _), c in zip(self._segments, counts):
            table = self.tables[s]
            end = table.num_tokens + c
            for i in range(table.num_tokens // bs, blocks_for(end, bs)):
                if i == len(table.blocks):
                    table.blocks.append(self.allocator.allocate())
                    self._forget(table.blocks[-1])
                    # Whatever the block held before (another sequence's keys, or nothing
                    # yet) becomes zeros, so reads of its unused slots are finite.
                    self.k[:, :, table.blocks[-1]] = 0
                    self.v[:, :, table.blocks[-1]] = 0
                elif self.allocator.ref_count(table.blocks[i]) > 1:
                    table.blocks[i] = self._copy_on_write(table.blocks[i])
            # Plain Python here: one tensor per step below, not one per sequence.
            block_ids += [table.blocks[p // bs] for p in range(table.num_tokens, end)]
            offsets += [p % bs for p in range(table.num_tokens, end)]
            fresh.append(table.num_tokens == 0)
        device = self.k.device
        self._step = _Step(counts, fresh, torch.tensor(block_ids, device=device),
                           torch.tensor(offsets, device=device))
        return self._step

    def _copy_on_write(self, block: int) -> int:
        """A private copy of a shared block (all layers); the sharers keep the original."""
        copy = self.allocator.allocate()
        self._forget(copy)
        self.k[:, :, copy] = self.k[:, :, block]
        self.v[:, :, copy] = self.v[:, :, block]
        self.allocator.free(block)
        return copy

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> torch.Tensor:
        """Store this layer's new keys and values in their slots, then attend through the tables."""
        B, H, n_new, Dh = q.shape
        if k.shape != q.shape or v.shape != q.shape or (H, Dh) != (self.num_heads, self.head_dim):
            raise ValueError(f"attend: expected q, k, v of shape [B, {self.num_heads}, n, "
                             f"{self.head_dim}], got {tuple(q.shape)}, {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")
        step = self._prepare(n_new, B)
        # [B, H, n, Dh] -> one row of [H, Dh] per new token, in segment order.
        flat_k = k.transpose(1, 2).reshape(-1, H, Dh)
        flat_v = v.transpose(1, 2).reshape(-1, H, Dh)
        self.k[layer][:, step.block, step.offset] = flat_k.transpose(0, 1).to(self.k.dtype)
        self.v[layer][:, step.block, step.offset] = flat_v.transpose(0, 1).to(self.v.dtype)
        if not self._packed:
            if all(step.fresh):
                # A prompt from scratch: its keys are exactly the new ones, already at hand, so
                # attention is plain causal attention over them (the cache is not read back).
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self._attend_rows(layer, q, [s for s, _ in self._segments], n_new)
        # Packed: decode tokens (one each) attend together; each prompt chunk on its own.
        out = torch.empty_like(q)
        if step.singles:
            if step.singles_span is not None:    # usual case: the decodes come first, in a run
                lo, hi = step.singles_span
                rows = q[0, :, lo:hi].transpose(0, 1)[:, :, None]              # [m, H, 1, Dh]
            else:
                index = torch.tensor([step.starts[i] for i in step.singles], device=q.device)
                rows = q[0][:, index].transpose(0, 1)[:, :, None]
            seqs = [self._segments[i][0] for i in step.singles]
            att = self._attend_rows(layer, rows, seqs, 1)[:, :, 0].transpose(0, 1)
            if step.singles_span is not None:
                out[0, :, lo:hi] = att
            else:
                out[0][:, index] = att
        for i, c in enumerate(step.counts):
            if c > 1:
                span = slice(step.starts[i], step.starts[i] + c)
                if step.fresh[i]:
                    out[:, :, span] = F.scaled_dot_product_attention(
                        q[:, :, span], k[:, :, span], v[:, :, span], is_causal=True)
                else:
                    out[:, :, span] = self._attend_rows(layer, q[:, :, span],
                                                        [self._segments[i][0]], c)
        return out

    def _attend_rows(self, layer: int, q: torch.Tensor, seq_ids: list[int], n_new: int
                     ) -> torch.Tensor:
        key = ("plan", *seq_ids)
        if key not in self._plans:      # once per step: every layer reads the same blocks
            # Longest first, so that each step of the plan reads only the rows that reach it.
            order = sorted(range(len(seq_ids)), key=lambda b: -self.tables[seq_ids[b]].num_tokens)
            permute = (None if order == list(range(len(seq_ids)))
                       else torch.tensor(order, device=q.device))
            seq_ids = [seq_ids[b] for b in order]
            tables = [self.tables[s].blocks for s in seq_ids]
            width = max(len(t) for t in tables)
            # Pad with the row's own first block: a real block, so its slots are finite.
            block_tables = torch.tensor([t + t[:1] * (width - len(t)) for t in tables],
                                        device=q.device)
            context = torch.tensor([self.tables[s].num_tokens + n_new for s in seq_ids],
                                   device=q.device)
            self._plans[key] = (permute, block_tables, context, attention_plan(
                block_tables, context, n_new, self.block_size, self.blocks_per_step))
        permute, block_tables, context, plan = self._plans[key]
        if permute is None:
            return paged_attention(q, self.k[layer], self.v[layer], block_tables, context,
                                   plan=plan, unused_finite=True).to(q.dtype)
        out = paged_attention(q.index_select(0, permute), self.k[layer], self.v[layer],
                              block_tables, context, plan=plan, unused_finite=True)
        return torch.empty_like(q).index_copy_(0, permute, out.to(q.dtype))

    def advance(self, n_new: int) -> None:
        """Commit the step's tokens (after every layer has stored its keys and values)."""
        if self._step is None:
            raise RuntimeError("advance() before any attend(): nothing was stored this step")
        B = 1 if self._packed else len(self._segments)
        counts = self._new_tokens(n_new, B)
        for (s, _), c in zip(self._segments, counts):
            self.tables[s].num_tokens += c
        self._step, self._plans = None, {}

    def truncate(self, length: int | Sequence[int]) -> None:
        """Roll the selected sequences back to ``length`` tokens (one per sequence, or one for
        all), returning blocks they no longer need."""
        lengths = [length] * len(self._segments) if isinstance(length, int) else list(length)
        if len(lengths) != len(self._segments):
            raise ValueError(f"truncate: {len(lengths)} lengths for {len(self._segments)} "
                             "selected sequences")
        for (s, _), new_len in zip(self._segments, lengths):
            self.truncate_sequence(s, new_len)

    def truncate_sequence(self, seq_id: int, length: int) -> None:
        table = self._table(seq_id)
        if not 0 <= length <= table.num_tokens:
            raise ValueError(f"truncate: sequence {seq_id} holds {table.num_tokens} tokens, "
                             f"cannot roll back to {length}")
        keep = blocks_for(length, self.block_size)
        for b in table.blocks[keep:]:
            self.allocator.free(b)
        del table.blocks[keep:]
        if length % self.block_size and self.allocator.ref_count(table.blocks[-1]) == 1:
            self._forget(table.blocks[-1])     # its tail will be overwritten in place
        table.num_tokens = length
        self._step, self._plans = None, {}

    # ---- accounting -----------------------------------------------------------------------

    def slots_reserved(self, seq_ids: Iterable[int] | None = None) -> int:
        """Token slots held by blocks of these sequences (shared blocks counted once)."""
        ids = self.tables if seq_ids is None else seq_ids
        return len({b for s in ids for b in self.tables[s].blocks}) * self.block_size

    def check(self) -> None:
        """Assert that block tables and reference counts agree, and the allocator is sound."""
        self.allocator.check()
        refs = [0] * self.allocator.num_blocks
        for s, table in self.tables.items():
            assert len(table.blocks) == blocks_for(table.num_tokens, self.block_size), (
                f"sequence {s}: {table.num_tokens} tokens in {len(table.blocks)} blocks")
            for b in table.blocks:
                refs[b] += 1
        for b, r in enumerate(refs):
            assert self.allocator.ref_count(b) == r, (
                f"block {b}: ref count {self.allocator.ref_count(b)}, used by {r} tables")
