"""LLM serving: KV caches (dense and paged), batching schedulers and speculative decoding."""

from .paged import BlockAllocator as BlockAllocator
from .paged import OutOfBlocks as OutOfBlocks
from .paged import PagedKVCache as PagedKVCache
from .paged import paged_attention as paged_attention
