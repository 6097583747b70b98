"""Automatic prefix caching: full KV blocks that stay findable by their tokens after their
sequence is gone, so that a new prompt starting the same way reuses them.

vLLM's automatic prefix caching names a full block by a hash of its tokens and of every token
before it (a hash chain, so equal blocks at different depths stay apart); SGLang's
RadixAttention indexes the same reuse with a radix tree instead (``radix``). Hashes find
candidates, and a hit is then verified against the block's own tokens: two different prefixes
with one hash must never share keys and values (nano-vllm compares them the same way).

The index holds block ids and tokens only; the cache (``paged_cache``) owns the blocks, takes
cached free blocks back from its allocator, and calls ``forget`` before a block is overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence


class PrefixCache:
    """Which physical block holds which full block of tokens, keyed by the hash chain."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._block_of_hash: dict[int, int] = {}
        # block -> (its hash, its tokens): the tokens verify a hit, the hash lets it be forgotten
        self._entry_of_block: dict[int, tuple[int, tuple[int, ...]]] = {}

    def block_hashes(self, tokens: Sequence[int]) -> list[int]:
        """One hash per full block of ``tokens``, each covering the block and all before it."""
        hashes, previous = [], 0
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            previous = hash((previous, tuple(tokens[start:start + self.block_size])))
            hashes.append(previous)
        return hashes

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """Blocks holding the longest run of ``tokens``' leading full blocks, short of the last
        token (which must be computed, for its logits)."""
        blocks = []
        for i, h in enumerate(self.block_hashes(tokens[:-1])):
            block = self._block_of_hash.get(h)
            own = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            if block is None or self._entry_of_block[block][1] != own:
                break
            blocks.append(block)
        return blocks

    def remember(self, blocks: Sequence[int], tokens: Sequence[int]) -> None:
        """Make the full blocks among ``blocks`` (holding ``tokens`` in order) findable; a block
        or a prefix already known keeps its first entry."""
        for i, (block, h) in enumerate(zip(blocks, self.block_hashes(tokens))):
            if h not in self._block_of_hash and block not in self._entry_of_block:
                self._block_of_hash[h] = block
                own = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
                self._entry_of_block[block] = (h, own)

    def forget(self, block: int) -> None:
        """A block about to be overwritten no longer holds what its entry says."""
        entry = self._entry_of_block.pop(block, None)
        if entry is not None:
            del self._block_of_hash[entry[0]]
