"""Sequence-parallel attention for the DiT, with Part III's code: each rank's band of tokens is a
contiguous slice of the image's sequence, which is what ``ulysses_attention`` and
``ring_attention`` (``course_reference.systems.ring_attention``) split a long sequence into.

- **Ulysses**: all-to-alls turn the token split into a head split (each rank attends with 1/N
  of the heads over every token) and back; four of them per block (Q, K, V in, the output back),
  each of 1/N of the activations: xDiT's ``4/N O(p hs) L``, on the critical path.
- **Ring attention**: each rank keeps its queries and passes the keys and values round the ring,
  folding each block in with the online softmax: ``2 O(p hs) L``, which a GPU overlaps with
  the blockwise compute (here the hops run between the blocks of compute).

Both are exact: the samples equal the single process's to float rounding (tests check it, and
the bytes each rank sends against the cost model's rows).
"""

from __future__ import annotations

from typing import Any

import torch

from course_reference.systems.ring_attention import ring_attention, ulysses_attention
from course_runtime.patch_parallel import sample_bands

from .parallel import _ddim_step, merge_bands, split_band


def _tokens_out(out: torch.Tensor) -> torch.Tensor:
    """``[B, heads, n, head_dim]`` -> ``[B, n, d_model]``."""
    B, H, n, Dh = out.shape
    return out.transpose(1, 2).reshape(B, n, H * Dh)


def ulysses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """This band's attention output with Ulysses' all-to-alls, one image row at a time (Part
    III's function takes one sequence, ``(heads, tokens, head_dim)``)."""
    return _tokens_out(torch.stack([ulysses_attention(q[b], k[b], v[b])
                                    for b in range(q.shape[0])]))


def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """This band's attention output with the keys and values passed round the ring."""
    out, _ = ring_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return _tokens_out(out)


METHODS = {"ulysses": ulysses, "ring": ring}


def sequence_parallel_sample(labels: list[int], world_size: int, method: str, *,
                             steps: int = 25, guidance: float = 2.0, seed: int = 0,
                             timeout: float = 300.0) -> dict[str, Any]:
    """Guided DDIM samples with the DiT's attention split by ``method`` ("ulysses" or "ring")
    over ``world_size`` forked ranks; the same result dictionary as ``patch_parallel_sample``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {sorted(METHODS)}")
    return sample_bands([int(y) for y in labels], world_size, split_band=split_band,
                        merge_bands=merge_bands, ddim_step=_ddim_step, attend=METHODS[method],
                        steps=steps, guidance=guidance, seed=seed, timeout=timeout)


__all__ = ["METHODS", "ring", "sequence_parallel_sample", "ulysses"]
