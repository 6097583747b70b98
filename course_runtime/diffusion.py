"""What Part V's diffusion transformer is trained and sampled with: its images and its noise.

- ``digit_images``: scikit-learn's bundled handwritten digits (1,797 images of 8x8, no download),
  upsampled to the DiT's resolution and scaled to [-1, 1], with their labels;
- ``NoiseSchedule``: the DDPM forward process (Ho et al., NeurIPS 2020) with its linear betas,
  computed as diffusers' schedulers compute them (float32), so that a step of the course's
  samplers can be compared with a step of diffusers' on the same numbers;
- ``ddim_timesteps``: the timesteps a DDIM sampler of ``n`` steps visits ("leading" spacing, as
  diffusers' ``DDIMScheduler`` by default);
- ``guided_eps``: classifier-free guidance (Ho and Salimans, 2022) in one batched model call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812


def digit_images(size: int = 16, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, size, size]`` in [-1, 1] and labels ``[N]``. ``split``: "train" (the
    first 80 %, in scikit-learn's order), "test" (the rest) or "all"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [0, 1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(digits.target, dtype=torch.long)
    cut = int(0.8 * len(labels))
    if split == "train":
        return images[:cut], labels[:cut]
    if split == "test":
        return images[cut:], labels[cut:]
    if split != "all":
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    return images, labels


@dataclass(frozen=True)
class NoiseSchedule:
    """``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` for ``t = 0 .. T - 1``."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @property
    def betas(self) -> torch.Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps,
                              dtype=torch.float32)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` for images ``x0`` ``[B, ...]``, ``noise`` like them, timesteps ``t`` ``[B]``."""
        abar = self.alphas_cumprod.to(x0.device)[t].view(-1, *[1] * (x0.dim() - 1))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps of a sampler of ``num_steps`` steps, from the noisiest: ``k * (T // n)``
    for ``k = n - 1 .. 0``."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return [k * ratio for k in reversed(range(num_steps))]


def guided_eps(model: torch.nn.Module, x: torch.Tensor, t: int, labels: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """Classifier-free guidance: ``eps_uncond + w (eps_cond - eps_uncond)``, both from one
    batched call (conditional rows first). ``guidance = 1``: the conditional prediction alone."""
    steps = torch.full((x.shape[0],), t, dtype=torch.long)
    if guidance == 1.0:
        return model(x, steps, labels)
    null = torch.full_like(labels, model.null_class)
    both = model(torch.cat([x, x]), torch.cat([steps, steps]), torch.cat([labels, null]))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)
