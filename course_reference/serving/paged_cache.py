"""A paged KV cache: keys and values of many sequences in shared fixed-size blocks, one block
table per sequence, attention read through the tables.

This is the memory manager of vLLM (Kwon et al., "Efficient Memory Management for Large Language
Model Serving with PagedAttention", SOSP 2023, sections 4.1-4.4), small enough to read in one go.
``PagedKVCache`` implements the course's KV-cache protocol (``positions``, ``attend``,
``advance``, ``truncate``), so the tiny GPT runs on it unchanged; it takes its blocks from a
``BlockAllocator`` (``allocator``), copies a shared block on its first write (copy-on-write,
section 4.4), reads keys with ``paged_attention`` (``attention``) and, if asked, keeps full
blocks findable for later prompts (``prefix_cache``).

A scheduler talks to it through a few verbs, as nano-vllm's scheduler talks to its block
manager: ``can_allocate`` / ``allocate`` a sequence, ``can_append`` / ``append`` tokens to one,
``free_sequence`` when it is done or preempted. Blocks are taken when the model step runs;
``allocate`` and ``append`` promise them until then, so that a step's promises never exceed the
free blocks.

A sequence only ever holds ``ceil(tokens / block_size)`` blocks, so the memory it wastes is less
than one block, against a contiguous cache that reserves the maximum length up front.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F  # noqa: N812

from course_runtime.serving import BlockTable, OutOfBlocks, blocks_for

from .allocator import BlockAllocator
from .attention import attention_plan, paged_attention
from .prefix_cache import PrefixCache


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
    ``blocks_per_step`` is passed to ``paged_attention``. ``prefix_caching=True`` keeps full
    blocks findable by their tokens after their sequence is gone (``PrefixCache``): a new
    sequence whose prompt starts the same way reuses those blocks.

    A scheduler uses the verbs of the module docstring (``can_allocate``, ``allocate``,
    ``can_append``, ``append``, ``free_sequence``) and never the allocator or the tables.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, *, batch_size: int = 0, blocks_per_step: int = 1,
                 prefix_caching: bool = False, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.prefix_cache = PrefixCache(block_size) if prefix_caching else None
        self._promised: dict[int, int] = {}   # blocks promised to each sequence for the next step
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

    @property
    def prefix_caching(self) -> bool:
        return self.prefix_cache is not None

    def cached_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Blocks holding the longest run of ``tokens``' leading full blocks, short of the last
        token (which must be computed, for its logits); none without prefix caching."""
        return [] if self.prefix_cache is None else self.prefix_cache.lookup(tokens)

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
        """Make the full blocks of ``seq_id`` (whose first tokens are ``tokens``) findable (a
        no-op without prefix caching)."""
        if self.prefix_cache is None:
            return
        table = self._table(seq_id)
        self.prefix_cache.remember(table.blocks, tokens[:min(len(tokens), table.num_tokens)])

    def _forget(self, block: int) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.forget(block)

    # ---- the scheduler's verbs ------------------------------------------------------------
    # A scheduler chooses a step's tokens before the step runs, and the blocks are taken only
    # when it runs (``_prepare``): until then ``allocate`` and ``append`` promise them, and the
    # ``can_*`` questions count the free blocks less every promise of the step.

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached prefix blocks among them: they can be taken back)."""
        return self.allocator.num_free

    @property
    def device(self) -> torch.device:
        return self.k.device

    def prefix_hit(self, tokens: Sequence[int]) -> int:
        """Tokens a new sequence for ``tokens`` starts with: its longest cached prefix."""
        return len(self.cached_prefix(tokens)) * self.block_size

    def _unpromised(self) -> int:
        return self.allocator.num_free - sum(self._promised.values())

    def _blocks_to_allocate(self, tokens: Sequence[int], n: int) -> int:
        prefix = self.cached_prefix(tokens)
        # The free blocks among the cached prefix come off the free list too (taken back).
        return (blocks_for(len(prefix) * self.block_size + n, self.block_size) - len(prefix)
                + sum(1 for b in prefix if self.allocator.ref_count(b) == 0))

    def can_allocate(self, tokens: Sequence[int], n: int, headroom: float = 0.0) -> bool:
        """Would a new sequence for ``tokens`` (its cached prefix, then ``n`` tokens computed in
        the next step) fit, with ``headroom`` blocks to spare?"""
        return self._blocks_to_allocate(tokens, n) + headroom <= self._unpromised()

    def allocate(self, tokens: Sequence[int], n: int) -> int:
        """A new sequence for ``tokens`` that starts with their cached prefix (``seq_length``
        says how long) and computes ``n`` tokens in the next step, whose blocks are promised."""
        need = self._blocks_to_allocate(tokens, n)
        if need > self._unpromised():
            raise OutOfBlocks(need, self._unpromised(), self.num_blocks)
        seq_id = self.add_sequence_with_prefix(tokens)
        self._promised[seq_id] = need
        return seq_id

    def can_append(self, seq_id: int, n: int) -> bool:
        """Would ``n`` more tokens of ``seq_id`` in the next step fit (copies on write included)?"""
        return self.blocks_needed(seq_id, n) <= self._unpromised()

    def append(self, seq_id: int, n: int) -> None:
        """Promise the blocks of ``n`` more tokens of ``seq_id`` for the next step."""
        need = self.blocks_needed(seq_id, n)
        if need > self._unpromised():
            raise OutOfBlocks(need, self._unpromised(), self.num_blocks)
        self._promised[seq_id] = self._promised.get(seq_id, 0) + need

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of ``seq_id``'s physical blocks, in logical order (for traces and figures)."""
        return list(self._table(seq_id).blocks)

    def free_sequence(self, seq_id: int) -> None:
        """Drop a finished (or preempted) sequence: its references to its blocks, and the blocks
        promised to it for the next step."""
        for b in self._table(seq_id).blocks:
            self.allocator.free(b)
        del self.tables[seq_id]
        self._promised.pop(seq_id, None)
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
        self._promised = {}               # the step now holds what it was promised
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
