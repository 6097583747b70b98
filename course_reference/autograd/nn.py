"""Layers built from ``Tensor`` ops: ``Module``, ``Linear`` and ``MLP``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .tensor import Tensor


class Module:
    """Anything with parameters: finds every ``Tensor`` that requires grad in its attributes."""

    def parameters(self) -> list[Tensor]:
        found: list[Tensor] = []
        seen: set[int] = set()
        for value in vars(self).values():
            for tensor in _tensors_in(value):
                if tensor.requires_grad and id(tensor) not in seen:
                    seen.add(id(tensor))
                    found.append(tensor)
        return found

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)


def _tensors_in(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Module):
        yield from value.parameters()
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


class Linear(Module):
    """``y = x @ weight + bias`` with ``weight`` of shape (in, out).

    Initialised like ``torch.nn.Linear``: uniform in ±1/sqrt(in_features). The weight is stored
    (in, out) rather than PyTorch's (out, in) so the forward pass needs no transpose.
    """

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator,
                 bias: bool = True):
        bound = 1.0 / np.sqrt(in_features)
        self.weight = Tensor(rng.uniform(-bound, bound, (in_features, out_features)),
                             requires_grad=True, name="weight")
        self.bias = (Tensor(rng.uniform(-bound, bound, (out_features,)), requires_grad=True,
                            name="bias") if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


class MLP(Module):
    """Linear layers with ReLU between them: ``MLP([784, 512, 10])`` has two layers."""

    def __init__(self, sizes: Sequence[int], seed: int = 0):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {sizes}")
        rng = np.random.default_rng(seed)
        self.layers = [Linear(m, n, rng) for m, n in zip(sizes[:-1], sizes[1:])]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = layer(x).relu()
        return self.layers[-1](x)
