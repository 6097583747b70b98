"""What a serving lab gives you: the vocabulary of a paged KV cache, a stream of requests, and
the baseline that paged caches and continuous batching improve on.

- ``blocks``: ``BlockTable`` (a sequence's physical blocks and its token count), ``OutOfBlocks``
  (the error an allocator raises when it is full) and ``blocks_for`` (blocks that hold n tokens);
- ``workload``: ``Request``, ``request_stream`` (a seeded stream of mixed lengths) and
  ``ServeResult`` (what a server produced and what it cost);
- ``static``: static padded batching on a contiguous cache (``serve_static``,
  ``static_batch_size``, ``ContiguousKVCache``), the design Orca and vLLM replaced.

The allocator, the block-table operations, paged attention and continuous batching are what the
lab asks you to write; they are not here.
"""

from .blocks import BlockTable as BlockTable
from .blocks import OutOfBlocks as OutOfBlocks
from .blocks import blocks_for as blocks_for
from .static import ContiguousKVCache as ContiguousKVCache
from .static import serve_static as serve_static
from .static import static_batch_size as static_batch_size
from .workload import Request as Request
from .workload import ServeResult as ServeResult
from .workload import request_stream as request_stream
