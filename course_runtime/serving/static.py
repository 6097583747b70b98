"""The baseline that Orca and vLLM improve on: static batching on a contiguous KV cache.

A static server takes ``batch_size`` requests at a time, pads their prompts to the longest one,
reserves the maximum length for every row of a contiguous cache whether it is used or not, and
runs the batch until its longest request is done: finished rows ride along as padding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .workload import Request, ServeResult


class ContiguousKVCache:
    """One contiguous ``max_len`` slab of keys and values per row, reserved whether used or not.

    Rows may take different numbers of real tokens in a call (``set_valid``); the rest of the row
    is padding, computed by the model and never stored.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, batch_size: int,
                 max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        shape = (num_layers, batch_size, max_len, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.valid = torch.zeros(batch_size, dtype=torch.long)

    def set_valid(self, counts: Sequence[int]) -> None:
        """Real (non-padding) tokens per row in the next model call."""
        self.valid = torch.tensor(counts, dtype=torch.long)
        ends = self.lengths + self.valid
        if bool((ends > self.max_len).any()):
            raise ValueError(f"contiguous cache: rows would hold {ends.tolist()} tokens, more "
                             f"than the {self.max_len} reserved")

    def positions(self, n_new: int) -> torch.Tensor:
        pos = self.lengths[:, None] + torch.arange(n_new)
        return pos.clamp(max=self.max_len - 1).to(self.k.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> torch.Tensor:
        B, H, n, Dh = q.shape
        for b in range(B):
            start, count = int(self.lengths[b]), int(self.valid[b])
            self.k[layer, b, start:start + count] = k[b, :, :count].transpose(0, 1)
            self.v[layer, b, start:start + count] = v[b, :, :count].transpose(0, 1)
        used = int((self.lengths + self.valid).max())
        keys = self.k[layer, :, :used].transpose(1, 2)                      # [B, H, used, Dh]
        values = self.v[layer, :, :used].transpose(1, 2)
        end = (self.lengths + self.valid).to(q.device)
        q_pos = self.lengths.to(q.device)[:, None] + torch.arange(n, device=q.device)
        k_pos = torch.arange(used, device=q.device)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :]
                                                               < end[:, None, None])
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values,
                                                                attn_mask=mask[:, None])

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    def advance(self, n_new: int) -> None:
        self.lengths += self.valid

    def truncate(self, length: int) -> None:
        self.lengths.clamp_(max=length)


def static_batch_size(kv_budget_tokens: int, max_len: int) -> int:
    """Rows a contiguous cache of ``kv_budget_tokens`` slots holds when each reserves max_len."""
    return max(kv_budget_tokens // max_len, 1)


def serve_static(model: torch.nn.Module, requests: Sequence[Request], *, batch_size: int,
                 max_len: int | None = None) -> ServeResult:
    """Static batching: ``batch_size`` requests at a time in arrival order, each batch prefilled
    together (padded to its longest prompt) and decoded until its longest request is done."""
    config = model.config
    param = next(model.parameters())
    max_len = max_len or max(r.max_len for r in requests)
    too_long = [r.id for r in requests if r.max_len > max_len]
    if too_long:
        raise ValueError(f"requests {too_long} need more than the {max_len} reserved tokens")
    result = ServeResult(outputs={})
    ordered = sorted(requests, key=lambda r: r.arrival)
    start = time.perf_counter()
    for first in range(0, len(ordered), batch_size):
        batch = ordered[first:first + batch_size]
        cache = ContiguousKVCache(config.n_layers, config.n_heads,
                                  config.d_model // config.n_heads, len(batch), max_len,
                                  dtype=param.dtype, device=param.device)
        width = max(len(r.prompt) for r in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for b, r in enumerate(batch):
            tokens[b, :len(r.prompt)] = torch.tensor(r.prompt)
        cache.set_valid([len(r.prompt) for r in batch])
        outs: list[list[int]] = [[] for _ in batch]
        with torch.no_grad():
            logits = model(tokens.to(param.device), cache)
            for b, r in enumerate(batch):
                outs[b].append(int(logits[b, len(r.prompt) - 1].argmax()))
            result.steps += 1
            result.computed_tokens += tokens.numel()
            for _ in range(max(r.max_new_tokens for r in batch) - 1):
                # Finished rows still ride along (padding): the batch is as slow as its longest.
                alive = [len(o) < r.max_new_tokens for o, r in zip(outs, batch)]
                cache.set_valid([int(a) for a in alive])
                logits = model(torch.tensor([[o[-1]] for o in outs], device=param.device), cache)
                for b, o in enumerate(outs):
                    if alive[b]:
                        o.append(int(logits[b, 0].argmax()))
                result.steps += 1
                result.computed_tokens += len(batch)
        for r, o in zip(batch, outs):
            result.outputs[r.id] = o
            result.finished_step[r.id] = result.steps - 1
            # The last token is sampled, never stored: max_len - 1 slots hold keys.
            result.kv_waste[r.id] = 1 - (r.max_len - 1) / max_len
    result.wall_s = time.perf_counter() - start
    return result
