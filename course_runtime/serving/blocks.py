"""The vocabulary of a paged KV cache (Kwon et al., "PagedAttention", SOSP 2023, section 4.1).

The cache is cut into physical blocks of ``block_size`` token slots; a sequence's block table
lists, in logical order, the physical block that holds each run of ``block_size`` of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    """The allocator has fewer free blocks than a request needs (the scheduler preempts on it)."""

    def __init__(self, needed: int, free: int, total: int):
        super().__init__(f"out of KV-cache blocks: needed {needed}, {free} free of {total}; "
                         "free finished sequences, preempt one, or make the cache larger")
        self.needed, self.free, self.total = needed, free, total


@dataclass
class BlockTable:
    """One sequence: its physical blocks in logical order and how many tokens it holds.

    Token ``p`` lives in block ``blocks[p // block_size]`` at offset ``p % block_size``.
    """

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks of ``block_size`` slots that ``num_tokens`` tokens fill (the last one partly)."""
    return -(-num_tokens // block_size)
