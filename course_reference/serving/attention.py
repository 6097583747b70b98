"""Paged attention: causal attention of new queries over keys stored in blocks, read one block
(or a few) at a time through the block tables, with an online softmax.

This is the kernel of vLLM (Kwon et al., "PagedAttention", SOSP 2023, section 4.1) in PyTorch:
the cache is never gathered into one dense tensor. ``attention_plan`` splits the block tables
into steps and computes their masks once per model step (every layer reads the same blocks);
``paged_attention`` folds each step into a running max, denominator and weighted sum (Milakov and
Gimelshein, "Online normalizer calculation for softmax", 2018, as FlashAttention does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from course_runtime.serving import blocks_for


@dataclass
class AttentionPlan:
    """What ``paged_attention`` reads at each step, and which of it to mask: the same for every
    layer of a model step, so the cache computes it once per step and reuses it."""

    blocks: list[torch.Tensor]             # [m, g] physical block ids per step
    hidden: list[torch.Tensor | None]      # [m, n, g*bs]: key after the query, or past the end?
    unstored: list[torch.Tensor | None]    # [m, g*bs, 1]: slot past the sequence's end?
    # A step reads rows 0..m-1 only: the rows after the last one with a key in the step have
    # nothing to read there, so it skips them (rows sorted longest first skip the most).


def attention_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, n: int,
                   block_size: int, blocks_per_step: int = 1) -> AttentionPlan:
    """Split the block tables into steps of ``blocks_per_step`` blocks, with their masks
    (``None`` where nothing in the step needs masking)."""
    B = block_tables.shape[0]
    if block_tables.dim() != 2 or context_lens.shape != (B,):
        raise ValueError(f"paged_attention: block_tables of shape {tuple(block_tables.shape)} "
                         f"and context_lens of shape {tuple(context_lens.shape)} do not match")
    if bool((context_lens < n).any()):
        raise ValueError(f"paged_attention: every sequence must hold its {n} new keys, got "
                         f"context lengths {context_lens.tolist()}")
    if blocks_per_step < 1:
        raise ValueError(f"blocks_per_step must be at least 1, got {blocks_per_step}")
    num_blocks = blocks_for(int(context_lens.max()), block_size)
    if block_tables.shape[1] < num_blocks:
        raise ValueError(f"paged_attention: block_tables has {block_tables.shape[1]} columns, "
                         f"the longest sequence ({int(context_lens.max())} keys) needs "
                         f"{num_blocks}")
    device = block_tables.device
    context_lens = context_lens.to(device)
    q_pos = context_lens[:, None] - n + torch.arange(n, device=device)          # [B, n]
    plan = AttentionPlan([], [], [])
    lengths = context_lens.tolist()
    for j in range(0, num_blocks, blocks_per_step):
        first_key = j * block_size
        rows = 1 + max(b for b in range(B) if lengths[b] > first_key)
        block = block_tables[:rows, j:j + blocks_per_step]                      # [m, g]
        k_pos = first_key + torch.arange(block.shape[1] * block_size, device=device)
        visible = k_pos[None, None, :] <= q_pos[:rows, :, None]                 # [m, n, gbs]
        stored = (k_pos[None, :] < context_lens[:rows, None])[:, :, None]       # [m, gbs, 1]
        plan.blocks.append(block)
        plan.hidden.append(None if bool(visible.all()) else ~visible)
        plan.unstored.append(None if bool(stored.all()) else ~stored)
    return plan


def paged_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    scale: float | None = None, blocks_per_step: int = 1,
                    plan: AttentionPlan | None = None, unused_finite: bool = False
                    ) -> torch.Tensor:
    """Causal attention of new queries over keys stored in blocks, one block at a time.

    q: ``[B, H, n, Dh]``, the last ``n`` positions of each sequence (query i of row b sits at
    position ``context_lens[b] - n + i``). k_blocks, v_blocks: ``[H, num_blocks, block_size, Dh]``
    (one layer; head-major, so that gathered blocks are laid out for the matmul as they come).
    block_tables: ``[B, max_blocks]`` physical block ids (entries past a sequence's end are
    ignored). context_lens: ``[B]`` keys per sequence, new ones included.

    Each step gathers block j of every row (``[H, B, block_size, Dh]``) and folds it into a running
    max, denominator and weighted sum (the online softmax of Milakov and Gimelshein, 2018), so no
    more than one block per sequence is ever materialised. Slots past a sequence's length are
    masked in both scores and values, so whatever they hold (stale data, NaN) never leaks in.
    A GPU kernel gives each block to its own threads; on a CPU, where every step costs Python
    overhead, ``blocks_per_step`` folds several blocks per step (still never the whole cache).
    ``plan`` (from ``attention_plan``) skips recomputing the masks, the same for every layer.
    ``unused_finite=True`` promises that every slot read holds a finite number, so masked scores
    alone suffice (weight 0 times a finite value is 0) and the values need no mask: the
    ``PagedKVCache`` keeps that promise by zeroing blocks when it allocates them.
    """
    B, H, n, Dh = q.shape
    block_size = k_blocks.shape[2]
    if block_tables.shape[0] != B:
        raise ValueError(f"paged_attention: q has batch {B} but block_tables has shape "
                         f"{tuple(block_tables.shape)}")
    if k_blocks.dim() != 4 or (k_blocks.shape[0], k_blocks.shape[3]) != (H, Dh):
        raise ValueError(f"paged_attention: q has {H} heads of size {Dh} but the cache blocks "
                         f"have shape {tuple(k_blocks.shape)}")
    if plan is None:
        plan = attention_plan(block_tables.to(q.device), context_lens, n, block_size,
                              blocks_per_step)
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    # Work head-major, [H, B, ...]: gathering g blocks of every row from [H, num_blocks, bs, Dh]
    # gives [H, B, g, bs, Dh], whose last three axes flatten to [H, B, g*bs, Dh] without a copy.
    q = (q * scale).transpose(0, 1)                                             # [H, B, n, Dh]
    running_max = denominator = out = None
    for block, hidden, unstored in zip(plan.blocks, plan.hidden, plan.unstored):
        m, g = block.shape                 # the step reads rows 0..m-1 (see AttentionPlan)
        ids = block.flatten()
        k = k_blocks.index_select(1, ids).view(H, m, g * block_size, Dh)       # [H, m, gbs, Dh]
        v = v_blocks.index_select(1, ids).view(H, m, g * block_size, Dh)
        scores = q[:, :m] @ k.transpose(-1, -2)                                 # [H, m, n, gbs]
        if hidden is not None:
            scores = scores.masked_fill_(hidden, -math.inf)
        if unstored is not None and not unused_finite:
            v = v.masked_fill_(unstored, 0.0)     # v is a fresh copy: zero its unused slots
        if running_max is None:
            # The first step holds key 0, visible to every query: its max is finite, and there
            # is nothing yet to rescale (on a CPU every skipped operation is time saved).
            running_max = scores.amax(-1, keepdim=True)
            weights = torch.exp(scores.sub_(running_max))
            denominator = weights.sum(-1, keepdim=True)
            out = weights @ v
            continue
        # In place on the first m rows: the others have no key in this step.
        old_max = running_max[:, :m]
        new_max = torch.maximum(old_max, scores.amax(-1, keepdim=True))
        weights = torch.exp(scores.sub_(new_max))
        correction = torch.exp(old_max - new_max)
        denominator[:, :m].mul_(correction).add_(weights.sum(-1, keepdim=True))
        out[:, :m].mul_(correction).add_(weights @ v)
        old_max.copy_(new_max)
    if out is None:                    # no key at all: only possible with no query either
        return torch.zeros_like(q).transpose(0, 1)
    return out.div_(denominator).transpose(0, 1)

