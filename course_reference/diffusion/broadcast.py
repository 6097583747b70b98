"""Pyramid attention broadcast (PAB; Zhao et al., 2024, the attention cache of VideoSys) on the
course's DiT: in the middle of sampling, where consecutive steps' attention outputs barely
change, a block's attention is computed on one step and its output reused ("broadcast") on the
next ``reuse - 1`` steps; the first and last steps, where the image changes fastest, always
compute it. What is saved is the attention's share of each skipped step (its projections to
queries, keys and values, the scores and the weighted sum); what it costs is measured against
the sampler that computes every step.
"""

from __future__ import annotations

import torch

from course_runtime.diffusion import NoiseSchedule, ddim_timesteps
from course_runtime.models.dit import DiT, modulate, unpatchify

from .sampling import ddim_step


def _cached_eps(model: DiT, x: torch.Tensor, t: int, labels: torch.Tensor, guidance: float,
                cache: list[torch.Tensor | None], fresh: bool) -> torch.Tensor:
    """The guided noise prediction, each block's attention output from ``cache`` unless
    ``fresh`` (then computed, and kept)."""
    config = model.config
    B = x.shape[0]
    null = torch.full_like(labels, model.null_class)
    c = model.condition(torch.full((2 * B,), t, dtype=torch.long), torch.cat([labels, null]))
    h = model.embed(torch.cat([x, x]))
    for i, block in enumerate(model.blocks):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.modulations(c)
        if fresh or cache[i] is None:
            q, k, v = block.qkv(h, shift_a, scale_a)
            cache[i] = block.out_proj(block.attend(q, k, v))
        h = h + gate_a[:, None] * cache[i]
        h = block.mlp_out(h, shift_m, scale_m, gate_m)
    shift, scale = model.final_ada(torch.nn.functional.silu(c)).chunk(2, dim=1)
    out = model.final(modulate(model.final_norm(h), shift, scale))
    eps = unpatchify(out, config.patch, config.channels, config.image_size, config.image_size)
    conditional, unconditional = eps.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


@torch.no_grad()
def sample_with_broadcast(model: DiT, labels: list[int], *, steps: int = 20, reuse: int = 2,
                          guidance: float = 2.0, seed: int = 0, keep: float = 0.2
                          ) -> dict[str, object]:
    """Guided DDIM samples with each block's attention output reused for ``reuse`` steps in the
    middle of sampling (the first and last ``keep`` of the steps compute it every time).
    ``reuse = 1`` is the plain sampler. Returns the images and how many block-steps computed
    their attention."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    config = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), config.channels, config.image_size, config.image_size,
                    generator=g)
    abar = NoiseSchedule().alphas_cumprod
    timesteps = ddim_timesteps(steps)
    edge = max(1, round(keep * steps))
    cache: list[torch.Tensor | None] = [None] * len(model.blocks)
    computed = 0
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        middle = edge <= i < steps - edge
        fresh = not middle or (i - edge) % reuse == 0
        computed += len(model.blocks) if fresh else 0
        eps = _cached_eps(model, x, t, labels_t, guidance, cache, fresh)
        x = ddim_step(eps, t, t_prev, x, abar, clip=1.0, clipped_eps=True)
    return {"images": x, "attention_computed": computed,
            "attention_total": steps * len(model.blocks)}


__all__ = ["sample_with_broadcast"]
