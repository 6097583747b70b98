"""LLM serving: the paged KV cache (allocator, paged attention, the cache, prefix caching),
continuous batching and speculative decoding. The request stream, the block-table vocabulary and
the static-batching baseline are the runtime's (``course_runtime.serving``)."""

from .allocator import BlockAllocator as BlockAllocator
from .attention import paged_attention as paged_attention
from .paged_cache import PagedKVCache as PagedKVCache
from .prefix_cache import PrefixCache as PrefixCache
from .scheduler import ContinuousBatcher as ContinuousBatcher
from .speculative import SpeculativeStats as SpeculativeStats
from .speculative import accept_or_resample as accept_or_resample
from .speculative import expected_tokens_per_step as expected_tokens_per_step
from .speculative import residual_distribution as residual_distribution
from .speculative import speculative_generate as speculative_generate
