"""The course's DiT and sampler as diffusers runs them: its ``DiTTransformer2DModel`` holding the
course DiT's weights, and a DDIM loop of diffusers' ``DDIMScheduler`` over it.

The architectures are the same (the DiT paper's: adaLN-Zero blocks, 2-D sine-cosine positions,
GELU-tanh MLPs), so the mapping is a renaming, with two layouts to undo: diffusers' patch
embedding is a convolution (the course's linear map of a patch's pixels, reshaped), and each of
its blocks holds its own copy of the timestep and class embedding, which the course's DiT
shares. diffusers' ``DiTPipeline`` itself cannot be the peer: it decodes latents with a VAE,
and the course's DiT denoises pixels; ``diffusers_sample`` is that pipeline's loop without the
VAE.
"""

from __future__ import annotations

from typing import Any

import torch

from course_runtime.diffusion import NoiseSchedule
from course_runtime.models.dit import DiT


def diffusers_dit(model: DiT) -> Any:
    """diffusers' DiTTransformer2DModel with the course DiT's weights: the same architecture
    (adaLN-Zero, sine-cosine positions, GELU-tanh MLPs), each block holding its own copy of
    the shared timestep and class embedding, as diffusers lays it out."""
    config = model.config
    import diffusers

    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=config.n_heads, attention_head_dim=config.head_dim,
        in_channels=config.channels, num_layers=config.n_layers, sample_size=config.image_size,
        patch_size=config.patch, num_embeds_ada_norm=config.num_classes, norm_eps=1e-6,
        norm_num_groups=1).eval()
    d, p, c = config.d_model, config.patch, config.channels
    state = {"pos_embed.proj.weight": model.patch_embed.weight.reshape(d, c, p, p),
             "pos_embed.proj.bias": model.patch_embed.bias,
             "proj_out_1.weight": model.final_ada.weight, "proj_out_1.bias": model.final_ada.bias,
             "proj_out_2.weight": model.final.weight, "proj_out_2.bias": model.final.bias}
    for i, block in enumerate(model.blocks):
        prefix = f"transformer_blocks.{i}."
        emb = prefix + "norm1.emb."
        state.update({
            emb + "timestep_embedder.linear_1.weight": model.t_mlp[0].weight,
            emb + "timestep_embedder.linear_1.bias": model.t_mlp[0].bias,
            emb + "timestep_embedder.linear_2.weight": model.t_mlp[2].weight,
            emb + "timestep_embedder.linear_2.bias": model.t_mlp[2].bias,
            emb + "class_embedder.embedding_table.weight": model.label_embed.weight,
            prefix + "norm1.linear.weight": block.ada.weight,
            prefix + "norm1.linear.bias": block.ada.bias,
            prefix + "attn1.to_out.0.weight": block.out_proj.weight,
            prefix + "attn1.to_out.0.bias": block.out_proj.bias,
            prefix + "ff.net.0.proj.weight": block.fc1.weight,
            prefix + "ff.net.0.proj.bias": block.fc1.bias,
            prefix + "ff.net.2.weight": block.fc2.weight,
            prefix + "ff.net.2.bias": block.fc2.bias})
        for name, w, b in zip("qkv", block.qkv_proj.weight.chunk(3), block.qkv_proj.bias.chunk(3)):
            state[prefix + f"attn1.to_{name}.weight"] = w
            state[prefix + f"attn1.to_{name}.bias"] = b
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "pos_embed.pos_embed" not in k]:
        raise RuntimeError(f"the weight mapping no longer fits diffusers' DiT: missing "
                           f"{missing}, unexpected {unexpected}")
    dtype = next(model.parameters()).dtype
    return theirs if dtype == torch.float32 else theirs.to(dtype)


@torch.no_grad()
def diffusers_sample(model: Any, labels: torch.Tensor | list[int], *, steps: int = 50,
                     guidance: float = 2.0, seed: int = 0, image_size: int = 16,
                     channels: int = 1, null_class: int = 10,
                     schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """Class-conditional samples by diffusers' ``DDIMScheduler`` over ``model`` (a diffusers
    DiT), from the same seeded start as ``course_reference.diffusion.sampling.sample``."""
    import diffusers

    schedule = schedule or NoiseSchedule()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=schedule.num_train_timesteps,
                                        beta_start=schedule.beta_start,
                                        beta_end=schedule.beta_end, beta_schedule="linear",
                                        clip_sample=True, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    labels = torch.as_tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), channels, image_size, image_size, generator=g)
    null = torch.full_like(labels, null_class)
    for t in scheduler.timesteps:
        both = model(torch.cat([x, x]), t.repeat(2 * len(labels)),
                     torch.cat([labels, null])).sample
        conditional, unconditional = both.chunk(2)
        eps = unconditional + guidance * (conditional - unconditional)
        x = scheduler.step(eps, t, x, use_clipped_model_output=True).prev_sample
    return x
