"""The block allocator of a paged KV cache: a free list and a reference count per block.

vLLM (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023, sections 4.2 and 4.4) hands out physical blocks of ``block_size``
token slots and counts references, so that forked sequences (parallel sampling, a shared prompt)
share blocks until one of them writes: copy-on-write, done by the cache (``paged_cache``).
"""

from __future__ import annotations

from collections import deque

from course_runtime.serving import OutOfBlocks


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
