"""PipeFusion (Wang et al., 2024) on the course's DiT: the blocks split into N stages, one per
rank, and the image into M patches (bands of rows) that flow through the stages one after the
other, step after step.

A stage's attention for patch ``j`` needs its blocks' keys and values of every token. It keeps
them in a buffer, one per block: when patch ``j`` passes, its fresh keys and values replace its
part, and the patches after ``j`` are still the previous step's (stale, "displaced" by one
step). So the stages work on different patches at once, and the only traffic is each patch's
activations from one stage to the next (and its noise prediction from the last stage back to
the first, which holds the image): xDiT's ``2 O(p hs)`` per step, no factor ``L``. The warm-up
steps run the whole image as one patch, which fills the buffers with fresh keys and values;
with ``patches = 1`` every step is fresh and the result is the single process's.

Here a step waits for the previous step's last patch (the pipeline fills once per step, the
bubble of ``(N - 1) / (M + N - 1)`` the cost model charges); PipeFusion proper also overlaps
consecutive steps, patch by patch. Each rank uses only its stage's blocks (a 1/N share of the
parameters) and their key-value buffers (1/N of DistriFusion's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from course_runtime.diffusion import NoiseSchedule, ddim_timesteps
from course_runtime.distributed import comm, launch
from course_runtime.distributed.launcher import status
from course_runtime.models.dit import load, patchify, unpatchify
from course_runtime.patch_parallel import band_rows

from .sampling import ddim_step


def _send(tensor: torch.Tensor, dst: int, what: str) -> tuple[Any, torch.Tensor]:
    """Start sending ``tensor`` (counted); the buffer is kept with the request until it is
    waited for."""
    buffer = tensor.contiguous()
    comm.stats.record("send", buffer.numel() * buffer.element_size())
    with status(what):
        return dist.isend(buffer, dst), buffer


def _recv(like: torch.Tensor, src: int, what: str) -> torch.Tensor:
    buffer = torch.empty_like(like)
    with status(what):
        dist.recv(buffer, src)
    return buffer


@torch.no_grad()
def _stage(rank: int, world_size: int, labels: list[int], steps: int, patches: int,
           warmup: int, guidance: float, seed: int, name: str) -> dict[str, Any]:
    model = load(name)
    config = model.config
    L = config.n_layers
    if L % world_size:
        raise ValueError(f"{L} blocks do not split into {world_size} stages")
    if patches > 1 and warmup < 1:
        raise ValueError("PipeFusion's stale keys and values need a warm-up step first")
    mine = list(range(rank * L // world_size, (rank + 1) * L // world_size))
    first, last = rank == 0, rank == world_size - 1
    B = len(labels)
    labels_t = torch.tensor(labels, dtype=torch.long)
    null = torch.full_like(labels_t, model.null_class)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.channels, config.image_size, config.image_size, generator=g)
    abar = NoiseSchedule().alphas_cumprod
    timesteps = ddim_timesteps(steps)
    grid, patch = config.grid, config.patch
    pos = model.pos.reshape(grid, grid, -1)
    heads, head_dim = config.n_heads, config.d_model // config.n_heads
    kv = {b: torch.zeros(2, 2 * B, heads, config.num_tokens, head_dim) for b in mine}
    pending: list[Any] = []
    with comm.counting() as counted:
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            m = 1 if i < warmup else patches
            c = model.condition(torch.full((2 * B,), t, dtype=torch.long),
                                torch.cat([labels_t, null]))
            eps_parts = []
            for j in range(m):
                rows = band_rows(j, m, grid)
                tokens = slice(rows.start * grid, rows.stop * grid)
                n_tokens = tokens.stop - tokens.start
                if first:
                    band = x[:, :, rows.start * patch:rows.stop * patch]
                    h = model.patch_embed(patchify(torch.cat([band, band]), patch)) + \
                        pos[rows].reshape(-1, config.d_model)
                else:
                    h = _recv(torch.empty(2 * B, n_tokens, config.d_model), rank - 1,
                              f"step {i}: patch {j}'s activations from stage {rank - 1}")
                for b in mine:
                    block = model.blocks[b]
                    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.modulations(c)
                    q, k, v = block.qkv(h, shift_a, scale_a)
                    kv[b][0, :, :, tokens] = k  # this patch fresh, the later ones stale
                    kv[b][1, :, :, tokens] = v
                    h = block.attention_out(h, block.attend(q, kv[b][0], kv[b][1]), gate_a)
                    h = block.mlp_out(h, shift_m, scale_m, gate_m)
                if not last:
                    pending.append(_send(h, rank + 1, f"step {i}: patch {j} to stage {rank + 1}"))
                    continue
                pixels = (rows.stop - rows.start) * patch
                eps = unpatchify(model.head(h, c), patch, config.channels, pixels,
                                 config.image_size)
                conditional, unconditional = eps.chunk(2)
                eps_parts.append(unconditional + guidance * (conditional - unconditional))
            # the first stage steps the image with the last stage's noise predictions
            if last:
                eps_full = torch.cat(eps_parts, dim=2)
                if not first:
                    pending.append(_send(eps_full, 0, f"step {i}: noise to stage 0"))
            if first:
                if not last:
                    eps_full = _recv(x, world_size - 1, f"step {i}: noise from the last stage")
                x = ddim_step(eps_full, t, t_prev, x, abar, clip=1.0, clipped_eps=True)
        for request, _ in pending:
            request.wait()
        sent = counted.total_bytes
    return {"images": x if first else None, "bytes": sent}


def pipefusion_sample(labels: list[int], world_size: int, *, patches: int = 4,
                      steps: int = 25, warmup: int = 1, guidance: float = 2.0, seed: int = 0,
                      name: str = "dit", timeout: float = 300.0) -> dict[str, Any]:
    """Guided DDIM samples with the DiT's blocks in ``world_size`` pipeline stages and each
    step's image in ``patches`` patches after ``warmup`` whole-image steps. Returns
    ``{"images", "bytes": [per rank, while denoising]}``."""
    ranks = launch(_stage, world_size, [int(y) for y in labels], steps, patches, warmup,
                   guidance, seed, name, timeout=timeout, threads=1)
    return {"images": ranks[0]["images"], "bytes": [r["bytes"] for r in ranks]}


__all__ = ["pipefusion_sample"]
