"""DDPM and DDIM steps, and the single-process sampler with classifier-free guidance.

A step takes the model's noise prediction ``eps`` at timestep ``t`` and the current images
``x_t``, and returns ``x_{t_prev}``. Both go through the predicted clean image
``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (optionally clipped to the data's range):

- DDPM (Ho et al., 2020) samples the posterior ``q(x_prev | x_t, x0)``: its mean mixes ``x0`` and
  ``x_t``, its variance is ``(1 - abar_prev) / (1 - abar_t) * beta_t`` ("fixed small"), with
  ``beta_t = 1 - abar_t / abar_prev`` when steps are skipped;
- DDIM (Song et al., ICLR 2021) moves deterministically (``eta = 0``) to
  ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps`` (plus ``sigma`` noise when
  ``eta > 0``), which lets a sampler take a few dozen steps instead of a thousand.

Past the last step ``abar_prev`` is 1 (the clean image). Both are checked against diffusers'
``DDPMScheduler.step`` and ``DDIMScheduler.step`` in ``tests/test_diffusion.py``.
"""

from __future__ import annotations

import torch

from course_runtime.diffusion import NoiseSchedule, ddim_timesteps, guided_eps


def _abar(alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    return alphas_cumprod[t] if t >= 0 else torch.ones((), dtype=alphas_cumprod.dtype)


def predicted_x0(eps: torch.Tensor, t: int, x: torch.Tensor, alphas_cumprod: torch.Tensor,
                 clip: float | None = None) -> torch.Tensor:
    abar = _abar(alphas_cumprod, t)
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    return x0 if clip is None else x0.clamp(-clip, clip)


def ddim_step(eps: torch.Tensor, t: int, t_prev: int, x: torch.Tensor,
              alphas_cumprod: torch.Tensor, *, eta: float = 0.0, clip: float | None = None,
              clipped_eps: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``x_{t_prev}`` from ``x_t`` (``t_prev = -1``: the clean image). With ``eta > 0``,
    ``noise`` (a standard normal draw like ``x``) is required.

    ``clip`` clips the predicted clean image; ``clipped_eps`` then moves along the noise that
    the *clipped* prediction implies (diffusers' ``use_clipped_model_output``) rather than the
    model's own: without it, the step's two halves disagree whenever the clip bites, and the
    error grows with the number of steps (on the course's DiT, without it, about eight samples
    in ten show the digit asked for after 10 steps, and one in four after 50)."""
    abar, abar_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
    x0 = predicted_x0(eps, t, x, alphas_cumprod, clip)
    if clip is not None and clipped_eps:
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("a DDIM step with eta > 0 needs its noise")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddpm_step(eps: torch.Tensor, t: int, t_prev: int, x: torch.Tensor,
              alphas_cumprod: torch.Tensor, noise: torch.Tensor, *,
              clip: float | None = 1.0) -> torch.Tensor:
    """A draw of ``x_{t_prev}`` from the posterior, with ``noise`` (standard normal, like ``x``;
    unused at the last step)."""
    abar, abar_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
    alpha = abar / abar_prev
    beta = 1 - alpha
    x0 = predicted_x0(eps, t, x, alphas_cumprod, clip)
    mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0 + (alpha.sqrt() * (1 - abar_prev)
                                                          / (1 - abar)) * x
    if t <= 0:
        return mean
    variance = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
    return mean + variance.sqrt() * noise


@torch.no_grad()
def sample(model: torch.nn.Module, labels: torch.Tensor | list[int], *, steps: int = 50,
           guidance: float = 2.0, seed: int = 0, schedule: NoiseSchedule | None = None,
           clip: float | None = 1.0) -> torch.Tensor:
    """Class-conditional DDIM samples ``[B, C, H, W]`` of ``labels``, from a seeded start."""
    schedule = schedule or NoiseSchedule()
    labels = torch.as_tensor(labels, dtype=torch.long)
    config = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), config.channels, config.image_size, config.image_size,
                    generator=g)
    abar = schedule.alphas_cumprod
    timesteps = ddim_timesteps(steps, schedule.num_train_timesteps)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = ddim_step(guided_eps(model, x, t, labels, guidance), t, t_prev, x, abar, clip=clip,
                      clipped_eps=True)
    return x
