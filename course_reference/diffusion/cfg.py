"""CFG parallelism (xDiT's "split batch"): classifier-free guidance runs the network twice per
step, once with the class and once without; two ranks each run one of the two, and exchange
their noise predictions (one all-gather of the images' size per step) to combine them. It
halves a step's compute at the smallest communication of any method, but its degree is fixed at
2: xDiT combines it with the others (patch, sequence or pipeline parallelism inside each half).
"""

from __future__ import annotations

from typing import Any

import torch

from course_runtime.diffusion import NoiseSchedule, ddim_timesteps
from course_runtime.distributed import comm, launch
from course_runtime.models.dit import load

from .sampling import ddim_step


@torch.no_grad()
def _cfg_rank(rank: int, world_size: int, labels: list[int], steps: int, guidance: float,
              seed: int, name: str) -> dict[str, Any]:
    model = load(name)
    config = model.config
    labels_t = torch.tensor(labels, dtype=torch.long)
    mine = labels_t if rank == 0 else torch.full_like(labels_t, model.null_class)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), config.channels, config.image_size, config.image_size,
                    generator=g)
    abar = NoiseSchedule().alphas_cumprod
    timesteps = ddim_timesteps(steps)
    with comm.counting() as counted:
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            eps = model(x, torch.full((len(labels),), t, dtype=torch.long), mine)
            both = torch.empty((2, *eps.shape), dtype=eps.dtype)
            comm.all_gather(both.view(-1), eps.contiguous().view(-1))
            conditional, unconditional = both[0], both[1]
            guided = unconditional + guidance * (conditional - unconditional)
            x = ddim_step(guided, t, t_prev, x, abar, clip=1.0, clipped_eps=True)
        sent = counted.total_bytes
    return {"images": x if rank == 0 else None, "bytes": sent}


def cfg_parallel_sample(labels: list[int], *, steps: int = 25, guidance: float = 2.0,
                        seed: int = 0, name: str = "dit", timeout: float = 300.0
                        ) -> dict[str, Any]:
    """Guided DDIM samples with the conditional branch on rank 0 and the unconditional one on
    rank 1. Returns ``{"images", "bytes": [per rank, while denoising]}``."""
    ranks = launch(_cfg_rank, 2, [int(y) for y in labels], steps, guidance, seed, name,
                   timeout=timeout, threads=1)
    return {"images": ranks[0]["images"], "bytes": [r["bytes"] for r in ranks]}


__all__ = ["cfg_parallel_sample"]
