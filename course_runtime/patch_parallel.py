"""Patch-parallel DiT sampling on forked ranks: the DiT band by band, and the loops that run it.

Rank ``r`` of ``N`` holds a band of every image, the rows of patches ``[r G/N, (r + 1) G/N)`` of
the ``G x G`` grid, and computes only that band's tokens: the adaLN conditioning is the image's,
each token's projections and MLP are its own, and a DDIM step is elementwise. Attention alone
needs the other bands: before each block's attention, ``band_eps`` hands this band's keys and
values ``[B, heads, band tokens, head_dim]`` to an *exchange* and attends over what it returns,
the keys and values of every token ``[B, heads, all tokens, head_dim]``, bands in rank order.
How an exchange gets them is the method (Lab 6 asks for two):

- ``gather_kv(k, v, world_size)``: a synchronous all-gather of every band's fresh ones;
- ``StaleKV(rank, world_size)``, one per block, called ``exchange(k, v, fresh)``: DistriFusion's
  stale keys and values of the other bands, from the previous step, while this step's travel
  in the background (``fresh``: a warm-up step, synchronous).

Sequence-parallel attention (Part III's Ulysses and ring attention) fits the same loop: instead
of an exchange, ``attend(q, k, v)`` takes this band's queries, keys and values and returns its
tokens' attention output ``[B, band tokens, d_model]``, communicating as it likes.

The loops here (``trajectory_eps``, ``sample_bands``) fork the ranks (gloo, one thread each),
count the collectives each rank runs (``comm.counting``) and return what rank 0 merged. They
take the pieces they run as arguments: the course's reference and a student's solution run the
very same loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from course_runtime.diffusion import NoiseSchedule, ddim_timesteps
from course_runtime.distributed import comm, launch
from course_runtime.models.dit import DiT, load, patchify, unpatchify

Exchange = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


def band_rows(rank: int, world_size: int, grid: int) -> slice:
    """The rows of patches that rank ``rank`` of ``world_size`` holds, of a ``grid``-row grid
    (``ValueError`` when the rows do not split evenly)."""
    if world_size < 1 or grid % world_size:
        raise ValueError(f"{grid} rows of patches do not split over {world_size} ranks")
    rows = grid // world_size
    return slice(rank * rows, (rank + 1) * rows)


def band_eps(model: DiT, x: torch.Tensor, t: int, labels: torch.Tensor, guidance: float,
             rank: int, world_size: int, exchanges: Sequence[Exchange] | None,
             fresh: bool = True, attend: Callable[..., torch.Tensor] | None = None
             ) -> torch.Tensor:
    """The guided noise prediction of this rank's band ``x`` ``[B, C, band pixels, W]`` at
    timestep ``t``: the DiT's forward pass on the band's tokens, with ``exchanges[i](k, v,
    fresh)`` giving block ``i`` the keys and values of every token (or ``attend(q, k, v)`` its
    band's attention output, for sequence-parallel attention). The conditional and
    unconditional rows go through together (conditional first), as in the single process."""
    config = model.config
    B = x.shape[0]
    null = torch.full_like(labels, model.null_class)
    c = model.condition(torch.full((2 * B,), t, dtype=torch.long), torch.cat([labels, null]))
    rows = band_rows(rank, world_size, config.grid)
    positions = model.pos.reshape(config.grid, config.grid, -1)[rows].reshape(-1, config.d_model)
    h = model.patch_embed(patchify(torch.cat([x, x]), config.patch)) + positions
    for i, block in enumerate(model.blocks):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.modulations(c)
        q, k, v = block.qkv(h, shift_a, scale_a)
        if attend is not None:
            h = block.attention_out(h, attend(q, k, v), gate_a)
            h = block.mlp_out(h, shift_m, scale_m, gate_m)
            continue
        keys, values = exchanges[i](k, v, fresh)
        want = (k.shape[0], k.shape[1], k.shape[2] * world_size, k.shape[3])
        for name, got in (("keys", keys), ("values", values)):
            if tuple(getattr(got, "shape", ())) != want:
                raise ValueError(f"the exchange returned {name} of shape "
                                 f"{tuple(getattr(got, 'shape', ()))}, expected {want} (every "
                                 f"band's tokens, in rank order)")
        h = block.attention_out(h, block.attend(q, keys, values), gate_a)
        h = block.mlp_out(h, shift_m, scale_m, gate_m)
    band_pixels = (rows.stop - rows.start) * config.patch
    eps = unpatchify(model.head(h, c), config.patch, config.channels, band_pixels,
                     config.image_size)
    conditional, unconditional = eps.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def _exchanges(model: DiT, rank: int, world_size: int, gather_kv: Callable[..., Any] | None,
               stale_kv: Callable[..., Any] | None, attend: Callable[..., Any] | None = None
               ) -> list[Any]:
    if sum(x is not None for x in (gather_kv, stale_kv, attend)) != 1:
        raise ValueError("give one of gather_kv (synchronous), stale_kv (DistriFusion) or "
                         "attend (sequence-parallel attention)")
    if attend is not None:
        return []
    if gather_kv is not None:
        return [lambda k, v, fresh: gather_kv(k, v, world_size) for _ in model.blocks]
    return [stale_kv(rank, world_size) for _ in model.blocks]


def _finish(exchanges: list[Any]) -> None:
    """Wait for what an exchange still has travelling (a ``StaleKV``'s ``wait()``)."""
    for exchange in exchanges:
        wait = getattr(exchange, "wait", None)
        if callable(wait):
            wait()


def _pixels(rank: int, world_size: int, model: DiT) -> slice:
    rows = band_rows(rank, world_size, model.config.grid)
    return slice(rows.start * model.config.patch, rows.stop * model.config.patch)


def _merged(part: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's band (``[..., band pixels, W]``), all-gathered and stacked top to bottom."""
    parts = torch.empty((world_size, *part.shape), dtype=part.dtype)
    comm.all_gather(parts.view(-1), part.contiguous().view(-1))
    return torch.cat(list(parts), dim=-2)


@torch.no_grad()
def _trajectory_rank(rank: int, world_size: int, xs: torch.Tensor, timesteps: list[int],
                     labels: list[int], guidance: float, warmup: int,
                     gather_kv: Callable[..., Any] | None, stale_kv: Callable[..., Any] | None,
                     name: str) -> dict[str, Any]:
    model = load(name)
    labels_t = torch.tensor(labels, dtype=torch.long)
    exchanges = _exchanges(model, rank, world_size, gather_kv, stale_kv)
    pixels = _pixels(rank, world_size, model)
    with comm.counting() as counted:
        eps = [band_eps(model, x[:, :, pixels].contiguous(), t, labels_t, guidance, rank,
                        world_size, exchanges, fresh=i < warmup)
               for i, (x, t) in enumerate(zip(xs, timesteps, strict=True))]
        _finish(exchanges)
        kv_bytes, calls = counted.total_bytes, dict(counted.calls)
    merged = _merged(torch.stack(eps), world_size)
    return {"eps": merged if rank == 0 else None, "kv_bytes": kv_bytes, "calls": calls}


def trajectory_eps(xs: torch.Tensor, timesteps: Sequence[int], labels: Sequence[int],
                   world_size: int, *, guidance: float = 2.0, warmup: int = 1,
                   gather_kv: Callable[..., Any] | None = None,
                   stale_kv: Callable[..., Any] | None = None, name: str = "dit",
                   timeout: float = 120.0) -> dict[str, Any]:
    """The patch-parallel noise predictions along a given trajectory: ``xs[i]`` ``[B, C, H, W]``
    are the images at ``timesteps[i]``, step ``i < warmup`` is fresh (synchronous). Returns
    ``{"eps": [steps, B, C, H, W] (bands merged), "kv_bytes": [per rank], "calls": [per rank:
    collectives by name]}``: what the exchanges alone moved, the final merge not counted."""
    ranks = launch(_trajectory_rank, world_size, torch.as_tensor(xs), [int(t) for t in timesteps],
                   [int(y) for y in labels], float(guidance), int(warmup), gather_kv, stale_kv,
                   name, timeout=timeout, threads=1)
    return {"eps": ranks[0]["eps"], "kv_bytes": [r["kv_bytes"] for r in ranks],
            "calls": [r["calls"] for r in ranks]}


@torch.no_grad()
def _sample_rank(rank: int, world_size: int, labels: list[int], steps: int, guidance: float,
                 seed: int, warmup: int, gather_kv: Callable[..., Any] | None,
                 stale_kv: Callable[..., Any] | None, split_band: Callable[..., Any],
                 merge_bands: Callable[..., Any], ddim_step: Callable[..., Any], clip: float,
                 name: str, attend: Callable[..., Any] | None) -> dict[str, Any]:
    model = load(name)
    config = model.config
    labels_t = torch.tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(len(labels), config.channels, config.image_size, config.image_size,
                       generator=g)  # the same start on every rank, as the single process
    x = torch.as_tensor(split_band(full, rank, world_size, config.patch)).contiguous()
    abar = NoiseSchedule().alphas_cumprod
    timesteps = ddim_timesteps(steps)
    exchanges = _exchanges(model, rank, world_size, gather_kv, stale_kv, attend)
    comm.barrier()
    start = time.perf_counter()
    with comm.counting() as counted:
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            eps = band_eps(model, x, t, labels_t, guidance, rank, world_size, exchanges,
                           fresh=i < warmup, attend=attend)
            x = torch.as_tensor(ddim_step(eps, t, t_prev, x, abar, clip=clip))
        _finish(exchanges)
        kv_bytes, calls = counted.total_bytes, dict(counted.calls)
    seconds = time.perf_counter() - start
    parts = torch.empty((world_size, *x.shape), dtype=x.dtype)
    comm.all_gather(parts.view(-1), x.contiguous().view(-1))
    images = torch.as_tensor(merge_bands(list(parts))) if rank == 0 else None
    return {"images": images, "kv_bytes": kv_bytes, "calls": calls, "seconds": seconds}


def sample_bands(labels: Sequence[int], world_size: int, *, split_band: Callable[..., Any],
                 merge_bands: Callable[..., Any], ddim_step: Callable[..., Any],
                 gather_kv: Callable[..., Any] | None = None,
                 stale_kv: Callable[..., Any] | None = None,
                 attend: Callable[..., Any] | None = None, steps: int = 25,
                 guidance: float = 2.0, seed: int = 0, warmup: int = 1, clip: float = 1.0,
                 name: str = "dit", timeout: float = 300.0) -> dict[str, Any]:
    """Guided DDIM samples of ``labels`` on ``world_size`` forked ranks, each denoising its band
    of every image (``split_band(images, rank, world_size, patch)``), stepping with
    ``ddim_step(eps, t, t_prev, x, alphas_cumprod, clip=clip)`` and exchanging keys and values
    with ``gather_kv`` or ``stale_kv`` (or attending with ``attend``); rank 0 joins the bands
    with ``merge_bands(bands)``.
    Returns ``{"images": [B, C, H, W], "kv_bytes", "calls": [per rank, while denoising],
    "seconds": the slowest rank's denoising loop}``."""
    ranks = launch(_sample_rank, world_size, [int(y) for y in labels], int(steps),
                   float(guidance), int(seed), int(warmup), gather_kv, stale_kv, split_band,
                   merge_bands, ddim_step, float(clip), name, attend, timeout=timeout,
                   threads=1)
    return {"images": ranks[0]["images"], "kv_bytes": [r["kv_bytes"] for r in ranks],
            "calls": [r["calls"] for r in ranks],
            "seconds": max(r["seconds"] for r in ranks)}


def kv_bytes_per_step(model: DiT, images: int, world_size: int, guidance: bool = True) -> float:
    """What one rank sends per denoising step under the ring all-gather: each block's keys and
    values over every token, ``(N - 1) / N`` of them (float32), ``rows`` images (twice with
    guidance): xDiT's ``2 O(p hs) L`` for DistriFusion."""
    config = model.config
    rows = images * (2 if guidance else 1)
    full = 2 * rows * config.num_tokens * config.d_model * 4
    return config.n_layers * (world_size - 1) / world_size * full


__all__ = ["band_eps", "band_rows", "kv_bytes_per_step", "sample_bands", "trajectory_eps"]
