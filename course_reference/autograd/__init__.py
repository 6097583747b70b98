"""The course's reference autograd engine (Lab 1's answer key and the book's running example)."""

from .functional import cross_entropy, log_softmax, softmax
from .nn import MLP, Linear, Module
from .optim import SGD, Adam, Optimizer
from .tensor import (
                     Tensor,
                     backward,
                     broadcast_shape,
                     is_grad_enabled,
                     no_grad,
                     topological_order,
                     unbroadcast,
)

__all__ = [
    "Adam", "Linear", "MLP", "Module", "Optimizer", "SGD", "Tensor", "backward",
    "broadcast_shape", "cross_entropy", "is_grad_enabled", "log_softmax", "no_grad", "softmax",
    "topological_order", "unbroadcast",
]
