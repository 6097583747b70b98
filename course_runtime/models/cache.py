"""The KV cache interface the tiny GPT decodes through, and its simplest implementation.

During decoding, each new token needs the keys and values of every earlier token in every
layer. Keeping them (instead of recomputing the whole prefix each step) turns the cost of a step
from O(T) forward work into O(1) forward work plus reading O(T) cached entries. How the entries
are stored is the cache's business: ``DenseKVCache`` keeps one contiguous tensor per layer sized
for the longest sequence; a paged cache (PagedAttention, Kwon et al., SOSP 2023) keeps fixed-size
blocks reached through a block table. The model sees only the ``KVCache`` protocol below.

The protocol, for a batch of B sequences:

- ``positions(n_new)`` gives the absolute positions of the next ``n_new`` tokens of each sequence
  (RoPE needs them before attention runs);
- ``attend(layer, q, k, v)`` stores this layer's new keys and values and returns the causal
  attention of the new queries over every cached and new key;
- ``advance(n_new)`` commits the new tokens once every layer has attended;
- ``truncate(length)`` rolls back to ``length`` tokens, which is how speculative decoding drops
  the keys and values of rejected draft tokens.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch.nn import functional as F  # noqa: N812


@runtime_checkable
class KVCache(Protocol):
    """What ``GPT.forward`` needs from a KV cache (see the module docstring)."""

    def positions(self, n_new: int) -> torch.Tensor:
        """LongTensor [B, n_new]: absolute positions of the next ``n_new`` tokens."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> torch.Tensor:
        """Store k, v [B, H, n_new, Dh] for ``layer``; return attention of q over all keys."""
        ...

    def advance(self, n_new: int) -> None:
        """Commit the ``n_new`` tokens every layer has just stored."""
        ...

    def truncate(self, length: int) -> None:
        """Forget every token from position ``length`` on."""
        ...

    @property
    def length(self) -> int:
        """Tokens held per sequence (the same for every sequence of a dense batch)."""
        ...

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor [B]: tokens held by each sequence."""
        ...


class DenseKVCache:
    """One preallocated [B, H, capacity, Dh] key and value tensor per layer.

    Every sequence in the batch holds the same number of tokens, which is what plain batched
    decoding and speculative decoding of one sequence need. Memory is reserved for ``capacity``
    tokens up front whether they are used or not: the waste a paged cache removes.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if min(n_layers, batch, n_heads, head_dim, capacity) < 1:
            raise ValueError("DenseKVCache needs positive n_layers, batch, n_heads, head_dim and "
                             f"capacity, got {n_layers}, {batch}, {n_heads}, {head_dim}, "
                             f"{capacity}")
        shape = (batch, n_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.n_layers, self.batch, self.capacity = n_layers, batch, capacity
        self._length = 0
        self._pending: int | None = None  # n_new stored by attend() but not yet advanced

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int = 1, capacity: int | None = None
                  ) -> DenseKVCache:
        """A cache shaped for ``model`` (a ``GPT``); capacity defaults to its context length."""
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layers, batch, cfg.n_heads, cfg.d_model // cfg.n_heads,
                   cfg.context if capacity is None else capacity, param.dtype, param.device)

    @property
    def length(self) -> int:
        return self._length

    @property
    def lengths(self) -> torch.Tensor:
        return torch.full((self.batch,), self._length, dtype=torch.long,
                          device=self.keys[0].device)

    def positions(self, n_new: int) -> torch.Tensor:
        self._check_room(n_new)
        row = torch.arange(self._length, self._length + n_new, device=self.keys[0].device)
        return row.expand(self.batch, n_new)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> torch.Tensor:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.n_layers} layers")
        expected = self.keys[layer].shape
        n_new = q.shape[2]
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (
                    expected[0], expected[1], expected[3]) or t.shape[2] != n_new:
                raise ValueError(f"attend: expected {name} of shape ({expected[0]}, {expected[1]},"
                                 f" {n_new}, {expected[3]}), got {tuple(t.shape)}")
        if self._pending is not None and self._pending != n_new:
            raise ValueError(f"attend: layer {layer} got {n_new} new tokens but an earlier layer "
                             f"got {self._pending}; call advance() between forward passes")
        self._check_room(n_new)
        self._pending = n_new
        start, end = self._length, self._length + n_new
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        keys, values = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        if n_new == 1:
            # One query sees every cached key: no mask needed.
            return F.scaled_dot_product_attention(q, keys, values)
        # Query i sits at absolute position start + i and may see keys 0 .. start + i.
        mask = torch.ones(n_new, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def advance(self, n_new: int) -> None:
        if self._pending is not None and n_new != self._pending:
            raise ValueError(f"advance({n_new}) but the layers stored {self._pending} new tokens")
        self._check_room(n_new)
        self._length += n_new
        self._pending = None

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"truncate({length}): the cache holds {self._length} tokens, "
                             f"so the new length must be between 0 and {self._length}")
        # Entries past `length` are left in place: the next attend() overwrites them, and
        # attention never reads past the committed length plus the new tokens.
        self._length = length
        self._pending = None

    def _check_room(self, n_new: int) -> None:
        if n_new < 1:
            raise ValueError(f"expected at least one new token, got {n_new}")
        if self._length + n_new > self.capacity:
            raise ValueError(f"KV cache full: it holds {self._length} of {self.capacity} tokens "
                             f"per sequence and cannot take {n_new} more")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
                        ) -> torch.Tensor:
    """Causal attention of queries at positions start.. over keys 0.., written out in full.

    The plain formula softmax(q k^T / sqrt(Dh) + mask) v, used by tests as an oracle.
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n_new, n_keys = q.shape[-2], k.shape[-2]
    allowed = torch.ones(n_new, n_keys, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
