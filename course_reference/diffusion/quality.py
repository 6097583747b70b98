"""How good the DiT's samples are, measured rather than eyeballed.

A small convolutional classifier, trained (seeded, in a few seconds) on the same digits as the
DiT's training split at the same resolution, labels samples: class-conditional samples should be
labelled with the class they were asked for. Its penultimate features give a Fréchet distance
between two sets of images (the FID of Heusel et al., NeurIPS 2017, in a digit classifier's
feature space instead of Inception's): between samples and held-out digits, or between a
parallel sampler's images and the single-process sampler's.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from course_runtime.diffusion import digit_images


class DigitClassifier(nn.Module):
    def __init__(self, size: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (size // 4) ** 2, 64)
        self.out = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@functools.lru_cache(maxsize=4)
def classifier(size: int = 16, seed: int = 0, epochs: int = 20) -> DigitClassifier:
    """The classifier, trained on the training split (the first 80 % of the digits)."""
    images, labels = digit_images(size, "train")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier(size)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.enable_grad():  # also when first asked for under no_grad
        _fit(model, optimizer, images, labels, epochs, g)
    return model.eval()


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
         labels: torch.Tensor, epochs: int, g: torch.Generator) -> None:
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            # a little noise, so that it labels slightly imperfect images as their digit
            x = images[index] + 0.1 * torch.randn(images[index].shape, generator=g)
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def predicted_labels(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    return classifier(size)(images.float()).argmax(1)


def accuracy(images: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
    """The share of ``images`` the classifier labels as ``labels``."""
    labels = torch.as_tensor(labels)
    return float((predicted_labels(images, images.shape[-1]) == labels).float().mean())


@torch.no_grad()
def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the classifier's features of image sets
    ``a`` and ``b`` (each ``[N, 1, H, W]``, N well above 1)."""
    from scipy import linalg

    net = classifier(a.shape[-1])
    fa, fb = (net.features(x.float()).double().numpy() for x in (a, b))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ridge = 1e-6 * np.eye(fa.shape[1])  # features no image uses make a covariance singular
    cov_a, cov_b = np.cov(fa, rowvar=False) + ridge, np.cov(fb, rowvar=False) + ridge
    root = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
