"""LLM serving: KV caches (dense and paged), batching schedulers and speculative decoding."""

from .paged import BlockAllocator as BlockAllocator
from .paged import OutOfBlocks as OutOfBlocks
from .paged import PagedKVCache as PagedKVCache
from .paged import paged_attention as paged_attention
from .scheduler import ContinuousBatcher as ContinuousBatcher
from .scheduler import Request as Request
from .scheduler import request_stream as request_stream
from .scheduler import serve_static as serve_static
from .speculative import SpeculativeStats as SpeculativeStats
from .speculative import accept_or_resample as accept_or_resample
from .speculative import expected_tokens_per_step as expected_tokens_per_step
from .speculative import residual_distribution as residual_distribution
from .speculative import speculative_generate as speculative_generate
