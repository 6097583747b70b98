"""LLM serving: KV caches (dense and paged), batching schedulers and speculative decoding."""

from .paged import BlockAllocator as BlockAllocator
from .paged import OutOfBlocks as OutOfBlocks
from .paged import PagedKVCache as PagedKVCache
from .paged import paged_attention as paged_attention
from .scheduler import ContinuousBatcher as ContinuousBatcher
from .scheduler import Request as Request
from .scheduler import request_stream as request_stream
from .scheduler import serve_static as serve_static
